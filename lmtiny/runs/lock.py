"""One training run per run directory.

Local directories: an exclusive `fcntl.flock` on RUN/.lock, held for the whole run; the kernel
drops it when the process dies (kill -9 included), so a crashed run never blocks the next one.
The file records who holds it (host, pid, start time) for the error message.

Object stores (gs://) have no locks: RUN/.run_marker.json names the holder and a heartbeat that a
background thread refreshes every HEARTBEAT_SECONDS. A second run finding a marker younger than
STALE_SECONDS refuses to start; an older marker is a run that died (preempted VMs leave one), and
is taken over with a warning. Reading then writing is not atomic: two runs starting within the
same second can both pass (object stores give no compare-and-swap through epath).

In a multi-process run only process 0 takes the lock; the result is broadcast so every process
stops with the same one-line error.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
from typing import Any, Callable

from etils import epath

from lmtiny.errors import ConfigError, UserError
from lmtiny.fs.atomic import atomic_write_json

LOCK_FILE = ".lock"
MARKER_FILE = ".run_marker.json"
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 300.0


class WorkdirBusy(UserError):
  """Another run holds the run directory."""


def _holder() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now().isoformat(timespec="seconds")}


def _describe(info: dict) -> str:
  return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"


class RunLock:
  """Context manager: holds RUN's lock for the duration; raises WorkdirBusy if another run has it."""

  def __init__(self, workdir: str, *, log: Callable[[str], None] = print, enabled: bool = True):
    self.workdir, self.log, self.enabled = str(workdir), log, enabled
    self._fd = None
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self):
    main_only(self._acquire, self.enabled)
    return self

  def _acquire(self) -> None:
    if "://" in self.workdir:
      self._acquire_marker()
    else:
      self._acquire_local()

  def _acquire_local(self) -> None:
    import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only)
    os.makedirs(self.workdir, exist_ok=True)
    path = os.path.join(self.workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
      except ValueError:
        info = {}
      os.close(fd)
      raise WorkdirBusy(f"{self.workdir}: another training run is using this directory ({_describe(info)}; "
                        f"lock {path}); wait for it to finish, stop it, or choose another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder()).encode(), 0)
    self._fd = fd

  def _acquire_marker(self) -> None:
    path = epath.Path(self.workdir) / MARKER_FILE
    if path.exists():
      try:
        info = json.loads(path.read_text())
        age = time.time() - float(info["heartbeat"])
      except (ValueError, KeyError, TypeError, OSError):
        info, age = {}, STALE_SECONDS
      if age < STALE_SECONDS:
        raise WorkdirBusy(f"{self.workdir}: another training run is using this directory ({_describe(info)}, "
                          f"heartbeat {age:.0f} s ago in {path}); wait for it to finish, stop it, or choose "
                          f"another --workdir (a marker older than {STALE_SECONDS:.0f} s is taken over)")
      self.log(f"warning: {path}: taking over from a run that stopped without finishing ({_describe(info)}, "
               f"last heartbeat {age:.0f} s ago)")
    self._info = _holder()
    self._beat()
    self._thread = threading.Thread(target=self._heartbeats, name="lmtiny-run-marker", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    atomic_write_json(epath.Path(self.workdir) / MARKER_FILE, dict(self._info, heartbeat=time.time()))

  def _heartbeats(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        self._beat()
      except Exception:  # pylint: disable=broad-except  (a missed beat is retried next time)
        pass

  def __exit__(self, *exc):
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      try:
        (epath.Path(self.workdir) / MARKER_FILE).unlink()
      except OSError:
        pass
    if self._fd is not None:
      os.close(self._fd)  # releases the flock; the file stays (harmless, reused next time)
      self._fd = None


def main_only(fn: Callable[[], Any], main: bool):
  """fn() on process 0, its result (or UserError) broadcast to every process (JSON-able results)."""
  import json  # pylint: disable=g-import-not-at-top
  result, error, busy = None, None, False
  if main:
    try:
      result = fn()
    except UserError as e:
      error, busy = str(e), isinstance(e, WorkdirBusy)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    payload = json.dumps([error, result, busy]).encode() if main else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
    buf = np.zeros(size, np.uint8)
    buf[:len(payload)] = np.frombuffer(payload, np.uint8) if main else 0
    error, result, busy = json.loads(bytes(multihost_utils.broadcast_one_to_all(buf)).decode())
  if error:
    raise WorkdirBusy(error) if busy else ConfigError(error)
  return result
