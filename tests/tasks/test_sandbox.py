"""The sandbox: what it lets through (a correct solution), what fails (a wrong one), the limits it
kills at, the checker's verdict, the data that crosses, and the refusal where the kernel cannot
isolate. Hostile programs: tests/tasks/test_sandbox_hostile.py."""
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from lmtiny import eval as eval_verb
from lmtiny.errors import UserError
from lmtiny.tasks import sandbox, sandbox_wire as wire, seccomp
from lmtiny.tasks.sandbox import Limits, run_checked, run_python

LIMITS = Limits(seconds=3.0, memory_bytes=256 * 2**20)
SOLUTION = textwrap.dedent("""
    def add(a, b):
      return a + b

    def check(candidate):
      assert candidate(2, 3) == 5
      assert candidate(-1, 1) == 0

    check(add)
    """)
ADD = "def add(a, b):\n  return a + b\n"
CHECK_ADD = ("def check(candidate):\n  assert candidate(2, 3) == 5\n  assert candidate(-1, 1) == 0\n\n"
             "check(__program__.add)\n")


def test_a_correct_solution_passes_and_a_wrong_one_fails():
  good = run_python(SOLUTION, LIMITS)
  assert good.status == "passed" and good.passed and good.reason == ""
  assert good.network == "namespace" and good.isolation == f"namespaces + seccomp ({seccomp.ARCH})"
  bad = run_python(SOLUTION.replace("a + b", "a - b"), LIMITS)
  assert bad.status == "failed" and bad.reason.startswith("AssertionError")


def test_the_checker_calls_the_program_and_gives_the_verdict():
  good, bad, missing, raising = sandbox.run_many(
      [ADD, ADD.replace("a + b", "a - b"), "x = 1", "def add(a, b):\n  return a / 0"], LIMITS,
      checkers=[CHECK_ADD] * 4)
  assert good.passed, good
  assert bad.status == "failed" and bad.reason == "AssertionError", bad
  assert missing.status == "failed" and "name 'add' is not defined" in missing.reason
  assert raising.status == "failed" and "ZeroDivisionError" in raising.reason


def test_values_cross_as_the_same_plain_data():
  values = [None, True, False, 0, -7, 10**40, 1.5, float("inf"), "é\n\u2028", b"\x00\xff", [1, [2]], (1, "a"),
            {"k": (1, 2), 3: None}, {1, 2}, frozenset({"x"})]
  program = "def echo(x):\n  return x\n"
  checker = "".join(f"v = {v!r}\nr = __program__.echo(v)\nassert r == v and type(r) is type(v), (v, r)\n"
                    for v in values)
  checker += "import math\nassert math.isnan(__program__.echo(float('nan')))\n"
  r = run_checked(program, checker.replace("inf", "float('inf')"), LIMITS)
  assert r.passed, r
  for value in values:
    assert wire.decode(wire.encode(value)) == value
  for bad in (["x"], ["i", 3], ["l", "abc"], ["d", [[1]]], ["s"], "N", ["N", 1]):
    with pytest.raises(wire.WireError):
      wire.decode(bad)
  with pytest.raises(TypeError):
    wire.encode(object())


def test_output_is_kept_and_capped():
  r = run_python("print('hello')\nimport sys\nsys.stderr.write('x' * 100000)", Limits(output_bytes=1000))
  assert r.stdout == "hello\n" and r.stderr.endswith("[output cut]") and len(r.stderr) < 1100


@pytest.mark.parametrize("code, printed", [
    ("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)", None),
    ("import socket\ntry:\n  socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
     "except OSError as e:\n  print(e.errno)", "1"),
    ("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)", None),
])
def test_network_is_refused(code, printed):
  """A server listens on this machine; the sandboxed code cannot reach it: the kernel refuses its
  socket (EPERM). A refusal the program catches is its business: it saw the error and went on."""
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(1)
  server.setblocking(False)
  try:
    r = run_python(code.format(port=server.getsockname()[1]), LIMITS)
    with pytest.raises(BlockingIOError):
      server.accept()  # no connection ever arrived
  finally:
    server.close()
  if printed is None:
    assert r.status == "refused" and "Operation not permitted" in r.reason, r
  else:
    assert r.stdout.split() == [printed], r


