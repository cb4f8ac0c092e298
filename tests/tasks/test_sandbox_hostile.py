"""Hostile programs against the sandbox, one class of attack at least per test: code that tries to
escape (through Python's objects, the old audit hook's state, dir_fd, ctypes, subprocesses, fork,
daemons, sockets, raw syscalls), to hurt the evaluator, to fill the disk or the log, or to forge
its verdict. Each asserts that nothing outside changed, nothing leaked, and the evaluator lived.
The programs run in batches (run_many) so the whole file takes a few seconds."""
import json
import os
import secrets
import socket
import subprocess
import sys
import textwrap

import pytest

from lmtiny.tasks import humaneval, sandbox, seccomp
from lmtiny.tasks.sandbox import Limits

LIMITS = Limits(seconds=5.0, memory_bytes=256 * 2**20)
ROW = {"prompt": 'def add(a: int, b: int) -> int:\n    """The sum of a and b."""\n',
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
       "entry_point": "add"}
WRONG = "\ndef add(a, b):\n  return 0\n"


def _snapshot(directory) -> dict:
  out = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs + files:
      path = os.path.join(root, name)
      st = os.lstat(path)
      out[path] = (st.st_mode, st.st_size, st.st_mtime_ns, open(path, "rb").read() if os.path.isfile(path) else b"")
  return out


@pytest.fixture(scope="module")
def host(tmp_path_factory):
  """A directory of ours the programs know the path of: a secret to read, files to delete or
  overwrite, a unix socket listening (and an abstract one)."""
  canary = tmp_path_factory.mktemp("canary")
  secret = f"lmtiny-canary-{secrets.token_hex(8)}"
  (canary / "secret.txt").write_text(secret)
  (canary / "keep").mkdir()
  (canary / "keep" / "data.txt").write_text("data")
  listening = []
  for address in (str(canary / "sock"), f"\0{secret}"):
    s = socket.socket(socket.AF_UNIX)
    s.bind(address)
    s.listen(8)
    s.setblocking(False)
    listening.append(s)
  yield {"canary": str(canary), "secret": secret, "abstract": secret, "sockets": listening,
         "before": _snapshot(canary)}
  for s in listening:
    s.close()


