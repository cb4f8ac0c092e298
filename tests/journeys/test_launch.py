"""launch/: the scripts run against fake gcloud / ssh / python that record their arguments.

The training arguments are checked the hard way: the remote command a script hands to gcloud is
run through a real shell in a sandbox home, and the fake trainer reports the argv it received.
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from lm_fixtures import ROOT

LAUNCH = os.path.join(ROOT, "launch")
BASH = shutil.which("bash")
SCRIPTS = ["lib.sh", "tpu.sh", "gpu.sh", "remote.sh", "speedrun.sh"]
TPU = ["--name", "lm", "--zone", "us-west4-a"]

RECORDER = f"""#!{sys.executable}
import json, os, shutil, sys
argv = sys.argv[1:]
log = os.environ["FAKE_LOG"]
with open(log, "a") as f:
  f.write(json.dumps({{"prog": os.path.basename(sys.argv[0]), "argv": argv}}) + "\\n")
if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in " ".join(argv):
  sys.exit(1)
if "describe" in argv and any(a.startswith("--format") for a in argv):
  states = os.environ.get("FAKE_QR_STATES", "ACTIVE").split(",")
  n = int(open(log + ".n").read()) if os.path.exists(log + ".n") else 0
  open(log + ".n", "w").write(str(n + 1))
  state = states[min(n, len(states) - 1)]
  if state == "FAIL":  # a transient describe failure
    sys.exit(1)
  print(state)
if "scp" in argv and os.environ.get("FAKE_KEEP"):
  for a in argv:
    if os.path.isfile(a):
      shutil.copy(a, os.environ["FAKE_KEEP"])
"""

# The trainer stand-in: records its argv and environment, then sleeps if asked (FAKE_SLEEP).
FAKE_TRAINER = f"""#!{sys.executable}
import json, os, sys, time
with open(os.environ["FAKE_RECORD"] + ".tmp", "w") as f:
  json.dump({{"argv": sys.argv[1:], "env": dict(os.environ), "pid": os.getpid()}}, f)
os.replace(os.environ["FAKE_RECORD"] + ".tmp", os.environ["FAKE_RECORD"])
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""

# Arguments a shell would mangle or execute if they were pasted unquoted into a remote command.
NASTY = ["--config", "configs/tiny.py", "--config.train.sample_prompt=x; touch {pwned}",
         "--config.data.shards=$(touch {pwned})", "`touch {pwned}`", "it's \"quoted\" & | > <",
         "--glob=*", "~", "", "tab\there", "émoji ✓", "--two words", "new\nline", "$HOME", "\\"]


def _write_exe(path, text):
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, 0o755)


