"""The documentation as a test plan: the commands of README.md and the guides in docs/, and a
simulated user who types them (tests/journeys/test_journey.py and tests/journeys/test_journey_guides.py).

What counts as a command: every line of a ```bash block (a trailing `\\` continues it). Output
goes in ```text blocks, Python in ```python blocks; a command-looking line anywhere else in a
fenced or indented block fails a check, so a documented command cannot escape the test.
Marks, as trailing comments:
  `# needs: GPU|TPU|gcloud|network`  hardware or access CI lacks: run with `--dry-run` added
                                    (before a ` -- `, else at the end), which prints the commands;
  `# needs: torch|libtpu|wandb`      an optional package: run where it is installed (CI installs it);
  `# serves until Ctrl-C`            started, asked for a chat reply over HTTP, then interrupted.
`pip install -e ... && CMD` runs CMD once the checkout is installed (the test cannot reinstall the
package it is running from); the README's test command is the one .ci/run types and is not run.
"""
import http.client
import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

from lm_fixtures import ROOT, xla_flags
from skip_log import record_partial_skip

README = "README.md"
PREFIXES = ("python -m lmtiny", "python benchmarks/", "bash benchmarks/", "launch/", "pip install")
DRY_RUN_NEEDS = {"GPU", "TPU", "gcloud", "network"}
PACKAGE_NEEDS = {"torch": "torch", "libtpu": "libtpu", "wandb": "wandb"}
# The journeys compile fast (lm_fixtures.FAST_COMPILE): most commands are a compile and a few
# steps. Some run with XLA's default flags instead, as users run them: those that spend their time
# running (the quick start's 150 steps: 176 s against 105 s on 2 cores; the evaluation that scores
# every CORE and HF6 task: 31 against 24 CPU seconds), and those that continue a run and so reuse
# the programs an earlier default-flags command compiled, from the session's compilation cache
# (CPU seconds, fast -> default: the resume to step 160, 19.4 -> 14.5; the SFT chain, whose
# --report samples 2 x 109 held-out replies, 55.4 -> 46.0), and the benchmark's 5 timed steps
# and lr_find's 10 (one core: 18.9 -> 16.2 and 24.9 -> 21.0; the speedrun smoke and the
# quantization benchmark went the other way, 42 -> 86 and 31 -> 45, and so does the 4-step SFT
# alone, 19 -> 22, which runs default flags for the chain that reuses its programs).
LONG_RUNNING = {"python -m lmtiny.train --config configs/tiny.py",
                "python -m lmtiny.bench --config configs/tiny.py --steps 5 --json runs/bench-tiny.json",
                "python -m lmtiny.lr_find --config configs/tiny.py --steps 10 --workdir runs/lr_find",
                "python -m lmtiny.eval --workdir runs/tiny --tasks bpb,core,hf6 --data-dir tests/fixtures/evals --max-items 8",
                "python -m lmtiny.train --config configs/tiny.py --config.train.steps=160",
                "python -m lmtiny.sft --init runs/tiny --workdir runs/tiny/sft --config.sft.steps=4",
                "python -m lmtiny.sft --init runs/tiny --workdir runs/tiny/mid --config.sft.sources=embedded_chat:1.0,pretrain:0.2 "
                "--config.sft.steps=4",
                "python -m lmtiny.sft --init runs/tiny --workdir runs/tiny/sft --config.sft.steps=8 --report"}
SERVE_MARK = "# serves until Ctrl-C"
TIMES_ENV = "LMTINY_JOURNEY_TIMES"  # a file each journey appends its commands' seconds to
TEST_COMMAND = 'pip install -e ".[test]" && python -m pytest -q -n 2 tests'


def _blocks(text: str):
  """(language, [lines]) for every fenced block, plus ('indented', lines) for indented code."""
  blocks, lang, lines, prose_indented = [], None, [], []
  for line in text.splitlines():
    if line.startswith("```"):
      if lang is None:
        lang, lines = line[3:].strip() or "plain", []
      else:
        blocks.append((lang, lines))
        lang = None
    elif lang is not None:
      lines.append(line)
    elif line.startswith("    ") and line.strip():
      prose_indented.append(line.strip())
  if prose_indented:
    blocks.append(("indented", prose_indented))
  return blocks


def commands(text: str) -> list[str]:
  """The commands of a document's bash blocks, continuation lines joined, in order."""
  out = []
  for lang, lines in _blocks(text):
    if lang != "bash":
      continue
    pending = ""
    for line in lines:
      if not line.strip() or (line.lstrip().startswith("#") and not pending):
        continue
      if line.rstrip().endswith("\\"):
        pending += line.rstrip()[:-1].rstrip() + " "
        continue
      out.append((pending + line.strip()).strip())
      pending = ""
  return out