def test_its_own_directory_is_a_tmpfs_and_the_temp_directory_goes(tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  code = ("import os, tempfile\nopen('a.txt', 'w').write('x')\nfd, p = tempfile.mkstemp()\nos.close(fd)\n"
          "os.remove(p)\nprint(os.getcwd(), os.environ['HOME'], tempfile.gettempdir(), sorted(os.listdir('/')))")
  r = run_python(code, LIMITS)
  assert r.status == "passed", r
  assert r.stdout.split(maxsplit=3)[:3] == ["/tmp", "/tmp", "/tmp"]
  root = set(eval(r.stdout.split(maxsplit=3)[3]))  # pylint: disable=eval-used
  assert {"tmp", "dev"} <= root and not root & {"proc", "sys", "etc", "run", "var", "boot"}
  assert list(tmp_path.iterdir()) == []  # the mount point of its root, removed


@pytest.mark.parametrize("code", ["import subprocess\nsubprocess.run(['true'])", "import os\nos.fork()",
                                  "import os\nos.execv('/bin/true', ['true'])",
                                  "import os, signal\nos.kill(1, signal.SIGTERM)"])
def test_processes_and_signals_are_refused(code):
  r = run_python(code, LIMITS)
  assert r.status == "refused" and "Operation not permitted" in r.reason, r


def test_an_infinite_loop_is_killed_within_the_limit():
  t0 = time.perf_counter()
  r = run_python("while True:\n  pass", Limits(seconds=1.0))
  assert r.status == "timeout" and time.perf_counter() - t0 < 3.0 and r.seconds < 2.0


def test_a_sleeping_program_is_killed_at_the_wall_clock_limit():
  r = run_python("import time\ntime.sleep(60)", Limits(seconds=1.0))
  assert r.status == "timeout" and "wall clock" in r.reason and r.seconds < 2.0


def test_a_program_that_never_answers_the_checker_times_out():
  r = run_checked("import time\ntime.sleep(60)", CHECK_ADD, Limits(seconds=1.0))
  assert r.status == "timeout" and r.seconds < 2.0


def test_the_cpu_limit_is_set_in_the_child():
  r = run_python("import resource\nprint(resource.getrlimit(resource.RLIMIT_CPU)[0], "
                 "resource.getrlimit(resource.RLIMIT_AS)[0])", Limits(seconds=2.5, memory_bytes=300 * 2**20))
  assert r.status == "passed" and r.stdout.split() == ["4", str(300 * 2**20)]


@pytest.mark.parametrize("code", ["x = bytearray(4 * 2**30)", "x = []\nwhile True:\n  x.append(' ' * 10**6)"])
def test_a_large_allocation_fails(code):
  r = run_python(code, LIMITS)
  assert r.status == "memory" and "256 MiB" in r.reason


@pytest.mark.parametrize("code", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "exit()"])
def test_exiting_before_the_end_is_not_a_pass(code):
  assert run_python(code + "\nassert False", LIMITS).status == "failed"


def test_run_many_keeps_the_order():
  results = sandbox.run_many(["pass", "assert False", "pass"], LIMITS, workers=2)
  assert [r.status for r in results] == ["passed", "failed", "passed"]


def test_the_standard_library_and_its_extension_modules_work():
  code = ("import hashlib, zlib, json, math, decimal, datetime, re, random, threading, collections\n"
          "assert hashlib.md5(b'a').hexdigest() == '0cc175b9c0f1b6a831c399e269772661'\n"
          "assert zlib.decompress(zlib.compress(b'x')) == b'x' and type(decimal.Decimal(1)).__module__ == 'decimal'\n"
          "t = threading.Thread(target=print, args=('thread',))\nt.start()\nt.join()")
  r = run_python(code, LIMITS)
  assert r.passed and r.stdout == "thread\n", r