@pytest.fixture
def sandbox(tmp_path):
  """A bin dir with fake gcloud/ssh first on PATH; returns a runner and the call log."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("gcloud", "ssh"):
    _write_exe(bin_dir / name, RECORDER)
  log = tmp_path / "calls.jsonl"
  env = {k: v for k, v in os.environ.items() if not k.startswith(("LMTINY_", "FAKE_"))}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), TMPDIR=str(tmp_path),
             LMTINY_POLL_SECONDS="0")

  class Sandbox:
    path = tmp_path

    def run(self, script, *args, extra_env=None, cwd=None):
      e = dict(env, **(extra_env or {}))
      return subprocess.run([BASH, os.path.join(LAUNCH, script), *args], env=e, cwd=cwd or tmp_path,
                            capture_output=True, text=True, timeout=60)

    def calls(self, prog=None):
      if not log.exists():
        return []
      rows = [json.loads(line) for line in log.read_text().splitlines()]
      return [r["argv"] for r in rows if prog is None or r["prog"] == prog]

    def reset(self):
      for p in (log, tmp_path / "calls.jsonl.n"):
        if p.exists():
          p.unlink()
  return Sandbox()


def _remote_command(call):
  """The --command=... value of a recorded `gcloud compute tpus tpu-vm ssh` call."""
  cmds = [a[len("--command="):] for a in call if a.startswith("--command=")]
  assert len(cmds) == 1, call
  return cmds[0]


def _one_error_line(proc):
  assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  return lines[0]


# --- the scripts themselves ------------------------------------------------------------------------


def test_scripts_parse_and_are_shellcheck_clean():
  for s in SCRIPTS:
    subprocess.run(["bash", "-n", os.path.join(LAUNCH, s)], check=True)
  if shutil.which("shellcheck"):
    out = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=LAUNCH, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("script, verbs", [
    ("tpu.sh", ["create", "setup", "train", "logs", "stop", "cleanup", "fetch", "status", "delete"]),
    ("gpu.sh", ["run", "stop", "logs"]),
    ("remote.sh", ["setup", "check-idle", "start", "stop", "logs", "cleanup"]),
])
def test_help_works_on_every_verb_and_runs_nothing(sandbox, script, verbs):
  for args in [["--help"], ["-h"], *[[v, "--help"] for v in verbs]]:
    out = sandbox.run(script, *args)
    assert out.returncode == 0 and out.stdout.startswith("usage:"), (args, out.stderr)
  assert sandbox.calls() == []


# --- create ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("accelerator, runtime", [
    ("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v4-32", "tpu-ubuntu2204-base"),
    ("v6e-8", "v2-alpha-tpuv6e"), ("v5p-16", "v2-alpha-tpuv5"),
])
def test_create_queued_resource_with_the_runtime_of_its_family(sandbox, accelerator, runtime):
  out = sandbox.run("tpu.sh", "create", *TPU, "--project", "p1", "--accelerator", accelerator, "--spot", "--no-wait")
  assert out.returncode == 0, out.stderr
  assert sandbox.calls("gcloud") == [[
      "compute", "tpus", "queued-resources", "create", "lm", "--zone=us-west4-a", "--project=p1", "--node-id=lm",
      f"--accelerator-type={accelerator}", f"--runtime-version={runtime}", "--spot"]]


def test_create_polls_describe_until_active(sandbox):
  out = sandbox.run("tpu.sh", "create", *TPU, "--accelerator", "v4-32", "--reserved",
                    extra_env=dict(FAKE_QR_STATES="WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE,FAILED"))
  assert out.returncode == 0, out.stderr
  calls = sandbox.calls("gcloud")
  assert calls[0][-1] == "--reserved"
  describe = ["compute", "tpus", "queued-resources", "describe", "lm", "--zone=us-west4-a", "--format=value(state.state)"]
  assert calls[1:] == [describe] * 3  # stops at ACTIVE, never reads the 4th state
  assert "ACTIVE" in out.stderr


@pytest.mark.parametrize("state", ["FAILED", "SUSPENDED"])
def test_create_reports_a_failed_request(sandbox, state):
  out = sandbox.run("tpu.sh", "create", *TPU, "--accelerator", "v6e-8", extra_env=dict(FAKE_QR_STATES=state))
  assert out.returncode == 1 and state in out.stderr


def test_create_gives_up_after_the_timeout(sandbox):
  out = sandbox.run("tpu.sh", "create", *TPU, "--accelerator", "v6e-8", "--timeout", "1",
                    extra_env=dict(FAKE_QR_STATES="WAITING_FOR_RESOURCES", LMTINY_POLL_SECONDS="0.3"))
  assert out.returncode == 1 and "still WAITING_FOR_RESOURCES after 1s" in out.stderr


def test_create_a_tpu_vm_directly(sandbox):
  out = sandbox.run("tpu.sh", "create", *TPU, "--accelerator", "v5litepod-8", "--no-queued", "--preemptible",
                    "--runtime-version", "v2-alpha-tpuv5-lite-custom")
  assert out.returncode == 0, out.stderr
  assert sandbox.calls("gcloud") == [[
      "compute", "tpus", "tpu-vm", "create", "lm", "--zone=us-west4-a", "--accelerator-type=v5litepod-8",
      "--version=v2-alpha-tpuv5-lite-custom", "--preemptible"]]


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["create", *TPU, "--accelerator", "v9-8"], ["unknown accelerator type 'v9-8'"]),
    (["create", *TPU, "--accelerator", "v5litepod-12"], ["'v5litepod-12'"]),
    (["create", *TPU, "--accelerator", "v4-12"], ["'v4-12'"]),
    (["create", *TPU, "--accelerator", "v4-24"], ["'v4-24'"]),
    (["create", *TPU, "--accelerator", "v5p-96"], ["'v5p-96'"]),
    (["create", *TPU, "--accelerator", "v6e-8", "--autocheckpoint"], ["--autocheckpoint", "v2-v5e only"]),
    (["create", *TPU, "--accelerator", "tpu"], ["'tpu'"]),
    (["create", *TPU], ["--accelerator"]),
    (["create", *TPU, "--accelerator", "v4-8", "--preemptible"], ["--preemptible needs --no-queued"]),
    (["create", *TPU, "--accelerator", "v4-8", "--spot", "--reserved"], ["--spot and --reserved"]),
    (["create", "--zone", "z", "--accelerator", "v4-8"], ["--name is required"]),
    (["create", "--name", "lm", "--accelerator", "v4-8"], ["--zone is required"]),
    (["create", "--name", "Bad_Name", "--zone", "z"], ["--name 'Bad_Name'"]),
    (["train", *TPU], ["train needs training arguments"]),
    (["train", *TPU, "--env", "1X=2", "--", "a"], ["--env '1X=2'"]),
    (["stop", *TPU, "--", "a"], ["stop takes no training arguments"]),
    (["logs", *TPU, "--worker", "all", "--follow"], ["--follow needs one worker"]),
    (["logs", *TPU, "--worker", "w1"], ["--worker 'w1'"]),
    (["logs", *TPU, "--lines", "many"], ["--lines 'many'"]),
    (["fetch", *TPU], ["fetch needs --from"]),
    (["setup", *TPU, "--ref", "v1"], ["--ref needs --repo"]),
    (["launch", *TPU], ["unknown verb 'launch'"]),
    (["create", *TPU, "--acelerator", "v4-8"], ["unknown option '--acelerator'"]),
    (["create", *TPU, "--zone"], ["--zone needs a value"]),
])
def test_bad_input_is_one_line_exit_2_and_nothing_runs(sandbox, args, words):
  line = _one_error_line(sandbox.run("tpu.sh", *args))
  for w in words:
    assert w in line
  assert sandbox.calls() == []


def test_missing_gcloud_is_one_line_and_a_dry_run_needs_none(sandbox, tmp_path):
  bare = tmp_path / "bare"
  bare.mkdir()
  os.symlink(shutil.which("dirname"), bare / "dirname")
  line = _one_error_line(sandbox.run("tpu.sh", "status", *TPU, extra_env=dict(PATH=str(bare))))
  assert "gcloud not found on PATH" in line
  out = sandbox.run("tpu.sh", "status", *TPU, "--dry-run", extra_env=dict(PATH=str(bare)))
  assert out.returncode == 0 and out.stdout.startswith("gcloud compute tpus queued-resources describe lm")


# --- dry run = the real run's commands, with nothing run -------------------------------------------

VERB_ARGS = [
    ["create", *TPU, "--accelerator", "v4-32", "--spot", "--no-wait"],
    ["setup", *TPU],
    ["setup", *TPU, "--repo", "https://example.com/me/lm tiny.git", "--ref", "v1"],
    ["train", *TPU, "--env", "WANDB_MODE=off line", "--", "--config", "configs/tiny.py", "--config.train.sample_prompt=a b; c"],
    ["logs", *TPU, "--follow"],
    ["stop", *TPU],
    ["cleanup", *TPU],
    ["fetch", *TPU, "--from", "gs://bkt/runs/a", "--to", "out dir"],
    ["fetch", *TPU, "--from", "runs/a"],
    ["status", *TPU, "--no-queued"],
    ["delete", *TPU, "--yes"],
]


@pytest.mark.parametrize("args", VERB_ARGS, ids=lambda a: " ".join(a[:1] + a[5:7]))
def test_dry_run_prints_exactly_what_the_real_run_runs(sandbox, args):
  dry = sandbox.run("tpu.sh", args[0], "--dry-run", *args[1:])  # after --, it would be a training arg
  assert dry.returncode == 0, dry.stderr
  assert sandbox.calls() == []
  assert not list(sandbox.path.glob("lmtiny-code-*")) and not (sandbox.path / "out dir").exists()
  printed = [shlex.split(line) for line in dry.stdout.splitlines() if not line.startswith("#")]
  printed = [words[1:] for words in printed if words[0] == "gcloud"]
  real = sandbox.run("tpu.sh", *args)
  assert real.returncode == 0, real.stderr
  recorded = sandbox.calls("gcloud")

  def normal(words):  # the code archive's name carries the pid of the script
    return [w if "lmtiny-code-" not in w or ":" in w else "ARCHIVE" for w in words]
  assert [normal(w) for w in printed] == [normal(w) for w in recorded] and recorded


# --- train: arguments survive ssh and a shell, and start everywhere or nowhere ----------------------


def test_train_checks_then_starts_on_all_workers(sandbox):
  out = sandbox.run("tpu.sh", "train", *TPU, "--env", "A=1", "--", "--config", "configs/tiny.py", "x y")
  assert out.returncode == 0, out.stderr
  check, start = sandbox.calls("gcloud")
  assert check[:5] == ["compute", "tpus", "tpu-vm", "ssh", "lm"] and "--worker=all" in check
  assert "--worker=all" in start
  assert shlex.split(_remote_command(check)) == ["cd", "--", "lmtiny", "&&", "bash", "launch/remote.sh", "check-idle"]
  assert shlex.split(_remote_command(start)) == [
      "cd", "--", "lmtiny", "&&", "bash", "launch/remote.sh", "start", "--env", "A=1", "--",
      "--config", "configs/tiny.py", "x y"]


def _worker_home(tmp_path):
  """A worker's home after setup: ~/lmtiny with the real remote.sh and a fake venv python."""
  home = tmp_path / "home"
  (home / "lmtiny" / "launch").mkdir(parents=True)
  (home / "lmtiny" / ".venv" / "bin").mkdir(parents=True)
  shutil.copy(os.path.join(LAUNCH, "remote.sh"), home / "lmtiny" / "launch")
  _write_exe(home / "lmtiny" / ".venv" / "bin" / "python", FAKE_TRAINER)
  return home


