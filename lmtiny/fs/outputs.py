"""Checks made before any work starts, each failing in one line: output paths that cannot be
written, too little disk for the checkpoints a run will keep. Imports no JAX (the data preparer's
spawned tokenizer workers import it too)."""
from __future__ import annotations

import errno
import os
import shutil
import uuid
from typing import Callable

from lmtiny.errors import UserError


class OutputError(UserError):
  """An output path that is not a directory or cannot be written."""


def check_output_dir(path: str, flag: str) -> None:
  """`path` is (or can be created as) a writable directory; probes by creating a file (file
  permission bits say nothing to root, read-only mounts and full disks say it to nobody)."""
  if not path or "://" in path:
    return  # object stores: lmtiny.parallel.distributed.check_workdir probes those
  if os.path.exists(path) and not os.path.isdir(path):
    raise OutputError(f"{flag}={path}: exists and is not a directory")
  _probe(_nearest_existing(path), path, flag)


def check_output_file(path: str, flag: str) -> None:
  """`path` can be written as a file the way files.atomic_write writes it (a temporary sibling
  renamed over it): it is not a directory and its directory is (or can be created) writable."""
  if not path:
    raise OutputError(f"{flag}=: empty; name a file")
  if "://" not in path and os.path.isdir(path):
    raise OutputError(f"{flag}={path}: is a directory; name a file")
  check_output_parent(path, flag)


def check_output_parent(path: str, flag: str) -> None:
  """The directory that holds `path` can take a new entry: for outputs built in a temporary
  sibling and renamed into place (files.atomic_directory), which a writable but read-only-parented
  `path` would not allow."""
  if not path or "://" in path:
    return
  _probe(_nearest_existing(os.path.dirname(os.path.abspath(path))), path, flag)


def _nearest_existing(path: str) -> str:
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  return existing


def _probe(existing: str, path: str, flag: str) -> None:
  """OutputError naming `flag` unless a file can be created (and written) in `existing`."""
  if not os.path.isdir(existing):
    raise OutputError(f"{flag}={path}: {existing} is a file, not a directory")
  probe = os.path.join(existing, f".lmtiny-write-check-{uuid.uuid4().hex[:8]}")
  try:
    with open(probe, "wb") as f:
      f.write(b"x")
  except OSError as e:
    raise OutputError(f"{flag}={path}: cannot write to {existing} ({os.strerror(e.errno) if e.errno else e})") from None
  finally:  # a full disk creates the file and then fails the write: no probe may stay behind
    if os.path.lexists(probe):
      os.remove(probe)


# ---------------------------------------------------------------------------------------------
# Disk space.


def check_disk_space(directory: str, checkpoint_bytes: int, keep: int, log: Callable[[str], None]) -> None:
  """Warns when free space cannot hold `keep` checkpoints plus the one being written."""
  if "://" in directory:
    return
  existing = os.path.abspath(directory)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  free = shutil.disk_usage(existing).free
  need = (keep + 1) * checkpoint_bytes
  if free < need:
    log(f"warning: {existing} has {_size(free)} free; {keep} kept checkpoint(s) plus the one being written "
        f"need about {_size(need)} ({_size(checkpoint_bytes)} each): saves may fail with a full disk")


def _size(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1024:
      return f"{n:.0f} {unit}"
    n /= 1024
  return f"{n:.1f} TB"


def is_disk_full(e: BaseException) -> bool:
  return isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e)
