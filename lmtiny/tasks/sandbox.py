"""Runs untrusted Python (a model's HumanEval completion) isolated by the kernel, with a verdict the
program cannot write.

  result = run_checked(program, checker, Limits(seconds=5))   # the checker's verdict
  result = run_python(source, Limits(seconds=5))              # a whole program's own account
  result.status   # passed | failed | timeout | memory | refused
  result.reason   # one line: the failure, the refused operation, the limit hit

The threat: code written by a model, including a policy trained against this very verdict, which
would learn to forge a pass or break out if it could. So the code runs in processes the kernel
isolates (lmtiny/tasks/sandbox_child.py, lmtiny.tasks.isolation, lmtiny.tasks.seccomp): new user,
mount, PID, network, IPC, UTS and cgroup namespaces; a private read-only root holding only the
standard library and the shared libraries it loads, /dev/null, /dev/zero, /dev/urandom, and a tmpfs
of `disk_bytes` at /tmp (cwd, HOME, TMPDIR; no /proc, /etc, home directory or file of ours); no
capabilities; no new privileges; a seccomp filter that refuses new processes (threads excepted),
signals to other processes, sockets, ptrace and the kernel's larger attack surfaces; rlimits on
address space, CPU time, file size and core files. The parent kills the process group at the
wall-clock limit, and when the sandbox's PID 1 exits the kernel kills everything left in it. Where
the kernel allows no user namespace, nothing runs: SandboxUnavailable names what is missing and the
opt-in `Limits(allow_unisolated_code=True)` (`--allow-unisolated-code`), which runs the code
with the rlimits and the seccomp filter only, in a temporary directory of the host.

The verdict: with run_checked the program runs in one process and answers calls to its functions,
arguments and results crossing as plain data (lmtiny.tasks.sandbox_wire); the checker (trusted
tests, `__program__.<name>(...)` calling the program) runs in another, reads its source from a
file only it is given (the tests never enter the program's memory) and writes `passed` on a pipe
the program's process never holds. The program cannot reach the checker's memory, pipe or process,
and an object with a forged __eq__ cannot cross. run_python's `passed` means the program
ran to its end by its own account (exit status 0 and a line of its harness): right for honest
code, forgeable by code that wants to pass. Score untrusted code with run_checked.

`LMTINY_SANDBOX_REFUSE_USERNS=1` in the environment makes the sandbox act as on a kernel that
refuses user namespaces (a seccomp filter refuses its unshare), for tests of that path.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from lmtiny.errors import RunFailed, UserError

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
STATUSES = ("passed", "failed", "timeout", "memory", "refused")
REFUSE_USERNS_ENV = "LMTINY_SANDBOX_REFUSE_USERNS"
_MESSAGE_BYTES = 64 * 2**10  # what is kept of the trusted channel and of the program's account


class SandboxUnavailable(UserError):
  """The kernel cannot isolate the code, and running it unisolated was not allowed."""


@dataclasses.dataclass(frozen=True)
class Limits:
  seconds: float = 5.0                  # wall clock, from start to kill
  memory_bytes: int = 512 * 2**20       # address space of each sandboxed process (RLIMIT_AS)
  file_bytes: int = 16 * 2**20          # largest file the code may write (RLIMIT_FSIZE)
  disk_bytes: int = 32 * 2**20          # size of its tmpfs, the only place it can write
  output_bytes: int = 64 * 2**10        # stdout and stderr kept, each
  allow_unisolated_code: bool = False   # where the kernel cannot isolate: run with rlimits and seccomp only

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
  network: str         # "namespace" (its own, with only a loopback that is down) or "host (...)" unisolated
  isolation: str = ""  # "namespaces + seccomp (x86_64)", or what ran unisolated and why

  @property
  def passed(self) -> bool:
    return self.status == "passed"


@functools.lru_cache(maxsize=1)
def _libraries() -> tuple[str, ...]:
  """The shared libraries the interpreter and its extension modules load (found once, by a child)."""
  try:
    out = subprocess.run([sys.executable, "-I", "-S", CHILD, "--libraries"], capture_output=True, timeout=60,
                         check=True)
    return tuple(json.loads(out.stdout))
  except (OSError, subprocess.SubprocessError, ValueError):
    return ()  # the sandbox still has what the interpreter loaded at start; some modules fail to import


def _env() -> dict:
  libraries = sorted({os.path.dirname(p) for p in _libraries()})  # found without /etc/ld.so.cache
  return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1",
          "LD_LIBRARY_PATH": ":".join(libraries)}


def _unavailable(why: str) -> SandboxUnavailable:
  return SandboxUnavailable(
      f"the code sandbox needs unprivileged user namespaces, and this kernel refused them ({why}): allow "
      "them (sysctl kernel.unprivileged_userns_clone=1 and user.max_user_namespaces > 0, or a container "
      "profile that permits unshare), or pass --allow-unisolated-code (Limits.allow_unisolated_code) to run "
      "model-written code with only rlimits and seccomp, at your own risk")


def _collect(proc: subprocess.Popen, fds: dict[str, int], caps: dict[str, int], deadline: float):
  """Reads each pipe to its end (keeping `caps[name]` bytes, draining the rest) or until the
  deadline; -> ({name: bytes}, timed_out)."""
  kept = {name: bytearray() for name in fds}
  with selectors.DefaultSelector() as selector:
    for name, fd in fds.items():
      selector.register(fd, selectors.EVENT_READ, name)
    while selector.get_map():
      left = deadline - time.monotonic()
      if left <= 0:
        return kept, True
      for key, _ in selector.select(left):
        chunk = os.read(key.fd, 65536)
        if not chunk:
          selector.unregister(key.fd)
        elif len(kept[key.data]) <= caps[key.data]:
          kept[key.data] += chunk
  try:
    proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
  except subprocess.TimeoutExpired:
    return kept, True
  return kept, False


def _kill_group(proc: subprocess.Popen) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  proc.wait()


def _text(data: bytes, limit: int) -> str:
  return data[:limit].decode("utf-8", "replace") + ("\n[output cut]" if len(data) > limit else "")


def _messages(data: bytes) -> list[dict]:
  out = []
  for line in data.split(b"\n"):
    try:
      message = json.loads(line)
    except ValueError:
      continue
    if isinstance(message, dict):
      out.append(message)
  return out


def _first(messages: list[dict], key: str):
  return next((m[key] for m in messages if key in m), None)


def _verdict(trusted: list[dict], account: list[dict], checked: bool, timed_out: bool, limits: Limits,
             stderr: str) -> tuple[str, str]:
  """(status, reason). `passed` from the trusted channel alone (or, for a whole program, its own
  account); the other statuses and the reasons may come from the program's account, which it could
  forge, to no gain."""
  exits = _first(trusted, "exits") or {}
  if checked:
    passed = _first(trusted, "verdict") == "passed"
  else:
    passed = any(m.get("done") is True for m in account) and exits.get("program") == {"code": 0}
  if passed:
    return "passed", ""
  if timed_out:
    return "timeout", f"killed after {limits.seconds:g}s wall clock"
  if any(e.get("signal") == signal.SIGXCPU for e in exits.values() if isinstance(e, dict)):
    return "timeout", f"killed after {limits.cpu_seconds}s of CPU time"
  errors = [m for m in account if isinstance(m.get("error"), str)]
  checker_reason = str(_first(trusted, "reason") or "")
  if any(m.get("kind") == "memory" for m in errors) or "MemoryError" in checker_reason:
    return "memory", f"MemoryError: over the {limits.memory_bytes / 2**20:g} MiB address-space limit"
  refused = next((m["error"] for m in errors if m.get("kind") == "refused"), None)
  if refused:
    return "refused", refused[:300]
  top = [m["error"] for m in errors if m.get("at") == "top"]  # the program failed before the checker's calls
  for reason in (top[0] if top else "", checker_reason, errors[0]["error"] if errors else ""):
    if reason:
      return "failed", reason[:300]
  program = exits.get("program") or {}
  if "signal" in program:
    return "failed", f"killed by signal {signal.Signals(program['signal']).name}"
  lines = [line for line in stderr.splitlines() if line.strip()]
  return "failed", (lines[-1][:300] if lines else "exited before the program finished")


def _memory_file(text: str) -> int:
  fd = os.memfd_create("lmtiny-sandbox-checker")
  os.write(fd, text.encode("utf-8"))
  os.lseek(fd, 0, os.SEEK_SET)
  return fd


def _config(program: str, checker: str | None, limits: Limits, root: str, fds: dict[str, int]) -> dict:
  return {"program": program, "checked": checker is not None, "root": root, "libraries": list(_libraries()),
          "memory_bytes": limits.memory_bytes, "cpu_seconds": limits.cpu_seconds, "file_bytes": limits.file_bytes,
          "work_bytes": limits.disk_bytes, "allow_unisolated": limits.allow_unisolated_code,
          "refuse_user_namespaces": os.environ.get(REFUSE_USERNS_ENV, "") not in ("", "0"),
          "trusted_fd": fds["trusted"], "report_fd": fds["account"], "checker_fd": fds["checker"]}


def _start(config: dict, fds: dict[str, int]) -> subprocess.Popen:
  proc = subprocess.Popen([sys.executable, "-I", "-S", "-X", "utf8", CHILD], stdin=subprocess.PIPE,
                          stdout=fds["stdout"], stderr=fds["stderr"], cwd=config["root"], env=_env(),
                          pass_fds=(fds["trusted"], fds["account"], fds["checker"]), start_new_session=True)
  try:
    with proc.stdin:
      proc.stdin.write(json.dumps(config).encode())
  except BrokenPipeError:
    pass  # it died at start: its stderr says why
  return proc


def _run(program: str, checker: str | None, limits: Limits) -> SandboxResult:
  directory = tempfile.mkdtemp(prefix="lmtiny-sandbox-")  # the sandbox's root is mounted here (unisolated: its cwd)
  pipes = {name: os.pipe() for name in ("stdout", "stderr", "trusted", "account")}
  # the tests go to the checker alone, through a file of their own: the program's memory never holds them
  theirs = {"checker": _memory_file(checker or ""), **{name: w for name, (_, w) in pipes.items()}}
  try:
    t0 = time.monotonic()
    try:
      proc = _start(_config(program, checker, limits, directory, theirs), theirs)
    finally:
      for fd in theirs.values():
        os.close(fd)
    caps = {"stdout": limits.output_bytes, "stderr": limits.output_bytes, "trusted": _MESSAGE_BYTES,
            "account": _MESSAGE_BYTES}
    streams, timed_out = _collect(proc, {n: r for n, (r, _) in pipes.items()}, caps, t0 + limits.seconds)
    _kill_group(proc)  # anything left in its group; the kernel already took the rest of its PID namespace
    seconds = time.monotonic() - t0
  finally:
    for read_end, _ in pipes.values():
      os.close(read_end)
    shutil.rmtree(directory, ignore_errors=True)
  return _result({n: bytes(b) for n, b in streams.items()}, checker is not None, timed_out, limits, seconds)


def _result(streams: dict[str, bytes], checked: bool, timed_out: bool, limits: Limits,
            seconds: float) -> SandboxResult:
  trusted = _messages(streams["trusted"])
  why = _first(trusted, "unavailable")
  if why is not None:
    raise _unavailable(str(why))
  stderr = _text(streams["stderr"], limits.output_bytes)
  if _first(trusted, "isolation") is None and not timed_out:  # our fault, not the program's: none of it ran
    lines = stderr.strip().splitlines()
    raise RunFailed(f"the code sandbox did not start: {lines[-1][:300] if lines else 'no error printed'}")
  status, reason = _verdict(trusted, _messages(streams["account"]), checked, timed_out, limits, stderr)
  state, arch = str(_first(trusted, "isolation") or "setup did not finish"), _first(trusted, "seccomp")
  isolated = state == "namespaces"
  return SandboxResult(status, reason, _text(streams["stdout"], limits.output_bytes), stderr, seconds,
                       "namespace" if isolated else f"host ({state})",
                       f"{state} + " + (f"seccomp ({arch})" if arch else "no seccomp filter (no syscall table here)"))


def run_checked(program: str, checker: str, limits: Limits = Limits()) -> SandboxResult:
  """Runs `program`, then `checker` against it (`__program__.<function>(...)` calls the program's
  functions with data); passed iff the checker ran to its end. Raises SandboxUnavailable where the
  kernel cannot isolate, RunFailed where the sandbox itself did not start; never for what the code does."""
  return _run(program, checker, limits)


def run_python(source: str, limits: Limits = Limits()) -> SandboxResult:
  """Runs `source` as __main__; passed iff it ran to its end by its own account (see the module's
  docstring: not a verdict on code that wants to pass). Raises as run_checked does."""
  return _run(source, None, limits)


def run_many(sources: Sequence[str], limits: Limits = Limits(), workers: int = 2,
             checkers: Sequence[str] | None = None) -> list[SandboxResult]:
  """run_python (or, with `checkers`, run_checked) over `sources`, `workers` at a time (they wait
  on the kernel, not the GIL)."""
  jobs = list(zip(sources, checkers if checkers is not None else [None] * len(sources)))
  run = lambda job: _run(job[0], job[1], limits)  # noqa: E731
  if workers <= 1 or len(jobs) <= 1:
    return [run(job) for job in jobs]
  with ThreadPoolExecutor(max_workers=workers) as pool:
    return list(pool.map(run, jobs))


def check_isolation(limits: Limits = Limits()) -> str:
  """How code would run (SandboxResult.isolation), or SandboxUnavailable before anything is scored."""
  return run_python("pass", dataclasses.replace(limits, seconds=max(limits.seconds, 10.0))).isolation