def _wait_for(path, seconds=20):
  deadline = time.time() + seconds
  while not path.exists():
    assert time.time() < deadline, f"{path} never appeared"
    time.sleep(0.05)
  return json.loads(path.read_text())


def test_user_arguments_round_trip_through_the_worker_shell_and_never_execute(sandbox, tmp_path):
  pwned = tmp_path / "pwned"
  user_args = [a.replace("{pwned}", str(pwned)) for a in NASTY]
  out = sandbox.run("tpu.sh", "train", *TPU, "--env", "MSG=hello; touch " + str(pwned), "--", *user_args)
  assert out.returncode == 0, out.stderr
  remote = _remote_command(sandbox.calls("gcloud")[1])

  home = _worker_home(tmp_path)
  record = tmp_path / "trainer.json"
  env = dict(os.environ, HOME=str(home), FAKE_RECORD=str(record), LMTINY_START_CHECK_SECONDS="0")
  # What sshd does with --command: the login shell runs it from the home directory.
  ran = subprocess.run(["bash", "-c", remote], cwd=home, env=env, capture_output=True, text=True, timeout=30)
  assert ran.returncode == 0, ran.stderr
  got = _wait_for(record)
  assert got["argv"] == ["-m", "lmtiny.train", *user_args]
  assert got["env"]["MSG"] == "hello; touch " + str(pwned)
  assert got["env"]["PYTHONUNBUFFERED"] == "1"
  assert not pwned.exists()
  assert list((home / "lmtiny" / "logs").glob("train-*.log"))