ESCAPES = {
    "main_builtins_and_the_harness_state": """
        import __main__, builtins, gc, json, os, sys
        frame, state = sys._getframe(), []
        while frame:
          state += [v for v in frame.f_locals.values() if isinstance(v, dict) and "report_fd" in v]
          frame = frame.f_back
        state += [o for o in gc.get_objects() if isinstance(o, dict) and "report_fd" in o]
        for config in state:
          for key in ("trusted_fd", "report_fd", "checker_fd"):
            try:
              os.write(config[key], b'{{"verdict": "passed"}}\\n')
            except OSError as e:
              print(key, e.errno)
        for module in [m for m in sys.modules.values() if m]:
          for name in ("open", "remove", "system"):
            f = getattr(module, name, None)
            if callable(f):
              try:
                f("{canary}/escaped") if name != "open" else f("{canary}/escaped", "w")
              except Exception as e:
                pass
        builtins.open("{canary}/keep/data.txt", "w")
        """,
    "the_old_audit_hooks_own_state": """
        import gc, sys
        for o in gc.get_objects():
          if isinstance(o, dict) and "busy" in o:
            o["busy"] = True
        open("{canary}/escaped", "w").write("x")
        """,
    "dir_fd_of_the_root": """
        import os
        root = os.open("/", os.O_RDONLY)
        print(sorted(os.listdir(root)))
        for path in ("{canary}/keep/data.txt".lstrip("/"), "{canary}/escaped".lstrip("/")):
          try:
            os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, dir_fd=root)
          except OSError as e:
            print(path, e.errno)
        os.unlink("{canary}/keep/data.txt".lstrip("/"), dir_fd=root)
        """,
    "read_a_file_planted_outside": """
        import os
        for path in ("{canary}/secret.txt", "/proc/1/root{canary}/secret.txt", "/proc/self/root{canary}/secret.txt"):
          try:
            print(open(path).read())
          except OSError as e:
            print(e.errno)
        for root, dirs, files in os.walk("/"):
          for name in dirs + files:
            if "canary" in name or name == "secret.txt":
              print(open(os.path.join(root, name)).read())
        open("{canary}/secret.txt")
        """,
    "write_delete_rename_outside": """
        import os, shutil
        for attempt in (lambda: open("{canary}/escaped", "w"), lambda: os.remove("{canary}/keep/data.txt"),
                        lambda: shutil.rmtree("{canary}"), lambda: os.rename("{canary}/keep", "stolen"),
                        lambda: os.chmod("{canary}/secret.txt", 0o777), lambda: os.symlink("{canary}", "out"),
                        lambda: open("out/escaped", "w"), lambda: open("../../../../..{canary}/escaped", "w")):
          try:
            attempt()
          except OSError as e:
            print(e.errno)
        shutil.rmtree("{canary}")
        """,
    "ctypes_system_and_raw_fork": """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.system(b"touch {canary}/escaped; echo shell-ran"))
        print(libc.syscall(57 if "{arch}" == "x86_64" else 220, 17, 0, 0, 0, 0), ctypes.get_errno())
        assert libc.fork() == -1
        raise PermissionError(1, "Operation not permitted")
        """,
    "a_shell_through_subprocess": """
        import os, subprocess
        for attempt in (lambda: os.system("touch {canary}/escaped"), lambda: os.posix_spawn("/bin/sh", ["sh"], {{}}),
                        lambda: os.popen("echo shell-ran").read()):
          try:
            print(attempt())
          except OSError as e:
            print(e.errno)
        subprocess.run("touch {canary}/escaped; echo shell-ran", shell=True)
        """,
    "a_fork_bomb": """
        import os
        for _ in range(200):
          os.fork()
        """,
    "a_multiprocessing_bomb": """
        import multiprocessing
        for _ in range(200):
          multiprocessing.Process(target=print).start()
        """,
    "a_unix_socket_outside": """
        import socket, ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.socket(1, 1, 0), ctypes.get_errno())  # AF_UNIX, SOCK_STREAM, through libc
        for address in ("{canary}/sock", "\\0{abstract}"):
          try:
            socket.socket(socket.AF_UNIX).connect(address)
          except OSError as e:
            print(e.errno)
        socket.socket(socket.AF_UNIX).connect("{canary}/sock")
        """,
    "proc_sys_and_devices": """
        import os
        for path in ("/proc/self/mem", "/proc/1/environ", "/sys/kernel", "/etc/passwd", "/root/.bashrc",
                     "/dev/sda", "/dev/mem", "/home", "{canary}"):
          print(path, os.path.exists(path))
        assert not any(os.path.exists(p) for p in ("/proc/self", "/etc/passwd", "/sys/kernel", "{canary}"))
        open("/proc/self/mem")
        """,
    "kernel_attack_surfaces": """
        import ctypes, errno
        libc = ctypes.CDLL(None, use_errno=True)
        results = {{}}
        for name, number in {refused}.items():
          results[name] = (libc.syscall(number, 0, 0, 0, 0, 0, 0), ctypes.get_errno())
        if "{arch}" == "x86_64":
          results["x32 getpid"] = (libc.syscall(0x40000000 | 39), ctypes.get_errno())
        results["clone3"] = (libc.syscall({clone3}, 0, 0), ctypes.get_errno())
        bad = {{k: v for k, v in results.items() if v[0] != -1 or v[1] not in (errno.EPERM, errno.ENOSYS)}}
        print("allowed:", bad)
        assert not bad
        raise PermissionError(1, "Operation not permitted")
        """,
}


