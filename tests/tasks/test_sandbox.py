"""The sandbox: what it lets through (a correct solution), what fails (a wrong one), and what it
refuses or kills: network, writes and deletions outside its directory, process creation, runaway
time and memory, and code that exits before its checks."""
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from lmtiny.tasks import sandbox
from lmtiny.tasks.sandbox import Limits, run_python

LIMITS = Limits(seconds=3.0, memory_bytes=256 * 2**20)
SOLUTION = textwrap.dedent("""
    def add(a, b):
      return a + b

    def check(candidate):
      assert candidate(2, 3) == 5
      assert candidate(-1, 1) == 0

    check(add)
    """)


def test_a_correct_solution_passes_and_a_wrong_one_fails():
  good = run_python(SOLUTION, LIMITS)
  assert good.status == "passed" and good.passed and good.reason == ""
  bad = run_python(SOLUTION.replace("a + b", "a - b"), LIMITS)
  assert bad.status == "failed" and bad.reason.startswith("AssertionError")


def test_output_is_kept_and_capped():
  r = run_python("print('hello')\nimport sys\nsys.stderr.write('x' * 100000)", Limits(output_bytes=1000))
  assert r.stdout == "hello\n" and r.stderr.endswith("[output cut]") and len(r.stderr) < 1100


@pytest.mark.parametrize("code, event", [
    ("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)", "socket.__new__"),
    ("import socket\ntry:\n  socket.create_connection(('127.0.0.1', {port}), timeout=1)\nexcept OSError:\n  pass",
     "socket."),
    ("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)", "socket."),
])
def test_network_is_refused(code, event):
  """A server listens on this machine; the sandboxed code cannot reach it (and a caught refusal
  still counts as refused)."""
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(1)
  server.settimeout(0.1)
  accepted = []

  def accept():
    deadline = time.time() + 5
    while time.time() < deadline and not accepted:
      try:
        accepted.append(server.accept())
      except OSError:
        pass

  thread = threading.Thread(target=accept)
  thread.start()
  try:
    r = run_python(code.format(port=server.getsockname()[1]), LIMITS)
  finally:
    accepted.append(None)
    thread.join()
    server.close()
  assert r.status == "refused" and r.reason.startswith(event), r
  assert accepted == [None]  # no connection ever arrived


def test_a_write_outside_its_directory_is_refused_and_the_file_not_created(tmp_path):
  target = tmp_path / "escaped.txt"
  r = run_python(f"open({str(target)!r}, 'w').write('x')", LIMITS)
  assert r.status == "refused" and "writing" in r.reason and str(target) in r.reason
  assert not target.exists()
  # through os.open, a relative path that climbs out, and a symlink made inside that points out
  for code in (f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
               f"open('../../../../../../..{target}', 'a')",
               f"import os\nos.symlink({str(tmp_path)!r}, 'out')\nopen('out/escaped.txt', 'w')"):
    r = run_python(code, LIMITS)
    assert r.status == "refused", (code, r)
    assert not target.exists()


def test_deleting_renaming_or_reading_outside_is_refused(tmp_path):
  keep = tmp_path / "keep.txt"
  keep.write_text("data")
  for code in (f"import os\nos.remove({str(keep)!r})", f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
               f"import os\nos.rename({str(keep)!r}, 'stolen')", f"open({str(keep)!r}).read()",
               f"import os\nos.listdir({str(tmp_path)!r})"):
    r = run_python(code, LIMITS)
    assert r.status == "refused", (code, r)
  assert keep.read_text() == "data"


def test_its_own_directory_is_writable_and_removed_afterwards():
  code = ("import os, tempfile\nopen('a.txt', 'w').write('x')\nfd, p = tempfile.mkstemp()\nos.close(fd)\n"
          "os.remove(p)\nprint(os.getcwd())")
  r = run_python(code, LIMITS)
  assert r.status == "passed", r
  directory = r.stdout.strip()
  assert os.path.basename(directory).startswith("lmtiny-sandbox-") and not os.path.exists(directory)


@pytest.mark.parametrize("code", ["import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')",
                                  "import os\nos.fork()", "import os\nos.execv('/bin/true', ['true'])",
                                  "import ctypes", "import os, signal\nos.kill(1, signal.SIGTERM)"])
def test_processes_signals_and_ctypes_are_refused(code):
  assert run_python(code, LIMITS).status == "refused"


def test_an_infinite_loop_is_killed_within_the_limit():
  t0 = time.perf_counter()
  r = run_python("while True:\n  pass", Limits(seconds=1.0))
  assert r.status == "timeout" and time.perf_counter() - t0 < 3.0 and r.seconds < 2.0


def test_a_sleeping_program_is_killed_at_the_wall_clock_limit():
  r = run_python("import time\ntime.sleep(60)", Limits(seconds=1.0))
  assert r.status == "timeout" and "wall clock" in r.reason and r.seconds < 2.0


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


def test_the_network_namespace_has_no_route_out():
  """Where the kernel allows unprivileged namespaces, the child's own namespace has no network even
  for code the audit hook did not see (here: the namespace entered by the child's helper alone)."""
  r = run_python("pass", LIMITS)
  if r.network != "namespace":
    pytest.skip(f"no network namespace on this kernel: {r.network}")
  code = textwrap.dedent(f"""
      import socket, sys
      sys.path.insert(0, {os.path.dirname(sandbox.CHILD)!r})
      import sandbox_child
      assert sandbox_child.enter_network_namespace() == "ok"
      try:
        socket.create_connection(("127.0.0.1", 9), timeout=1)
      except OSError as e:
        print(type(e).__name__, e.errno)
      """)
  out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=30)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split()[0] == "OSError" or "Error" in out.stdout.split()[0]
  assert int(out.stdout.split()[1]) in (101, 99)  # ENETUNREACH / EADDRNOTAVAIL: loopback is down