def test_train_that_fails_on_a_worker_is_stopped_everywhere(sandbox):
  out = sandbox.run("tpu.sh", "train", *TPU, "--", "--config", "configs/tiny.py",
                    extra_env=dict(FAKE_FAIL="remote.sh start"))
  assert out.returncode == 1
  calls = sandbox.calls("gcloud")
  assert len(calls) == 3 and "--worker=all" in calls[2]
  assert shlex.split(_remote_command(calls[2]))[-1] == "stop"


def test_train_refused_while_a_run_is_alive_starts_nothing(sandbox):
  out = sandbox.run("tpu.sh", "train", *TPU, "--", "--config", "configs/tiny.py",
                    extra_env=dict(FAKE_FAIL="remote.sh check-idle"))
  assert out.returncode != 0 and len(sandbox.calls("gcloud")) == 1


# --- setup, cleanup, logs, fetch, delete ------------------------------------------------------------


def test_setup_copies_this_checkout_to_all_workers(sandbox, tmp_path):
  keep = tmp_path / "kept"
  keep.mkdir()
  out = sandbox.run("tpu.sh", "setup", *TPU, extra_env=dict(FAKE_KEEP=str(keep)))
  assert out.returncode == 0, out.stderr
  scp, ssh = sandbox.calls("gcloud")
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and scp[5:] == ["lm:lmtiny-code.tgz", "--zone=us-west4-a", "--worker=all"]
  assert not os.path.exists(scp[4])  # the local archive is removed afterwards
  (archive,) = keep.iterdir()
  names = tarfile.open(archive).getnames()
  assert {"setup.py", "lmtiny/parallel/distributed.py", "launch/remote.sh", "configs/tiny.py"} <= set(names)
  assert not [n for n in names if "__pycache__" in n or n.startswith(".git/")]
  assert "--worker=all" in ssh
  assert shlex.split(_remote_command(ssh)) == [
      "mkdir", "-p", "lmtiny", "&&", "tar", "-xzf", "lmtiny-code.tgz", "-C", "lmtiny", "&&", "rm", "-f",
      "lmtiny-code.tgz", "&&", "cd", "--", "lmtiny", "&&", "bash", "launch/remote.sh", "setup",
      "--python-version", "3.11", "--extras", "tpu"]


