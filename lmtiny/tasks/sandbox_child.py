"""The sandbox's trusted side inside (lmtiny.tasks.sandbox starts it; nothing imports it).

  python -I -S -X utf8 sandbox_child.py < config.json   # run one program (and its checker)
  python -I -S sandbox_child.py --libraries             # the shared libraries the stdlib loads, as JSON

The processes, each started by the one above it:
  setup    this script: reads its config from stdin, enters new namespaces and pivots into a private
           root (lmtiny.tasks.isolation), reports on the trusted fd, starts `init` and waits for it;
  init     PID 1 of the new PID namespace: starts `program` (and `checker`), waits, reports their
           exits on the trusted fd; when it exits the kernel kills whatever is left in the namespace;
  program  runs the untrusted source, then (with a checker) answers calls to its functions, taking
           arguments and giving results as data only (lmtiny.tasks.sandbox_wire); writes its own
           account (errors, "done") on the report fd, which only the parent's verdict on a whole
           program, and statuses other than passed, listen to;
  checker  reads the trusted checker source (a problem's tests) from its own fd, which no other
           process here reads (so the program's memory never holds the tests), runs it with
           `__program__.<name>` calling the program's functions, and writes the verdict on the
           trusted fd, which `program` never has.
`program` and `checker` keep only their own fds, get rlimits, drop every capability, and run under
the seccomp filter (lmtiny.tasks.seccomp) before any code of theirs runs. Nothing untrusted runs in
`setup` or `init`. Standard library only: -I -S puts nothing else on the path.
"""
import builtins
import ctypes
import fcntl
import json
import os
import resource
import signal
import sys
import traceback

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the stdlib: its names win
import isolation  # noqa: E402  pylint: disable=wrong-import-position
import sandbox_wire as wire  # noqa: E402  pylint: disable=wrong-import-position
import seccomp  # noqa: E402  pylint: disable=wrong-import-position

sys.path.pop()
# the fds the program and the checker see (_confine moves their pipes there)
PROGRAM_REPORT, CALLS, ANSWERS = 3, 4, 5   # the program: its own account; calls in; answers out
VERDICT, CHECKER_SOURCE = 3, 6             # the checker: the trusted channel; its source (also CALLS, ANSWERS)
_FIRST_FREE_FD = 64  # above every number _confine hands out
_MAX_FDS = 256  # open files (and pipes, whose buffers are kernel memory) per process
_REFUSED_ERRNOS = (1, 13, 30)  # EPERM, EACCES, EROFS: what the sandbox answers to what it refuses
# extension modules whose libraries no program here needs (terminals, GUIs, test helpers)
_UNNEEDED = ("_test", "_xx", "xx", "_tkinter", "_curses", "readline", "nis", "ossaudiodev", "_dbm", "_gdbm")


def tell(fd: int, message: dict) -> None:
  """One JSON line (control characters escaped, so a message is exactly one line)."""
  try:
    os.write(fd, json.dumps(message, ensure_ascii=True).encode() + b"\n")
  except OSError:
    pass


def one_line(error: BaseException) -> str:
  text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
  return " ".join(text.split())[:300]


# -- setup -------------------------------------------------------------------------------------

def _binds(config: dict) -> list[str]:
  """The stdlib's directories on sys.path and the libraries it loads; none inside another."""
  paths = sorted({os.path.realpath(p) for p in sys.path if os.path.exists(p)} | set(config["libraries"]))
  kept: list[str] = []
  for path in paths:
    if not any(path.startswith(k + os.sep) for k in kept):
      kept.append(path)
  return kept


def isolate(config: dict) -> str:
  """'namespaces', or (where allowed) 'none: <why>'; exits after one `unavailable` line otherwise."""
  try:
    if config["refuse_user_namespaces"]:  # a test's stand-in for a kernel that refuses them
      if seccomp.ARCH is None:
        raise isolation.IsolationError(1, "unshare: Operation not permitted (simulated)")
      seccomp.install(os.getpid(), refused=("unshare",), threads_only=False)
    isolation.enter_namespaces()
    stdlib = os.path.dirname(os.__file__)
    isolation.build_root(config["root"], _binds(config), config["work_bytes"],
                         hide=(os.path.join(stdlib, "site-packages"),))
    return "namespaces"
  except OSError as e:
    why = e.strerror if isinstance(e, isolation.IsolationError) else one_line(e)
    if not config["allow_unisolated"]:
      tell(config["trusted_fd"], {"unavailable": why})
      sys.exit(3)
    return f"none: {why}"


# -- init --------------------------------------------------------------------------------------

