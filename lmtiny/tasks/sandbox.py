"""Runs untrusted Python (a model's HumanEval completion and its tests) in a guarded subprocess.

  result = run_python(source, Limits(seconds=5))
  result.status   # passed | failed | timeout | memory | refused
  result.reason   # one line: the exception, the refused event, the limit hit

Each run gets a fresh temporary directory (its cwd, TMPDIR and HOME; removed afterwards), a clean
environment, no stdin, and a new interpreter (`python -I -S`: no site-packages, no user or
environment settings, no script directory on the path) that starts lmtiny/tasks/sandbox_child.py.
The child enters a new network namespace where the kernel allows it (unshare of a user and a
network namespace, no root needed; otherwise `network` in the result says why not), sets its
limits (address space, CPU seconds, file size, no core files), installs an audit hook that
refuses sockets, process creation, signals to other processes, ctypes and any file system access
outside its directory (reads of the standard library excepted), and only then runs the code. The
parent kills the child's whole process group at the wall-clock limit, and reads at most
`output_bytes` of its output. `passed` needs exit status 0 and the child's word that the program
ran to its end (code that calls sys.exit or os._exit before its checks has not passed).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
STATUSES = ("passed", "failed", "timeout", "memory", "refused")


@dataclasses.dataclass(frozen=True)
class Limits:
  seconds: float = 5.0                  # wall clock, from start to kill
  memory_bytes: int = 512 * 2**20       # address space of the child (RLIMIT_AS)
  file_bytes: int = 16 * 2**20          # largest file the child may write (RLIMIT_FSIZE)
  output_bytes: int = 64 * 2**10        # stdout and stderr kept, each
  network_namespace: bool = True        # try unshare(CLONE_NEWUSER | CLONE_NEWNET) in the child

  @property
  def cpu_seconds(self) -> int:
    """The CPU-time limit: the wall-clock limit rounded up, plus one (the wall clock kills first
    when the program waits; the CPU limit when a busy program outruns a slow parent)."""
    return int(-(-self.seconds // 1)) + 1


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  status: str          # one of STATUSES
  reason: str          # one line; "" when passed
  stdout: str
  stderr: str
  seconds: float
  network: str         # "namespace" (a network namespace of its own) or why the audit hook alone guarded it

  @property
  def passed(self) -> bool:
    return self.status == "passed"


def _clean_env(directory: str) -> dict:
  return {"PATH": "/usr/bin:/bin", "HOME": directory, "TMPDIR": directory, "LANG": "C.UTF-8",
          "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1"}


def _read_capped(f, limit: int) -> str:
  f.seek(0)
  data = f.read(limit + 1)
  text = data[:limit].decode("utf-8", "replace")
  return text + ("\n[output cut]" if len(data) > limit else "")


def _last_line(text: str) -> str:
  lines = [line.strip() for line in text.strip().splitlines() if line.strip() and line.strip() != "[output cut]"]
  return lines[-1][:300] if lines else ""


def _verdict(returncode: int | None, report: list[str], stderr: str, timed_out: bool, limits: Limits) -> tuple[str, str]:
  refused = next((line for line in report if line.startswith("refused ")), None)
  if refused:
    return "refused", refused[len("refused "):]
  if timed_out:
    return "timeout", f"killed after {limits.seconds:g}s wall clock"
  if returncode == -signal.SIGXCPU:
    return "timeout", f"killed after {limits.cpu_seconds}s of CPU time"
  last = _last_line(stderr)
  if last.startswith("MemoryError"):
    return "memory", f"MemoryError: over the {limits.memory_bytes / 2**20:g} MiB address-space limit"
  if returncode == -signal.SIGXFSZ:
    return "failed", f"killed: wrote a file over the {limits.file_bytes / 2**20:g} MiB limit"
  if returncode == 0 and "done" in report:
    return "passed", ""
  if returncode is not None and returncode < 0:
    return "failed", f"killed by signal {signal.Signals(-returncode).name}"
  return "failed", last or f"exited with status {returncode} before the program finished"


def _network(report: list[str]) -> str:
  line = next((line for line in report if line.startswith("netns ")), "netns child did not start")
  state = line[len("netns "):]
  return "namespace" if state == "ok" else f"audit hook only ({state})"


def _kill_group(proc: subprocess.Popen) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  proc.wait()


def run_python(source: str, limits: Limits = Limits()) -> SandboxResult:
  """Runs `source` as __main__ in a fresh sandboxed interpreter; never raises for what the code does."""
  directory = tempfile.mkdtemp(prefix="lmtiny-sandbox-")
  read_fd, write_fd = os.pipe()
  try:
    with open(os.path.join(directory, "program.py"), "w", encoding="utf-8") as f:
      f.write(source)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # outside the sandbox's reach
      t0 = time.perf_counter()
      proc = subprocess.Popen(
          [sys.executable, "-I", "-S", "-X", "utf8", CHILD, directory, str(write_fd), str(limits.memory_bytes),
           str(limits.cpu_seconds), str(limits.file_bytes), str(int(limits.network_namespace))],
          cwd=directory, env=_clean_env(directory), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
          pass_fds=(write_fd,), start_new_session=True)
      os.close(write_fd)
      write_fd = -1
      timed_out = False
      try:
        proc.wait(timeout=limits.seconds)
      except subprocess.TimeoutExpired:
        timed_out = True
      _kill_group(proc)  # the program's own children, if any got past the guard, go with it
      seconds = time.perf_counter() - t0
      report = _read_report(read_fd)
      stdout, stderr = _read_capped(out, limits.output_bytes), _read_capped(err, limits.output_bytes)
    status, reason = _verdict(None if timed_out else proc.returncode, report, stderr, timed_out, limits)
    return SandboxResult(status, reason, stdout, stderr, seconds, _network(report))
  finally:
    if write_fd >= 0:
      os.close(write_fd)
    os.close(read_fd)
    shutil.rmtree(directory, ignore_errors=True)


def _read_report(fd: int) -> list[str]:
  os.set_blocking(fd, False)
  chunks = []
  while True:
    try:
      chunk = os.read(fd, 65536)
    except BlockingIOError:
      break
    if not chunk:
      break
    chunks.append(chunk)
  return b"".join(chunks).decode("utf-8", "replace").splitlines()


def run_many(sources: Sequence[str], limits: Limits = Limits(), workers: int = 2) -> list[SandboxResult]:
  """run_python over `sources`, `workers` children at a time (they wait on the kernel, not the GIL)."""
  if workers <= 1 or len(sources) <= 1:
    return [run_python(s, limits) for s in sources]
  with ThreadPoolExecutor(max_workers=workers) as pool:
    return list(pool.map(lambda s: run_python(s, limits), sources))