def test_the_code_copy_leaves_out_a_virtual_environment_made_in_the_checkout(tmp_path):
  """`python -m venv venv` inside a checkout is common; its thousands of files are this machine's
  Python, not code, and no .gitignore can name every such directory."""
  repo = tmp_path / "checkout"
  for name in ("launch/lib.sh", "tracked.py", "notes.txt", "venv/pyvenv.cfg", "venv/lib/site.py",
               "sub/.env2/pyvenv.cfg", "sub/.env2/bin/python", "sub/keep.py"):
    (repo / name).parent.mkdir(parents=True, exist_ok=True)
    (repo / name).write_text("x")
  shutil.copy(os.path.join(LAUNCH, "lib.sh"), repo / "launch")
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  subprocess.run(["git", "-C", str(repo), "add", "tracked.py"], check=True)
  out = subprocess.run([BASH, "-c", "source launch/lib.sh && code_files"], cwd=repo, capture_output=True,
                       text=True, check=True)
  assert sorted(filter(None, out.stdout.split("\0"))) == ["launch/lib.sh", "notes.txt", "sub/keep.py", "tracked.py"]


def test_setup_from_a_repository_clones_checks_out_and_installs(sandbox, tmp_path):
  """Runs the remote command for real against a local repository, with a fake uv."""
  origin = tmp_path / "origin"
  subprocess.run(["git", "init", "-q", str(origin)], check=True)
  (origin / "launch").mkdir()
  shutil.copy(os.path.join(LAUNCH, "remote.sh"), origin / "launch")
  git = ["git", "-C", str(origin), "-c", "user.name=t", "-c", "user.email=t@t"]
  subprocess.run([*git, "add", "."], check=True)
  subprocess.run([*git, "commit", "-qm", "one"], check=True)
  subprocess.run([*git, "tag", "v1"], check=True)
  (origin / "marker").write_text("two")
  subprocess.run([*git, "add", "."], check=True)
  subprocess.run([*git, "commit", "-qm", "two"], check=True)

  out = sandbox.run("tpu.sh", "setup", *TPU, "--repo", str(origin), "--ref", "v1")
  assert out.returncode == 0, out.stderr
  (ssh,) = sandbox.calls("gcloud")
  home = tmp_path / "home"
  home.mkdir()
  uv = f"""#!/bin/sh
echo "uv $*" >> {tmp_path}/uv.log
if [ "$1" = venv ]; then mkdir -p .venv/bin && cp {tmp_path}/bin/python .venv/bin/python; fi
"""
  _write_exe(tmp_path / "bin" / "uv", uv)
  _write_exe(tmp_path / "bin" / "python", f'#!/bin/sh\necho "python $*" >> {tmp_path}/uv.log\n')
  env = dict(os.environ, HOME=str(home), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
  for _ in range(2):  # a second setup reuses the clone
    ran = subprocess.run(["bash", "-c", _remote_command(ssh)], cwd=home, env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
  assert (home / "lmtiny" / "launch" / "remote.sh").exists() and not (home / "lmtiny" / "marker").exists()
  log = (tmp_path / "uv.log").read_text().splitlines()
  assert log[0] == "uv venv --python 3.11 .venv"
  assert log[1] == "uv pip install --python .venv/bin/python -e .[tpu]"
  assert log[2].startswith("python -c import jax, lmtiny")
  assert len(log) == 5  # the second run: no new venv, install again


def test_cleanup_ships_the_worker_script_then_runs_it_everywhere(sandbox):
  out = sandbox.run("tpu.sh", "cleanup", *TPU)
  assert out.returncode == 0, out.stderr
  scp, ssh = sandbox.calls("gcloud")
  assert scp == ["compute", "tpus", "tpu-vm", "scp", os.path.join(LAUNCH, "remote.sh"), "lm:lmtiny-remote.sh",
                 "--zone=us-west4-a", "--worker=all"]
  assert "--worker=all" in ssh and _remote_command(ssh) == "bash lmtiny-remote.sh cleanup --dir lmtiny"


def test_logs_stop_fetch_status_delete_commands(sandbox):
  def run(*args):
    sandbox.reset()
    out = sandbox.run("tpu.sh", *args)
    assert out.returncode == 0, out.stderr
    return sandbox.calls("gcloud")

  (logs,) = run("logs", *TPU, "--worker", "2", "--lines", "7", "--follow")
  assert "--worker=2" in logs and shlex.split(_remote_command(logs))[-4:] == ["logs", "--lines", "7", "--follow"]
  (logs,) = run("logs", *TPU, "--worker=all")
  assert "--worker=all" in logs
  (stop,) = run("stop", *TPU)
  assert "--worker=all" in stop and shlex.split(_remote_command(stop))[-1] == "stop"
  assert run("fetch", *TPU, "--from", "gs://b/runs/a") == [["storage", "rsync", "--recursive", "gs://b/runs/a", "runs/a"]]
  assert (sandbox.path / "runs" / "a").is_dir()
  assert run("fetch", *TPU, "--from", "lmtiny/runs/x", "--to", "here") == [
      ["compute", "tpus", "tpu-vm", "scp", "--recurse", "lm:lmtiny/runs/x", "here", "--zone=us-west4-a", "--worker=0"]]
  assert run("status", *TPU) == [["compute", "tpus", "queued-resources", "describe", "lm", "--zone=us-west4-a"]]
  assert run("delete", *TPU) == [["compute", "tpus", "queued-resources", "delete", "lm", "--zone=us-west4-a", "--force"]]
  assert run("delete", *TPU, "--no-queued", "--yes") == [
      ["compute", "tpus", "tpu-vm", "delete", "lm", "--zone=us-west4-a", "--quiet"]]


# --- the worker side: remote.sh -------------------------------------------------------------------


def _run_remote(*args, env=None, cwd=None):
  return subprocess.run(["bash", os.path.join(LAUNCH, "remote.sh"), *args], env=dict(os.environ, **(env or {})),
                        capture_output=True, text=True, timeout=60, cwd=cwd)


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f"/proc/{pid}/stat") as f:  # a zombie is dead for our purposes
    return f.read().split(")")[-1].split()[0] != "Z"


def test_remote_start_refuses_a_second_run_and_stop_ends_the_group(tmp_path):
  home = _worker_home(tmp_path)
  record = tmp_path / "rec.json"
  env = dict(FAKE_RECORD=str(record), FAKE_SLEEP="120", LMTINY_START_CHECK_SECONDS="0")
  d = ["--dir", str(home / "lmtiny")]
  pid = None
  try:
    out = _run_remote("start", *d, "--", "--config", "c.py", env=env)
    assert out.returncode == 0, out.stderr
    pid = _wait_for(record)["pid"]
    assert _alive(pid) and os.getpgid(pid) == pid  # its own process group, for stop
    again = _run_remote("start", *d, "--", "x", env=env)
    assert again.returncode == 2 and "still alive" in again.stderr
    assert _run_remote("check-idle", *d).returncode == 2
    stopped = _run_remote("stop", *d, "--grace", "10")
    assert stopped.returncode == 0 and "stopping process group" in stopped.stdout
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
      time.sleep(0.05)
    assert not _alive(pid)
    assert "no training run alive" in _run_remote("stop", *d).stdout
    assert _run_remote("check-idle", *d).returncode == 0
  finally:
    if pid and _alive(pid):
      os.killpg(pid, signal.SIGKILL)


def test_remote_start_reports_a_trainer_that_dies_at_once(tmp_path):
  home = _worker_home(tmp_path)
  env = dict(FAKE_RECORD=str(tmp_path / "r.json"), FAKE_EXIT="3", LMTINY_START_CHECK_SECONDS="1")
  out = _run_remote("start", "--dir", str(home / "lmtiny"), "--", "x", env=env)
  assert out.returncode == 1 and "exited with status 3 at start" in out.stderr


def test_remote_cleanup_kills_every_holder_of_a_device_and_removes_the_lockfile(tmp_path):
  device = tmp_path / "accel0"
  device.write_text("")
  lock = tmp_path / "libtpu_lockfile"
  lock.write_text("")
  holder = subprocess.Popen([sys.executable, "-c", f"f = open({str(device)!r}); import time; time.sleep(120)"])
  other = subprocess.Popen(["sleep", "120"], stdin=open(device))  # not python: a holder all the same
  bystander = subprocess.Popen(["sleep", "120"])  # holds no device: left alone
  try:
    deadline = time.time() + 10
    while str(device) not in {os.path.realpath(f"/proc/{holder.pid}/fd/{fd}")
                              for fd in os.listdir(f"/proc/{holder.pid}/fd")}:
      assert time.time() < deadline
      time.sleep(0.05)
    args = ["--dir", str(tmp_path / "no-code-here"), "--devices", f"{tmp_path}/accel*", "--lockfile", str(lock)]
    dry = _run_remote("cleanup", *args, "--dry-run")
    assert dry.returncode == 0 and f"kill -TERM {holder.pid}" in dry.stdout and lock.exists()
    assert holder.poll() is None
    out = _run_remote("cleanup", *args)
    assert out.returncode == 0, out.stderr
    assert holder.wait(timeout=15) is not None and other.wait(timeout=15) is not None
    assert bystander.poll() is None
    assert not lock.exists()
    assert f"killing pid {holder.pid}" in out.stdout
  finally:
    for p in (holder, other, bystander):
      if p.poll() is None:
        p.kill()
      p.wait()


def test_remote_setup_dry_run_names_the_install(tmp_path):
  out = _run_remote("setup", "--dir", ROOT, "--dry-run", "--extras", "cuda", "--python-version", "3.12")
  assert out.returncode == 0, out.stderr
  assert "pip install --python .venv/bin/python -e .\\[cuda\\]" in out.stdout


# --- gpu.sh -----------------------------------------------------------------------------------------


def test_gpu_one_host_runs_the_trainer_in_the_foreground(sandbox, tmp_path):
  trainer = tmp_path / "fake-python"
  _write_exe(trainer, FAKE_TRAINER)
  record = tmp_path / "rec.json"
  out = sandbox.run("gpu.sh", "--python", str(trainer), "--gpus", "0,1", "--", "--config", "configs/tiny.py", "a b",
                    extra_env=dict(FAKE_RECORD=str(record)))
  assert out.returncode == 0, out.stderr
  got = json.loads(record.read_text())
  assert got["argv"] == ["-m", "lmtiny.train", "--config", "configs/tiny.py", "a b"]
  assert got["env"]["CUDA_VISIBLE_DEVICES"] == "0,1" and "LMTINY_NUM_PROCESSES" not in got["env"]


def test_gpu_this_host_as_one_of_n(sandbox, tmp_path):
  trainer = tmp_path / "fake-python"
  _write_exe(trainer, FAKE_TRAINER)
  record = tmp_path / "rec.json"
  out = sandbox.run("gpu.sh", "--python", str(trainer), "--coordinator", "10.0.0.2:8476", "--num-processes", "4",
                    "--process-id", "3", "--", "--config", "configs/tiny.py", extra_env=dict(FAKE_RECORD=str(record)))
  assert out.returncode == 0, out.stderr
  env = json.loads(record.read_text())["env"]
  assert (env["LMTINY_COORDINATOR"], env["LMTINY_NUM_PROCESSES"], env["LMTINY_PROCESS_ID"]) == ("10.0.0.2:8476", "4", "3")


def test_gpu_hosts_over_ssh_get_coordinator_count_and_id(sandbox, tmp_path):
  out = sandbox.run("gpu.sh", "--hosts", "h0,me@h1,h2", "--port", "9000", "--dir", "/srv/lm tiny", "--",
                    "--config", "configs/d20.py", "x; y")
  assert out.returncode == 0, out.stderr
  calls = sandbox.calls("ssh")
  assert [c[2] for c in calls] == ["h0", "me@h1", "h2"] * 2
  for i, c in enumerate(calls[3:]):
    words = shlex.split(c[3])
    assert words[:3] == ["cd", "--", "/srv/lm tiny"] and words[-4:] == ["--", "--config", "configs/d20.py", "x; y"]
    assert ["--env", "LMTINY_COORDINATOR=h0:9000", "--env", "LMTINY_NUM_PROCESSES=3",
            "--env", f"LMTINY_PROCESS_ID={i}"] == words[words.index("--env"):words.index("--env") + 6]


def test_gpu_hosts_failure_stops_the_started_ones(sandbox):
  out = sandbox.run("gpu.sh", "--hosts", "h0,h1,h2", "--", "--config", "c.py",
                    extra_env=dict(FAKE_FAIL="LMTINY_PROCESS_ID=1"))
  assert out.returncode == 1
  calls = sandbox.calls("ssh")
  assert [(c[2], shlex.split(c[3])[6]) for c in calls[3:]] == [("h0", "start"), ("h1", "start"), ("h0", "stop")]


@pytest.mark.parametrize("args, words", [
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2", "--", "x"], ["--process-id 2"]),
    (["--coordinator", "h:1", "--num-processes", "2", "--", "x"], ["go together"]),
    (["--coordinator", "h", "--num-processes", "2", "--process-id", "0", "--", "x"], ["HOST:PORT"]),
    (["--hosts", "a,b", "--num-processes", "2", "--", "x"], ["--hosts sets the process count"]),
    (["--hosts", "a,b", "--coordinator", "h", "--", "x"], ["--coordinator 'h': must be HOST:PORT"]),
    (["--hosts", "a,b;c", "--", "x"], ["bad host name 'b;c'"]),
    (["--gpus", "all", "--", "x"], ["--gpus 'all'"]),
    (["--port", "70000", "--", "x"], ["--port 70000"]),
    (["stop"], ["stop needs --hosts"]),
    ([], ["training arguments go after --"]),
])
def test_gpu_bad_input_is_one_line_exit_2_and_nothing_runs(sandbox, args, words):
  line = _one_error_line(sandbox.run("gpu.sh", *args))
  for w in words:
    assert w in line
  assert sandbox.calls() == []


def test_gpu_dry_run_runs_nothing(sandbox):
  out = sandbox.run("gpu.sh", "--hosts", "h0,h1", "--dry-run", "--", "--config", "c.py")
  assert out.returncode == 0 and sandbox.calls() == []
  assert [shlex.split(line)[0] for line in out.stdout.splitlines()] == ["ssh"] * 4
  out = sandbox.run("gpu.sh", "--dry-run", "--python", "/nonexistent/python", "--", "--config", "c.py")
  assert out.returncode == 0 and out.stdout.splitlines()[-1] == "env /nonexistent/python -m lmtiny.train --config c.py"


def test_gpu_sweep_runs_the_sweep_verb_and_each_host_its_part(sandbox, tmp_path):
  trainer = tmp_path / "fake-python"
  _write_exe(trainer, FAKE_TRAINER)
  record = tmp_path / "rec.json"
  out = sandbox.run("gpu.sh", "--sweep", "--python", str(trainer), "--", "--config", "c.py", "--workdir", "w",
                    extra_env=dict(FAKE_RECORD=str(record)))
  assert out.returncode == 0, out.stderr
  assert json.loads(record.read_text())["argv"] == ["-m", "lmtiny.sweep", "--config", "c.py", "--workdir", "w"]
  line = _one_error_line(sandbox.run("gpu.sh", "--sweep", "--hosts", "h0,h1", "--", "--config", "c.py"))
  assert "give the sweep --part auto" in line and sandbox.calls() == []
  out = sandbox.run("gpu.sh", "--sweep", "--hosts", "h0,h1", "--", "--config", "c.py", "--part", "auto")
  assert out.returncode == 0, out.stderr
  for i, c in enumerate(sandbox.calls("ssh")[2:]):  # after the two idle checks
    words = shlex.split(c[3])
    assert words[words.index("start") + 1:words.index("start") + 5] == ["--python", "python3", "--module", "lmtiny.sweep"]
    assert f"LMTINY_PROCESS_ID={i}" in words and words[-2:] == ["--part", "auto"]


def test_remote_start_runs_the_module_asked_for(tmp_path):
  home = _worker_home(tmp_path)
  d = ["--dir", str(home / "lmtiny"), "--dry-run"]
  out = _run_remote("start", *d, "--module", "lmtiny.sweep", "--", "--workdir", "w")
  assert out.returncode == 0 and "-m lmtiny.sweep --workdir w" in out.stdout, out.stderr
  out = _run_remote("start", *d, "--module", "os", "--", "x")
  assert out.returncode == 2 and "--module 'os': lmtiny.train or lmtiny.sweep" in out.stderr


def test_create_survives_transient_describe_failures(sandbox):
  out = sandbox.run("tpu.sh", "create", *TPU, "--accelerator", "v4-128",
                    extra_env=dict(FAKE_QR_STATES="PROVISIONING,FAIL,FAIL,ACTIVE"))
  assert out.returncode == 0, out.stderr
  assert out.stderr.count("describe failed") == 2 and "is ACTIVE" in out.stderr
  out = sandbox.run("tpu.sh", "create", *TPU, "--accelerator", "v4-128",
                    extra_env=dict(FAKE_QR_STATES="FAIL", LMTINY_POLL_RETRIES="3"))
  assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].endswith("(3 tries in a row)")


