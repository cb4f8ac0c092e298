"""Atomic writes: files (local paths and gs:// alike, etils.epath) and whole local directories.

Data is written to a uniquely named temporary sibling and renamed over the target, so a reader
never sees half a file and a crash never leaves a partial file under the real name. A directory's
temporary sibling is named after the host and process that own it, so the next build of the same
directory removes what a hard-killed one (SIGKILL, out of memory) left behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import uuid
from typing import Any, Iterator

from etils import epath


def atomic_write(path, data: bytes) -> None:
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
  try:
    tmp.write_bytes(data)
    tmp.replace(path)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def atomic_write_json(path, obj: Any) -> None:
  atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode())


def _owner_tag() -> str:
  return f"{socket.gethostname()}-{os.getpid()}"


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def remove_stale_siblings(target: str) -> list[str]:
  """Removes the temporary siblings of `target` that a dead process on this host left (from
  atomic_directory); a leftover moved-aside old copy is renamed back when `target` is missing.
  Returns the names it handled."""
  parent, name = os.path.split(target)
  pattern = re.compile(rf"\.{re.escape(name)}\.(tmp|old)-(.+)-(\d+)-[0-9a-f]{{8}}")
  host, handled = socket.gethostname(), []
  for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else ():
    match = pattern.fullmatch(entry)
    if not match or match[2] != host or _process_alive(int(match[3])):
      continue
    path = os.path.join(parent, entry)
    if match[1] == "old" and not os.path.exists(target):
      os.rename(path, target)  # killed between its two renames: the old directory goes back
    else:
      shutil.rmtree(path, ignore_errors=True)
    handled.append(entry)
  return handled


@contextlib.contextmanager
def atomic_directory(path: str, replace: bool = False) -> Iterator[str]:
  """Yields a temporary sibling of local `path` to fill; when the block ends without an error it is
  renamed to `path`, so the directory appears whole or not at all, and a failure or an interruption
  leaves `path` as it was. With `replace`, an existing `path` is moved aside, the new one renamed in
  and the old one deleted: no file of the old directory survives in the new one. Without it,
  `path` must be absent or an empty directory (os.rename fails otherwise)."""
  target = os.path.realpath(path)
  parent, name = os.path.split(target)
  os.makedirs(parent, exist_ok=True)
  remove_stale_siblings(target)
  tag = f"{_owner_tag()}-{uuid.uuid4().hex[:8]}"
  tmp = os.path.join(parent, f".{name}.tmp-{tag}")
  os.mkdir(tmp)
  try:
    yield tmp
    if replace and os.path.exists(target):
      old = os.path.join(parent, f".{name}.old-{tag}")
      os.rename(target, old)
      try:
        os.rename(tmp, target)
      except BaseException:
        os.rename(old, target)
        raise
      shutil.rmtree(old)
    else:
      os.rename(tmp, target)  # onto an empty directory, or none
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