def stray_commands(text: str) -> list[str]:
  """Command-looking lines outside bash blocks (a command no test would run)."""
  return [line.strip() for lang, lines in _blocks(text) if lang not in ("bash", "python")
          for line in lines if line.strip().startswith(PREFIXES)]


# A guide whose commands use the quick start's run says so in this sentence near its top; the
# others start from a fresh checkout (and run beside the quick start's chain in the tests).
FROM_QUICK_START = "Starts from the quick start's `runs/tiny`."


def guides() -> list[str]:
  """The guides in the order the README's table links them."""
  return re.findall(r"^\| \[(docs/[\w-]+\.md)\]", read(README), re.M)


def chains() -> tuple[list[str], list[str]]:
  """(the README and the guides that start from its quick start, the guides that start afresh),
  each in the README's order."""
  after = [doc for doc in guides() if FROM_QUICK_START in read(doc)]
  return [README] + after, [doc for doc in guides() if doc not in after]


def read(path: str) -> str:
  with open(os.path.join(ROOT, path), encoding="utf-8") as f:
    return f.read()


def _needs(command: str) -> str | None:
  m = re.search(r"#\s*needs:\s*([\w-]+)", command)
  return m.group(1) if m else None


def installed(code: str) -> str:
  """What `pip install -e ... && CMD` runs once the checkout is installed: CMD (other code as is)."""
  return code.split(" && ", 1)[1] if code.startswith("pip install -e ") and " && " in code else code


def with_dry_run(command: str) -> str:
  """`--dry-run` before the comment, and before a ` -- ` that hands the rest to another program."""
  code = command.split(" #", 1)[0].rstrip()
  if " -- " in code:
    head, tail = code.split(" -- ", 1)
    return f"{head} --dry-run -- {tail}"
  return f"{code} --dry-run"


def scratch_copy(dest: str) -> str:
  """The checkout as a fresh clone has it: the files launch/lib.sh's code_files lists (tracked ones
  and untracked ones git does not ignore, less a virtual environment made inside the checkout,
  whose copy cost each journey 20 s and slowed the other worker's commands with disk traffic)."""
  listed = subprocess.run(["bash", "-c", "source launch/lib.sh && code_files"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
  for name in filter(None, listed.split("\0")):
    src = os.path.join(ROOT, name)
    if os.path.isfile(src):
      os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
      shutil.copy2(src, os.path.join(dest, name))
  # A clone is a git checkout (launch/tpu.sh setup copies what git tracks from it).
  git = ["git", "-c", "user.name=journey", "-c", "user.email=journey@localhost"]
  for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "a fresh clone"]):
    subprocess.run(git + args, cwd=dest, check=True, capture_output=True)
  return dest


