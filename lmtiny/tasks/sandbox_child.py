"""The sandbox's child process (lmtiny.tasks.sandbox starts it; nothing imports it).

  python -I -S -X utf8 sandbox_child.py DIR REPORT_FD MEMORY_BYTES CPU_SECONDS FILE_BYTES NETNS

Runs DIR/program.py after closing every way out it can, in this order: a new network namespace
(unshare(CLONE_NEWUSER | CLONE_NEWNET) through libc, when NETNS is 1 and the kernel allows it:
the process then sees only a loopback device that is down), resource limits (address space, CPU
time, file size, no core files), then an audit hook that refuses, for the rest of the process:
sockets, starting processes (subprocess, os.system, exec*, spawn*, fork, posix_spawn, pty),
signals to other processes, ctypes, and file system access outside DIR (writes, deletions,
renames, links and mode changes anywhere outside DIR; reads outside DIR and the standard library).
Standard library only: with -I -S nothing but the standard library can be imported.

What it writes to REPORT_FD (one line each): `netns <ok|why not>` at the start, `refused <event>
<detail>` at the first refusal, `done` when the program ran to its end. The parent's verdict
needs `done` and exit status 0, so code that exits early (sys.exit, os._exit) has not passed.
This is a guard against the accidents of generated code, not a wall against an adversary who
writes Python to defeat it; the namespace and the limits are the kernel's.
"""
import os
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
_ALWAYS_REFUSED = ("subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
                   "os.forkpty", "os.kill", "os.killpg", "pty.spawn", "os.startfile", "signal.pthread_kill",
                   "sys.remote_exec")
_REFUSED_PREFIXES = ("socket.", "ctypes.", "_winapi.", "winreg.")
_REFUSED_IMPORTS = ("_posixsubprocess", "_ctypes", "ctypes", "_xxsubinterpreters", "_posixshmem")
# os.* events whose path arguments only read (listing a directory); every other os.* path event changes the
# file system and must stay inside the sandbox's directory
_READ_EVENTS = ("os.listdir", "os.scandir", "os.chdir", "os.getxattr", "os.listxattr", "os.walk", "os.fwalk",
                "glob.glob", "glob.glob/2")
_PATH_ARGS = {"os.rename": 2, "os.link": 2, "os.symlink": 2}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _report(fd: int, line: str) -> None:
  try:
    os.write(fd, (line.replace("\n", " ")[:300] + "\n").encode("utf-8", "replace"))
  except OSError:
    pass


def enter_network_namespace() -> str:
  """'ok', or why a new network namespace could not be entered (the audit hook still refuses
  sockets). Loads libc through ctypes before the hook exists; the hook refuses ctypes afterwards."""
  try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
      return f"unshare failed: {os.strerror(ctypes.get_errno())}"
    return "ok"
  except (OSError, AttributeError, ImportError) as e:
    return f"unshare unavailable: {type(e).__name__}"
  finally:
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith("ctypes.") or m == "_ctypes"]:
      del sys.modules[name]


def set_limits(memory_bytes: int, cpu_seconds: int, file_bytes: int) -> None:
  import resource
  for kind, value in ((resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_CPU, cpu_seconds),
                      (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_CORE, 0)):
    if value >= 0:
      resource.setrlimit(kind, (value, value))


def _roots_for_reading() -> tuple[str, ...]:
  import sysconfig
  paths = sysconfig.get_paths()
  return tuple(sorted({os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib") if paths.get(k)}))


def install_guard(directory: str, fd: int) -> None:
  """The audit hook (refusals raise PermissionError in the code that tried, and the first is reported)."""
  home = os.path.realpath(directory)
  readable = (home, os.path.realpath(__file__)) + _roots_for_reading()  # this file: for tracebacks
  realpath, fspath, join, getcwd = os.path.realpath, os.fsdecode, os.path.join, os.getcwd
  state = {"busy": False, "reported": False}

  def inside(path, roots) -> bool:
    if isinstance(path, int) or path is None:  # an open file descriptor: already allowed when opened
      return True
    full = realpath(join(getcwd(), fspath(path)))
    return any(full == r or full.startswith(r + os.sep) for r in roots)

  def refuse(event, detail):
    if not state["reported"]:
      state["reported"] = True
      _report(fd, f"refused {event} {detail}")
    raise PermissionError(f"sandbox: {event} refused ({detail})")

  def verdict(event, args):
    if event in _ALWAYS_REFUSED or event.startswith(_REFUSED_PREFIXES):
      refuse(event, "not allowed in the sandbox")
    if event == "import" and args and str(args[0]).split(".")[0] in _REFUSED_IMPORTS:
      refuse(event, str(args[0]))
    if event == "open":
      path, mode, flags = (tuple(args) + (None, None, None))[:3]
      writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (isinstance(flags, int) and flags & _WRITE_FLAGS)
      if not inside(path, (home,) if writing else readable):
        refuse(event, f"{'writing' if writing else 'reading'} {fspath(path)} outside the sandbox")
    elif event.startswith(("os.", "shutil.", "glob.")) and args:
      roots = readable if event in _READ_EVENTS else (home,)
      for path in args[:_PATH_ARGS.get(event, 1)]:
        if isinstance(path, (str, bytes, os.PathLike)) and not inside(path, roots):
          refuse(event, f"{fspath(path)} outside the sandbox")

  def hook(event, args):
    if state["busy"]:  # events raised while judging one (realpath's own calls) are ours
      return
    state["busy"] = True
    try:
      verdict(event, args)
    finally:
      state["busy"] = False

  sys.addaudithook(hook)


def main(argv) -> int:
  directory, fd = argv[1], int(argv[2])
  memory_bytes, cpu_seconds, file_bytes, netns = (int(a) for a in argv[3:7])
  _report(fd, "netns " + (enter_network_namespace() if netns else "not requested"))
  set_limits(memory_bytes, cpu_seconds, file_bytes)
  path = os.path.join(directory, "program.py")
  with open(path, encoding="utf-8") as f:
    source = f.read()
  import builtins
  import traceback
  install_guard(directory, fd)
  try:
    code = compile(source, path, "exec")
    exec(code, {"__name__": "__main__", "__builtins__": builtins})  # pylint: disable=exec-used
  except SystemExit as e:
    print(f"SystemExit: the program exited ({e.code!r}) before it finished", file=sys.stderr)
    return 1
  except MemoryError:
    print("MemoryError: the program ran out of memory", file=sys.stderr)
    return 1
  except BaseException:  # the program's own failure: its traceback is the reason
    traceback.print_exc()
    return 1
  _report(fd, "done")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