def _describe(status: int | None) -> dict:
  if status is None:
    return {}
  if os.WIFSIGNALED(status):
    return {"signal": os.WTERMSIG(status)}
  return {"code": os.waitstatus_to_exitcode(status)}


def init(config: dict, isolated: bool) -> int:
  isolation.die_with_parent()
  checked = config["checked"]
  calls, answers = (os.pipe(), os.pipe()) if checked else ((-1, -1), (-1, -1))
  keep = {1: 1, 2: 2, config["report_fd"]: PROGRAM_REPORT}
  if checked:
    keep.update({calls[0]: CALLS, answers[1]: ANSWERS})
  program = _start(lambda: run_program(config), keep=keep, cwd=config["work"], config=config, isolated=isolated)
  checker = None
  if checked:
    keep = {config["trusted_fd"]: VERDICT, calls[1]: CALLS, answers[0]: ANSWERS, config["checker_fd"]: CHECKER_SOURCE}
    checker = _start(run_checker, keep=keep, cwd="/" if isolated else config["work"], config=config,
                     isolated=isolated)
    for fd in calls + answers:
      os.close(fd)
  last = checker or program
  statuses: dict[int, int] = {}
  while last not in statuses:
    pid, status = os.wait()
    statuses[pid] = status
  if program not in statuses:  # the checker is done: the program has nothing left to do
    os.kill(program, signal.SIGKILL)
    os.waitpid(program, 0)
  tell(config["trusted_fd"], {"exits": {"program": _describe(statuses.get(program)),
                                        "checker": _describe(statuses.get(checker))}})
  return 0


def _start(role, keep: dict, cwd: str, config: dict, isolated: bool) -> int:
  pid = os.fork()
  if pid:
    return pid
  code = 1
  try:
    _confine(keep, cwd, config, isolated)
    code = role()
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
  finally:
    _flush()
    os._exit(code)  # pylint: disable=protected-access


def _flush() -> None:
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except BaseException:  # pylint: disable=broad-except
      pass