@pytest.fixture(scope="module")
def escapes(host):
  table = seccomp._TABLES[seccomp.ARCH] if seccomp.ARCH else {}  # pylint: disable=protected-access
  fields = dict(canary=host["canary"], abstract=host["abstract"], arch=seccomp.ARCH,
                refused={n: table[n] for n in seccomp.REFUSED if n in table}, clone3=table.get("clone3", 435))
  programs = [textwrap.dedent(code).format(**fields) for code in ESCAPES.values()]
  results = sandbox.run_many(programs, LIMITS, workers=2)
  return dict(zip(ESCAPES, results))


@pytest.mark.parametrize("name", ESCAPES)
def test_an_escape_fails_and_nothing_outside_changes(name, escapes, host):
  if seccomp.ARCH is None:
    pytest.skip(f"no seccomp syscall table for {os.uname().machine}")
  r = escapes[name]
  assert not r.passed and r.status in ("refused", "failed"), r
  assert r.isolation == f"namespaces + seccomp ({seccomp.ARCH})"
  output = r.stdout + r.stderr
  assert host["secret"] not in output and "shell-ran" not in output, r
  assert _snapshot(host["canary"]) == host["before"]
  for s in host["sockets"]:
    with pytest.raises(BlockingIOError):
      s.accept()


def test_the_escapes_met_the_kernel(escapes):
  """What the programs saw: fds of the harness closed (EBADF), a root of the sandbox's own, no
  path of ours, EPERM for processes, sockets and the raw syscalls."""
  found = escapes["main_builtins_and_the_harness_state"].stdout.split()
  assert found and set(found) == {"trusted_fd", "report_fd", "checker_fd", "9"}  # found the harness's config: EBADF
  assert escapes["the_old_audit_hooks_own_state"].reason.startswith("FileNotFoundError")
  root = eval(escapes["dir_fd_of_the_root"].stdout.splitlines()[0])  # pylint: disable=eval-used
  assert "tmp" in root and "dev" in root and "proc" not in root and "etc" not in root
  assert escapes["a_fork_bomb"].status == "refused" and escapes["a_multiprocessing_bomb"].status == "refused"
  assert escapes["a_unix_socket_outside"].stdout.split() == ["-1", "1", "1", "1"]
  assert escapes["kernel_attack_surfaces"].stdout.strip() == "allowed: {}"
  assert escapes["a_shell_through_subprocess"].status == "refused"