def test_create_with_autocheckpoint_uses_gcloud_alpha(sandbox):
  out = sandbox.run("tpu.sh", "create", *TPU, "--accelerator", "v5litepod-16", "--spot", "--autocheckpoint",
                    "--no-wait")
  assert out.returncode == 0, out.stderr
  (call,) = sandbox.calls("gcloud")
  assert call[:4] == ["alpha", "compute", "tpus", "queued-resources"] and call[-2:] == ["--spot", "--autocheckpoint-enabled"]


def test_internal_ip_and_gcloud_args_reach_every_ssh_and_scp(sandbox):
  out = sandbox.run("tpu.sh", "cleanup", *TPU, "--internal-ip", "--gcloud-arg=--ssh-key-expire-after=1h")
  assert out.returncode == 0, out.stderr
  scp, ssh = sandbox.calls("gcloud")
  for call in (scp, ssh):
    assert "--internal-ip" in call and "--ssh-key-expire-after=1h" in call


def test_gpu_hosts_with_an_explicit_coordinator(sandbox):
  out = sandbox.run("gpu.sh", "--hosts", "h0,h1", "--coordinator", "10.1.0.5:9999", "--", "--config", "c.py")
  assert out.returncode == 0, out.stderr
  for call in sandbox.calls("ssh")[2:]:
    assert "LMTINY_COORDINATOR=10.1.0.5:9999" in shlex.split(call[3])