def _confine(keep: dict, cwd: str, config: dict, isolated: bool) -> None:
  """Only the fds in `keep` (moved to their new numbers; stdin /dev/null), limits, no
  capabilities, the seccomp filter: in that order, before the role's code runs."""
  isolation.die_with_parent()
  moved = {old: fcntl.fcntl(old, fcntl.F_DUPFD, _FIRST_FREE_FD) for old in keep}  # clear of the new numbers
  os.dup2(os.open("/dev/null", os.O_RDWR), 0)
  for old, new in keep.items():
    os.dup2(moved[old], new)
  os.closerange(max(keep.values()) + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
  for fd in (1, 2):
    if fd not in keep.values():
      os.dup2(0, fd)
  os.chdir(cwd)
  for kind, value in ((resource.RLIMIT_AS, config["memory_bytes"]), (resource.RLIMIT_CPU, config["cpu_seconds"]),
                      (resource.RLIMIT_FSIZE, config["file_bytes"]), (resource.RLIMIT_CORE, 0),
                      (resource.RLIMIT_NOFILE, _MAX_FDS)):
    resource.setrlimit(kind, (value, value))
  if isolated:
    isolation.drop_capabilities()
  if seccomp.ARCH:
    seccomp.install(os.getpid())


# -- program and checker -------------------------------------------------------------------------

def _kind(error: BaseException) -> str:
  """memory, refused (an OSError the sandbox answers with, or one wrapped in it: URLError) or error."""
  if isinstance(error, MemoryError):
    return "memory"
  seen = 0
  while isinstance(error, BaseException) and seen < 8:
    if isinstance(error, OSError) and error.errno in _REFUSED_ERRNOS:
      return "refused"
    error, seen = getattr(error, "reason", None) or error.__cause__ or error.__context__, seen + 1
  return "error"


def run_program(config: dict, report: int = PROGRAM_REPORT) -> int:
  namespace = {"__name__": "__main__", "__builtins__": builtins}
  try:
    exec(compile(config["program"], "program.py", "exec"), namespace)  # pylint: disable=exec-used
  except SystemExit as e:
    tell(report, {"kind": "error", "at": "top",
                  "error": f"SystemExit: the program exited ({e.code!r}) before it finished"})
    return 1
  except BaseException as e:  # pylint: disable=broad-except
    tell(report, {"kind": _kind(e), "at": "top", "error": one_line(e)})
    traceback.print_exc()
    return 1
  if not config["checked"]:
    tell(report, {"done": True})
    return 0
  serve(namespace, CALLS, ANSWERS, report)
  return 0


def serve(namespace: dict, calls: int, answers: int, report: int) -> None:
  """Answers ["call", name, args, kwargs] with ["return", value] or ["raise", "Type: message"]."""
  while True:
    _flush()  # the program is killed, not exited, once the checker is done: its output goes first
    try:
      message = wire.receive(calls)
    except wire.WireError:
      return
    if message is None:
      return
    try:
      _, name, args, kwargs = message
      if name not in namespace:
        raise NameError(f"name {name!r} is not defined")
      reply = ["return", wire.encode(namespace[name](*wire.decode(args), **wire.decode(kwargs)))]
    except BaseException as e:  # pylint: disable=broad-except
      tell(report, {"kind": _kind(e), "at": name, "error": one_line(e)})
      reply = ["raise", one_line(e)]
    try:
      try:
        wire.send(answers, reply)
      except TypeError as e:  # too large to cross
        wire.send(answers, ["raise", one_line(e)])
    except OSError:  # the checker is gone
      return


class RemoteError(Exception):
  """The program's function raised, answered with something that is not plain data, or is gone."""


class RemoteFunction:
  def __init__(self, name: str, calls: int, answers: int):
    self.name, self._calls, self._answers = name, calls, answers

  def __call__(self, *args, **kwargs):
    try:
      wire.send(self._calls, ["call", self.name, wire.encode(list(args)), wire.encode(kwargs)])
      reply = wire.receive(self._answers)
    except OSError as e:
      raise RemoteError(f"{self.name}: the program is gone ({one_line(e)})") from None
    if reply is None:
      raise RemoteError(f"{self.name}: the program exited before it answered")
    if isinstance(reply, list) and len(reply) == 2 and reply[0] == "return":
      return wire.decode(reply[1])
    if isinstance(reply, list) and len(reply) == 2 and reply[0] == "raise" and isinstance(reply[1], str):
      raise RemoteError(f"{self.name} raised {reply[1][:300]}")
    raise wire.WireError(f"{self.name}: not an answer")

  def __repr__(self):
    return f"<the sandboxed program's {self.name}>"


class Program:
  """`__program__` in the checker: its attributes are the program's functions, called remotely."""

  def __init__(self, calls: int, answers: int):
    self._calls, self._answers = calls, answers

  def __getattr__(self, name: str) -> RemoteFunction:
    if name.startswith("__"):
      raise AttributeError(name)
    return RemoteFunction(name, self._calls, self._answers)


def _read_all(fd: int) -> str:
  chunks = []
  while chunk := os.read(fd, 1 << 20):
    chunks.append(chunk)
  return b"".join(chunks).decode("utf-8")


def run_checker(verdict: int = VERDICT, source: int = CHECKER_SOURCE) -> int:
  namespace = {"__name__": "__main__", "__builtins__": builtins, "__program__": Program(CALLS, ANSWERS)}
  try:
    exec(compile(_read_all(source), "checker.py", "exec"), namespace)  # pylint: disable=exec-used
  except BaseException as e:  # pylint: disable=broad-except
    tell(verdict, {"verdict": "failed", "reason": one_line(e)})
    return 1
  tell(verdict, {"verdict": "passed"})
  return 0


# -- entry ------------------------------------------------------------------------------------

def list_libraries() -> list[str]:
  """Loads every extension module's shared object (without running it) and lists what got loaded."""
  dynload = next((p for p in sys.path if p.endswith("lib-dynload")), None)
  for name in sorted(os.listdir(dynload)) if dynload else ():
    if name.endswith(".so") and not name.startswith(_UNNEEDED):
      try:
        ctypes.CDLL(os.path.join(dynload, name), mode=os.RTLD_LAZY | os.RTLD_LOCAL)
      except OSError:
        pass  # a module whose libraries are missing fails here and in the sandbox alike
  return [p for p in isolation.loaded_libraries() if not (dynload and p.startswith(dynload + os.sep))]


def main(argv: list[str]) -> int:
  if argv[1:] == ["--libraries"]:
    print(json.dumps(list_libraries()))
    return 0
  config = json.loads(sys.stdin.buffer.read())
  isolation.die_with_parent()
  state = isolate(config)
  isolated = state == "namespaces"
  config["work"] = isolation.WORK if isolated else config["root"]
  os.environ.update(HOME=config["work"], TMPDIR=config["work"])
  tell(config["trusted_fd"], {"isolation": state, "seccomp": seccomp.ARCH})
  pid = os.fork()
  if pid == 0:
    code = 1
    try:
      code = init(config, isolated)
    finally:
      os._exit(code)  # pylint: disable=protected-access
  os.waitpid(pid, 0)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