class Journey:
  """A user at a shell in the scratch checkout: one environment, commands run in order."""

  def __init__(self, root: str, home: str):
    self.root, self.times, self.exports, self.outputs = root, [], [], []
    self.skipped = []  # commands not run for a missing optional package (their promises are skipped too)
    self.env = dict(os.environ, HOME=home, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1), PYTHONUNBUFFERED="1",
                    PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    self.env.pop("PYTHONPATH", None)  # the scratch checkout's own lmtiny, as `python -m` from its root finds it

  def run(self, command: str) -> str:
    code = command.split(" #", 1)[0].strip()
    if code.startswith("export "):
      self.exports.append(code)
      return "exported"
    if code == TEST_COMMAND:
      return "the test suite itself (.ci/run types it)"
    if code != installed(code):
      assert importlib.util.find_spec("lmtiny") is not None  # the checkout is installed
      code = installed(code)
    needs = _needs(command)
    if needs in DRY_RUN_NEEDS:
      code = with_dry_run(command)
    elif needs in PACKAGE_NEEDS:
      if importlib.util.find_spec(PACKAGE_NEEDS[needs]) is None:
        self.skipped.append(command.split(" #", 1)[0].strip())
        record_partial_skip()
        return f"skipped: needs {needs}"
    elif needs is not None:
      raise AssertionError(f"unknown mark '# needs: {needs}' in: {command}")
    script = "\n".join(self.exports + [code])
    env = dict(self.env, XLA_FLAGS="") if code in LONG_RUNNING else self.env
    start, cpu = time.time(), _children_cpu_seconds()
    if SERVE_MARK in command:
      self._serve(script)
    else:
      out = subprocess.run(["bash", "-c", script], cwd=self.root, env=env, capture_output=True, text=True,
                           timeout=900, stdin=subprocess.DEVNULL)
      assert out.returncode == 0, f"$ {code}\nexit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
      assert "Traceback" not in out.stderr, f"$ {code}\n{out.stderr[-4000:]}"
      assert not re.search(r"^warning: .*unusable", out.stderr, re.M), f"$ {code}\n{out.stderr[-2000:]}"
      self.outputs.append((command.split(" #", 1)[0].strip(), out.stdout + out.stderr))
    self.times.append((time.time() - start, _children_cpu_seconds() - cpu, code))
    return "ran"

  def _serve(self, script: str, port: int = 8000) -> None:
    # A command typed in a terminal stops on Ctrl-C. A test run started in the background of a
    # non-interactive shell has SIGINT ignored, and an ignored signal stays ignored through exec:
    # the server would never see the Ctrl-C below. A handler here is reset to the default in the child.
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
      proc = subprocess.Popen(["bash", "-c", f"exec {script}"], cwd=self.root, env=self.env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    finally:
      signal.signal(signal.SIGINT, ignored)
    try:
      deadline = time.time() + 180
      while True:
        assert proc.poll() is None, f"$ {script}\nexited {proc.returncode}\n{proc.stderr.read()[-3000:]}"
        try:
          conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
          conn.request("GET", "/health")
          if conn.getresponse().status == 200:
            break
        except OSError:
          assert time.time() < deadline, "the server did not come up"
          time.sleep(0.5)
      conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
      body = {"messages": [{"role": "user", "content": "What does json.dumps do?"}], "max_tokens": 8, "seed": 0,
              "stream": True}
      conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
      reply = conn.getresponse()
      events = [line[6:] for line in reply.read().decode().splitlines() if line.startswith("data: ")]
      assert reply.status == 200 and events[-1:] == ["[DONE]"], events
      finished = [c for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]
      assert [c["finish_reason"] in ("stop", "length") for c in finished] == [True], events
      os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
      proc.wait(timeout=60)
    finally:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _children_cpu_seconds() -> float:
  """User + system CPU seconds of the finished child processes: a command's cost, whatever else
  shares the machine (its wall time doubles when the other test worker is busy)."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def run_doc(user: Journey, doc: str, promises) -> None:
  """Every command of `doc`, in order, then what `promises` say those commands print or leave:
  (doc, command prefix, texts in its output, paths it leaves; "PATH::TEXT" for a file holding TEXT).
  A promise about a command skipped for a missing optional package (`# needs: torch`) is skipped
  with it, when no command run with that prefix came later."""
  ran, skipped = len(user.outputs), len(user.skipped)
  for command in commands(read(doc)):
    user.run(command)
  for where, prefix, texts, paths in promises:
    if where != doc:
      continue
    typed = [out for code, out in user.outputs[ran:] if code.startswith(prefix)]
    if not typed and any(code.startswith(prefix) for code in user.skipped[skipped:]):
      continue
    assert typed, f"{doc}: no command starting '{prefix}' ran, so nothing can keep its promise"
    output = typed[-1]  # the last one typed
    for text in texts:
      assert text in output, f"{prefix}: '{text}' not in its output:\n{output[-3000:]}"
    for entry in paths:
      path, _, text = entry.partition("::")
      assert os.path.exists(os.path.join(user.root, path)), f"{prefix}: left no {path}"
      if text:
        with open(os.path.join(user.root, path), encoding="utf-8") as f:
          assert text in f.read(), f"{prefix}: {path} lacks '{text}'"


def journey_fixture(tmp_path_factory):
  """A fresh scratch checkout and HOME, and the time each command took, printed at the end."""
  root = scratch_copy(str(tmp_path_factory.mktemp("checkout")))
  user = Journey(root, str(tmp_path_factory.mktemp("home")))
  yield user
  wall, cpu = sum(t for t, _, _ in user.times), sum(c for _, c, _ in user.times)
  print(f"\njourney: {len(user.times)} commands in {wall:.0f} s ({cpu:.0f} CPU s); slowest: " +
        "; ".join(f"{t:.0f}s {c[:60]}" for t, _, c in sorted(user.times, reverse=True)[:8]))
  if os.environ.get(TIMES_ENV):  # .ci/run prints every command's seconds at the end of its log
    with open(os.environ[TIMES_ENV], "a", encoding="utf-8") as f:
      f.writelines(f"{cpu:6.1f} CPU s {t:6.1f} s  {c}\n" for t, cpu, c in user.times)