def test_where_the_kernel_refuses_user_namespaces_nothing_runs(monkeypatch, tmp_path):
  """The kernel refuses unshare (a seccomp filter makes it, as a container profile would): one
  line naming what is missing and the opt-in; with the opt-in the code runs with rlimits and
  seccomp only, and says so."""
  monkeypatch.setenv(sandbox.REFUSE_USERNS_ENV, "1")
  marker = tmp_path / "ran"
  with pytest.raises(sandbox.SandboxUnavailable) as caught:
    run_python(f"open({str(marker)!r}, 'w')", LIMITS)
  message = str(caught.value)
  assert isinstance(caught.value, UserError) and "\n" not in message
  assert "user namespaces" in message and "Operation not permitted" in message
  assert "--allow-unisolated-code" in message and not marker.exists()
  with pytest.raises(sandbox.SandboxUnavailable):
    sandbox.check_isolation(LIMITS)
  allowed = Limits(seconds=3.0, allow_unisolated_code=True)
  r = run_python("import os\nprint(os.getcwd())\nos.fork()", allowed)
  assert r.status == "refused" and r.network.startswith("host (none: unshare") and r.isolation.endswith(
      f"seccomp ({seccomp.ARCH})"), r
  assert os.path.basename(r.stdout.strip()).startswith("lmtiny-sandbox-") and not os.path.exists(r.stdout.strip())
  assert sandbox.check_isolation(allowed).startswith("none: unshare")
  monkeypatch.delenv(sandbox.REFUSE_USERNS_ENV)
  assert sandbox.check_isolation(LIMITS) == f"namespaces + seccomp ({seccomp.ARCH})"


def test_the_namespaces_leave_no_route_out():
  """In the namespaces alone (no seccomp filter: here a socket may be made), the only network
  device is a loopback that is down."""
  code = textwrap.dedent(f"""
      import socket, sys
      sys.path.append({os.path.dirname(sandbox.CHILD)!r})
      import isolation
      isolation.enter_namespaces()
      try:
        socket.create_connection(("127.0.0.1", 9), timeout=1)
      except OSError as e:
        print(e.errno)
      """)
  out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=30)
  assert out.returncode == 0, out.stderr
  assert int(out.stdout) in (101, 99)  # ENETUNREACH / EADDRNOTAVAIL: loopback is down


@pytest.mark.parametrize("arch, header", [("x86_64", "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
                                          ("aarch64", "/usr/include/asm-generic/unistd.h")])
def test_the_syscall_tables_match_the_kernel_headers(arch, header):
  assert len(seccomp.program(own_pid=2, arch=arch)) % 8 == 0  # every jump within classic BPF's reach
  if not os.path.exists(header):
    pytest.skip(f"no {header} (the kernel's headers) on this machine")
  text = open(header).read()
  for name, number in seccomp._TABLES[arch].items():  # pylint: disable=protected-access
    found = re.search(rf"#define __NR(?:3264)?_{name}\s+(\d+)", text)
    assert found and int(found.group(1)) == number, (arch, name, number)


def test_eval_refuses_humaneval_in_one_line_before_loading_anything(monkeypatch, tmp_path, capsys):
  """`python -m lmtiny.eval --chat` on a kernel without user namespaces: exit 2, one `error:` line
  naming the flag, before the run is even looked at (here it does not exist)."""
  monkeypatch.setenv(sandbox.REFUSE_USERNS_ENV, "1")
  run = tmp_path / "run"
  run.mkdir()
  assert eval_verb.main(["--workdir", str(run), "--chat", "--chat-tasks", "humaneval"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: the code sandbox needs unprivileged user namespaces")
  assert "--allow-unisolated-code" in err
  assert eval_verb.parse_args(["--workdir", "x", "--allow-unisolated-code"]).allow_unisolated_code


def test_an_unprivileged_user_gets_the_same_isolation():
  """Run as nobody (setpriv) with the system's interpreter: no root needed for any of it."""
  python = "/usr/bin/python3"
  if os.getuid() != 0 or not os.path.exists(python) or not os.path.exists("/usr/bin/setpriv"):
    pytest.skip("needs root (to become nobody), /usr/bin/setpriv and a system /usr/bin/python3")
  code = ("from lmtiny.tasks import sandbox\n"
          "r = sandbox.run_checked('import os\\ndef uid():\\n  return os.getuid()\\n', "
          "'assert __program__.uid() == 1000')\n"
          "print(r.status, r.isolation)")
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(sandbox.__file__))))
  out = subprocess.run(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I",
                        "-c", f"import sys; sys.path.insert(0, {repo!r})\n{code}"],
                       capture_output=True, text=True, timeout=60, cwd="/")
  assert out.returncode == 0, out.stderr
  assert out.stdout.split(maxsplit=1) == ["passed", f"namespaces + seccomp ({seccomp.ARCH})\n"]