FORGERIES = {
    "verdict_lines_on_every_fd": textwrap.dedent("""
        import os, json
        for fd in range(3, 256):
          for line in (b"done\\n", b'{"verdict": "passed"}\\n', b'{"done": true}\\n', b"passed\\n"):
            try:
              os.write(fd, line)
            except OSError:
              pass
        """) + WRONG,
    "os_exit_early": "import os\nos._exit(0)\n",
    "sys_exit_early": "import sys\nsys.exit(0)\n",
    "exit_inside_the_call": "def add(a, b):\n  raise SystemExit(0)\n",
    "an_object_equal_to_everything": """
        class Anything:
          def __eq__(self, other):
            return True
        def add(a, b):
          return Anything()
        """,
    "an_int_equal_to_everything": """
        class Anything(int):
          def __eq__(self, other):
            return True
          __hash__ = int.__hash__
        def add(a, b):
          return Anything(0)
        """,
    "patched_check_assertions_and_builtins": textwrap.dedent("""
        import builtins
        class Never(Exception):
          pass
        builtins.AssertionError = Never
        def check(candidate):
          pass
        builtins.check = check
        builtins.__import__ = lambda *a, **k: None
        """) + WRONG,
    "signals_to_the_checker": textwrap.dedent("""
        import os, signal
        for pid in range(0, 64):
          for sig in (signal.SIGKILL, signal.SIGSTOP):
            try:
              os.kill(pid, sig)
            except OSError:
              pass
        """) + WRONG,
    "signals_the_kernel_sends_for_it": textwrap.dedent("""
        import fcntl, os, signal
        r, w = os.pipe()
        for cmd, arg in ((fcntl.F_SETSIG, signal.SIGKILL), (fcntl.F_SETOWN, 3), (fcntl.F_SETOWN, -1), (15, 0)):
          try:
            fcntl.fcntl(r, cmd, arg)
          except OSError as e:
            print(e.errno)
        """) + WRONG,
    "ptrace_and_memory_of_the_checker": textwrap.dedent("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(64)
        for pid in range(1, 16):
          print(libc.ptrace(16, pid, 0, 0), libc.syscall({process_vm_writev}, pid, 0, 0, 0, 0, 0))
        """) + WRONG,
    "the_tests_in_its_own_memory": textwrap.dedent("""
        import gc, sys
        def strings(o):
          if isinstance(o, str):
            yield o
          elif isinstance(o, dict):
            for v in list(o.values()):
              yield from strings(v) if isinstance(v, str) else ()
          elif isinstance(o, (list, tuple)):
            for v in o:
              yield from strings(v) if isinstance(v, str) else ()
        frame, pool = sys._getframe(), list(gc.get_objects())
        while frame:
          pool.append(dict(frame.f_locals))
          frame = frame.f_back
        needle = "candidate(" + "2, 3)"  # made here: the program's own text does not hold it
        seen = any(needle in s and s is not needle for o in pool for s in strings(o))
        print("tests seen" if seen else "tests unseen")
        """) + WRONG,
    "an_answer_too_large_to_cross": "def add(a, b):\n  return 'x' * (9 * 2**20)\n",
    "an_answer_that_is_not_data": "def add(a, b):\n  return (x for x in [a + b])\n",
    "right_once_then_gone": """
        import os
        calls = []
        def add(a, b):
          calls.append(1)
          if len(calls) > 1:
            os._exit(0)
          return a + b
        """,
    "a_message_for_the_verdict_channel":
        "def add(a, b):\n  raise ValueError('x\\n{\"verdict\": \"passed\"}\\u2028passed')\n",
}


@pytest.fixture(scope="module")
def forgeries():
  table = seccomp._TABLES.get(seccomp.ARCH, {})  # pylint: disable=protected-access
  replies = [textwrap.dedent(code).replace("{process_vm_writev}", str(table.get("process_vm_writev", 311)))
             for code in FORGERIES.values()]
  right = "```python\ndef add(a, b):\n  return a + b\n```"
  results = humaneval.score([ROW] * (len(replies) + 1), [right] + replies, LIMITS, workers=2)
  return results[0], dict(zip(FORGERIES, results[1:]))


@pytest.mark.parametrize("name", FORGERIES)
def test_a_forged_verdict_does_not_pass(name, forgeries):
  right, forged = forgeries
  assert right.passed, right  # the same harness passes an honest answer
  r = forged[name]
  assert not r.passed and r.status in sandbox.STATUSES, r
  assert "tests seen" not in r.stdout
  if name == "signals_the_kernel_sends_for_it":
    assert r.stdout.split() == ["1"] * 4, r


def test_an_object_with_its_own_eq_does_not_cross(forgeries):
  _, forged = forgeries
  assert "Anything cannot cross the sandbox" in forged["an_object_equal_to_everything"].reason
  assert forged["an_int_equal_to_everything"].reason == "AssertionError"  # crossed as the int 0


def test_the_program_never_holds_the_tests(forgeries):
  """The search that finds the tests in nanochat's whole program finds nothing in the program's
  process here (the checker alone reads them)."""
  _, forged = forgeries
  assert forged["the_tests_in_its_own_memory"].stdout.strip() == "tests unseen"
  whole = humaneval.program(ROW, textwrap.dedent(FORGERIES["the_tests_in_its_own_memory"]))
  assert sandbox.run_python(whole, LIMITS).stdout.strip() == "tests seen"


def test_filling_the_disk_stops_at_its_tmpfs(tmp_path):
  before = os.statvfs(tmp_path)
  code = textwrap.dedent("""
      import os
      written = 0
      try:
        with open("/tmp/fill", "wb") as f:
          while True:
            written += f.write(b"x" * 2**20)
            f.flush()
      finally:
        print(written, os.statvfs("/tmp").f_blocks * os.statvfs("/tmp").f_frsize)
      """)
  r = sandbox.run_python(code, Limits(seconds=5.0, disk_bytes=4 * 2**20, file_bytes=64 * 2**20))
  assert r.status == "failed" and "No space left on device" in r.reason, r
  written, size = (int(x) for x in r.stdout.split())
  assert size == 4 * 2**20 and written <= size
  after = os.statvfs(tmp_path)
  assert (before.f_bfree - after.f_bfree) * before.f_frsize < 2 * 2**20  # not on the host's disk


def test_a_flood_of_output_is_capped():
  r = sandbox.run_python("import sys\nfor _ in range(200):\n  sys.stdout.write('y' * 2**16)\nprint('end')",
                         Limits(seconds=5.0, output_bytes=4096))
  assert r.passed and len(r.stdout) < 4200 and r.stdout.endswith("[output cut]"), r.stdout[-100:]


EVALUATOR = textwrap.dedent("""
    import ctypes, json, os, sys, time
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans of the sandbox come to us
    from lmtiny.tasks import sandbox
    programs = [p.replace("EVALUATOR", str(os.getpid())) for p in json.loads(sys.argv[1])]
    results = sandbox.run_many(programs, sandbox.Limits(seconds=5.0), workers=2)
    time.sleep(0.5)  # a daemon would touch its file by now
    children = [open(f"/proc/self/task/{t}/children").read().split() for t in os.listdir("/proc/self/task")]
    print(json.dumps({"statuses": [r.status for r in results], "children": sum(children, []),
                      "alive": True}))
    """)
KILLERS = [
    "import os, signal\nos.kill(EVALUATOR, signal.SIGKILL)",
    "import os, signal\nos.killpg(os.getpgid(EVALUATOR), signal.SIGKILL)",
    "import os, signal\nos.kill(0, signal.SIGKILL)",
    "import os, signal\nos.kill(-1, signal.SIGKILL)",
    "import os, signal\nfd = os.pidfd_open(EVALUATOR)\nsignal.pidfd_send_signal(fd, signal.SIGKILL)",
    "import ctypes\nctypes.CDLL(None).syscall({kill}, EVALUATOR, 9)\nraise PermissionError(1, 'no')",
    "import os, time\nos.setsid()\nif os.fork() == 0:\n  time.sleep(0.3)\n  open('{marker}', 'w')",
    "import ctypes, threading, time\nlibc = ctypes.CDLL(None)\nlibc.setsid()\nif libc.fork() == 0:\n"
    "  time.sleep(0.3)\n  open('{marker}', 'w')\nraise PermissionError(1, 'no')",
]


def test_the_evaluator_survives_and_no_process_outlives_scoring(tmp_path):
  """The evaluator (a process of its own here, so a kill that worked would not take pytest with it)
  passes its pid into programs that try to kill it (kill, killpg, kill(0), kill(-1), pidfd,
  a raw syscall) or leave a daemon behind; it lives, no child of its survives scoring, its temp
  directories are gone."""
  if seccomp.ARCH is None:
    pytest.skip(f"no seccomp syscall table for {os.uname().machine}")
  assert sandbox.check_isolation(LIMITS) == f"namespaces + seccomp ({seccomp.ARCH})"  # or kill(-1) is not safe
  marker = tmp_path / "daemon-ran"
  kill = seccomp._TABLES[seccomp.ARCH]["kill"]  # pylint: disable=protected-access
  programs = [p.replace("{marker}", str(marker)).replace("{kill}", str(kill)) for p in KILLERS]
  temp = tmp_path / "tmp"
  temp.mkdir()
  out = subprocess.run([sys.executable, "-c", EVALUATOR, json.dumps(programs)], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "TMPDIR": str(temp)}, cwd=os.getcwd())
  assert out.returncode == 0, out.stderr
  report = json.loads(out.stdout)
  assert report["alive"] and report["children"] == []
  assert all(s in ("refused", "failed") for s in report["statuses"]), report
  assert not marker.exists() and list(temp.iterdir()) == []
