"""Every bad input and damaged run directory of the reliability issue, through the real entry points
(`main(argv)`, in-process; subprocesses only where a signal or a kill is the point): exit status,
exactly one `error:` line naming the field or file, no traceback, nothing written."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lm_fixtures import ROOT, xla_flags
from lmtiny import bench, cli, generate, lr_find, sft, sweep, train
from lmtiny.data import prepare
from lmtiny.runs.checkpoint import CheckpointSaveError
from lmtiny.runs.lock import RunLock
from lmtiny.tokenizer import train as tokenizer_train
from lmtiny.training.loop import TrainingDiverged

TINY = os.path.join(ROOT, "configs", "tiny.py")
SMALL = ["--config.model.num_layers=1", "--config.model.d_model=64", "--config.model.num_heads=2",
         "--config.train.steps=4", "--config.train.checkpoint_every=2", "--config.train.eval_every=2",
         "--config.train.eval_batches=1", "--config.train.sample_tokens=4", "--config.train.log_every=1",
         "--config.train.plot=False", "--config.data.embedded_max_chars=300000"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A finished 4-step run of the tiny config (checkpoints 2 and 4), and the shared data cache."""
  root = tmp_path_factory.mktemp("catalogue")
  argv = ["train", "--config", TINY, "--workdir", str(root / "run"), f"--config.data.cache_dir={root / 'cache'}", *SMALL]
  assert train.main(argv) == 0
  return root, argv


def _copy_run(base, tmp_path):
  shutil.copytree(base[0] / "run", tmp_path / "run")
  return str(tmp_path / "run")


def _train_argv(base, workdir, *extra):
  argv = list(base[1])
  argv[argv.index("--workdir") + 1] = workdir
  return argv + list(extra)


def _truncate_all(workdir):
  """Every array-data file of every checkpoint cut to nothing. (Cut in half, as before, a checkpoint
  keeps whatever arrays its async save happened to write into the files' first halves: when that
  was every parameter, generate, which reads and verifies only the parameters, rightly loaded it;
  see test_faults.py::test_damage_outside_the_parameters_leaves_the_weights_usable.)"""
  for f in glob.glob(f"{workdir}/checkpoints/*/state/ocdbt.process_0/d/*"):
    os.truncate(f, 0)


def _one_error(capsys, status, expected_status=2):
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert status == expected_status and len(errors) == 1 and "Traceback" not in err, err[-3000:]
  return errors[0]


def _read_only_dir(tmp_path):
  """A read-only tmpfs (root can write anywhere else); None where mounting is not allowed."""
  path = tmp_path / "ro"
  path.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True).returncode:
    return None
  return path


# ---------------------------------------------------------------------------------------------
# Bad input at the edge: nothing has been written when the error appears.


def _cases(tmp):
  a_file = tmp / "a_file"
  a_file.write_text("not a directory")
  no_get_config = tmp / "no_get_config.py"
  no_get_config.write_text("x = 1\n")
  cfg = ["--config", TINY]
  tok = ["--tokenizer", str(tmp / "tok"), "--source", "embedded"]
  return [
      (train.main, ["train", *cfg, "--config.train.keep_checkpoints=0"], "config.train.keep_checkpoints=0: must be an integer >= 1"),
      (train.main, ["train", *cfg, "--config.data.num_workers=-1"], "config.data.num_workers=-1: must be an integer >= 0"),
      (train.main, ["train", *cfg, "--config.data.shuffle_seed=-1"], "config.data.shuffle_seed=-1: must be an integer in [0, 2**32)"),
      (train.main, ["train", *cfg, "--config.data.embedded_max_chars=-5"], "config.data.embedded_max_chars=-5: must be an integer >= 0"),
      (train.main, ["train", *cfg, "--config.optim.b1=5"], "config.optim.b1=5.0: must be in [0, 1)"),
      (train.main, ["train", *cfg, "--config.optim.b2=1.0"], "config.optim.b2=1.0: must be in [0, 1)"),
      (train.main, ["train", "--config", str(no_get_config)], f"--config={no_get_config}: the file defines no get_config()"),
      (train.main, ["train", *cfg, "--workdir", str(a_file)], f"--workdir={a_file}: exists and is not a directory"),
      (train.main, ["train", *cfg, "--workdir", str(a_file / "run")], f"--workdir={a_file / 'run'}: {a_file} is a file"),
      (bench.main, ["bench", *cfg, "--steps", "0"], "--steps=0: must be >= 1"),
      (lr_find.main, ["lr_find", *cfg, "--workdir", str(a_file)], f"--workdir={a_file}: exists and is not a directory"),
      (sweep.main, ["sweep", *cfg, "--workdir", str(a_file), "--grid", "model.num_layers=1,2"],
       f"--workdir={a_file}: exists and is not a directory"),
      (sweep.main, ["sweep", *cfg, "--workdir", str(tmp / "s"), "--grid", "train.flops_budget=-1"],
       "sweep child flops_budget--1: config.train.flops_budget=-1.0: must be a finite number >= 0"),
      (prepare.main, [*tok, "--out", str(tmp / "out"), "--workers", "-3"], "--workers -3: must be >= 0"),
      (prepare.main, [*tok, "--out", str(a_file)], f"--out={a_file}: exists and is not a directory"),
      (tokenizer_train.main, ["--mixture", os.path.join(ROOT, "tokenizer_data", "embedded.py"), "--out", str(a_file)],
       f"--out={a_file}: exists and is not a directory"),
      (generate.main, ["--workdir", str(tmp), "--prompt", "x", "--temperature", "inf"],
       "--temperature=inf: must be a finite number >= 0"),
  ]


def test_sft_init_on_a_data_directory_is_one_short_line(tmp_path, capsys, monkeypatch):
  """A shard directory (lmtiny.data.prepare) given as the base run: the error raised while the run's
  config is read as sft's config arrives wrapped in config_flags' flattened traceback (~1,000
  characters); one short line without it."""
  monkeypatch.chdir(tmp_path)
  os.makedirs("data/x")
  (tmp_path / "data" / "x" / "manifest.json").write_text("{}")
  line = _one_error(capsys, sft.main(["sft", "--init", "data/x"]))
  assert line.startswith("error: --init=data/x: not a run directory") and len(line) < 160 and "File " not in line, line
  assert os.listdir(tmp_path) == ["data"] and os.listdir("data/x") == ["manifest.json"]


def test_bad_inputs_through_the_entry_points(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)  # default workdirs (runs/...) would land here
  # Python's default, which a user has: importing a file caches its bytecode in __pycache__ beside
  # it (so a loaded config file could leave one in the user's directory)
  monkeypatch.setattr(sys, "dont_write_bytecode", False)
  cases = _cases(tmp_path)
  for main, argv, message in cases:
    line = _one_error(capsys, main(argv))
    assert message in line, (argv, line)
  assert sorted(os.listdir(tmp_path)) == ["a_file", "no_get_config.py"]  # nothing written anywhere
  ro = _read_only_dir(tmp_path)
  if ro is not None:  # the unwritable output, as root sees one
    try:
      for main, argv in [(train.main, ["train", "--config", TINY, "--workdir", str(ro / "run")]),
                         (prepare.main, ["--tokenizer", "t", "--source", "embedded", "--out", str(ro / "o")])]:
        assert f"cannot write to {ro} (Read-only file system)" in _one_error(capsys, main(argv))
    finally:
      subprocess.run(["umount", "-l", str(ro)], check=True)
  print(f"catalogue: {len(cases) + 2 * (ro is not None)} bad inputs, each one line")


# ---------------------------------------------------------------------------------------------
# A damaged or busy run directory.


@pytest.mark.parametrize("error", [
    TrainingDiverged("loss=nan grad_norm=nan at step 5: training stopped; the last good checkpoint is step 4"),
    CheckpointSaveError("checkpoint at step 4 failed to save (disk full: No space left on device) in RUN; "
                        "the last good checkpoint is step 2")])
def test_a_run_that_fails_on_its_own_is_one_line_and_exit_1(error, capsys):
  # train, sft and rl all end through cli.run_main: no traceback, status 1 (2 is for bad input).
  def run(argv):
    raise error
  assert cli.run_main(run, []) == 1
  assert capsys.readouterr().err == f"error: {error}\n"


@pytest.mark.slow(seconds=11)
def test_second_run_in_a_busy_workdir_is_one_line(base, tmp_path, capsys):
  workdir = _copy_run(base, tmp_path)
  before = sorted(os.listdir(workdir))
  with RunLock(workdir):  # as a live run elsewhere holds it (flock: per open file, so also in-process)
    line = _one_error(capsys, train.main(_train_argv(base, workdir, "--config.train.steps=6")))
  assert "another training run is using this directory (pid" in line and sorted(os.listdir(workdir)) == before


@pytest.mark.slow(seconds=12)  # measured on 2 cores, with the module's trained run: out of the inner loop
def test_changed_model_shape_is_one_line_and_the_run_stays_usable(base, tmp_path, capsys):
  workdir = _copy_run(base, tmp_path)
  config = open(f"{workdir}/config.json").read()
  line = _one_error(capsys, train.main(_train_argv(base, workdir, "--config.model.num_layers=2")))
  assert "other shapes (model.num_layers 1 -> 2)" in line
  assert open(f"{workdir}/config.json").read() == config  # generate on this run still works


@pytest.mark.slow(seconds=1)  # measured on 2 cores: out of the inner loop
def test_no_usable_checkpoint_is_one_line_for_train_and_generate(base, tmp_path, capsys):
  workdir = _copy_run(base, tmp_path)
  _truncate_all(workdir)
  line = _one_error(capsys, train.main(_train_argv(base, workdir, "--config.train.steps=6")))
  assert "no checkpoint restores cleanly (step 4: " in line and "; step 2: " in line
  assert sorted(os.listdir(f"{workdir}/checkpoints")) == ["2", "4"]  # nothing moved, nothing deleted
  line = _one_error(capsys, generate.main(["--workdir", workdir, "--prompt", "def "]))
  assert line.startswith(f"error: --workdir={workdir}: no usable checkpoint (step 4: ")


@pytest.mark.slow(seconds=2)  # measured on 2 cores: out of the inner loop
def test_generate_falls_back_from_a_corrupt_newest_checkpoint(base, tmp_path, capfd):
  workdir = _copy_run(base, tmp_path)
  os.remove(f"{workdir}/checkpoints/4/state/manifest.ocdbt")
  assert generate.main(["--workdir", workdir, "--prompt", "def ", "--max-new-tokens", "4"]) == 0
  out = capfd.readouterr()  # generate's text goes to the real stdout
  warnings = [l for l in out.err.splitlines() if l.startswith("warning:")]
  assert len(warnings) == 1 and "checkpoint at step 4 is unusable" in warnings[0]
  assert f"{workdir}: step 2," in out.err  # sampled from step 2 (exit 0 above)
  assert os.path.isdir(f"{workdir}/checkpoints/4")  # generate moves nothing: a run may be using it


_LOAD_THREE_TIMES = """
import gc, sys, time
from lmtiny.runs.directory import load_weights
for _ in range(3):
  try:
    load_weights(sys.argv[1])
  except Exception as e:  # the RunError, each time: every checkpoint is damaged
    print(f"error: {e}", file=sys.stderr)
gc.collect()
time.sleep(0.5)  # the reads each failed restore abandoned finish into its closed event loop
gc.collect()
"""


@pytest.mark.slow(seconds=3)  # measured on 2 cores: out of the inner loop
def test_failed_restores_print_their_lines_and_nothing_else(base, tmp_path):
  """Cut in half, the data files still serve the reads of their first halves, which are in flight
  when one read fails: before, each left tracebacks ("Event loop is closed", unretrieved task
  errors with their tensorstore specs; hundreds of lines here) on stderr."""
  workdir = _copy_run(base, tmp_path)
  for step_dir in glob.glob(f"{workdir}/checkpoints/*"):
    for f in glob.glob(f"{step_dir}/state/ocdbt.process_0/d/*"):
      os.truncate(f, os.path.getsize(f) // 2)
    (path,) = [f for f in glob.glob(f"{step_dir}/fingerprint/*") if not f.endswith("commit_success.txt")]
    saved = json.load(open(path))
    saved["params"][0] += 1  # unusable even where the cut spares every parameter
    json.dump(saved, open(path, "w"))
  env = dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  done = subprocess.run([sys.executable, "-c", _LOAD_THREE_TIMES, workdir], capture_output=True, text=True,
                        env=env, timeout=300)
  lines = done.stderr.splitlines()
  assert done.returncode == 0 and len(lines) == 9, done.stderr[-3000:]  # 3 x (2 warnings, 1 error)
  assert [line.split(":")[0] for line in lines] == ["warning", "warning", "error"] * 3


# ---------------------------------------------------------------------------------------------
# Signals and kills (subprocesses: the point is what a real process does).


def _spawn_train(base, workdir, *extra):
  # No compilation cache: JAX writes an entry in place, and a process killed while writing one
  # would leave a truncated entry for the next reader of the session's cache (an abort, not a miss).
  env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.Popen([sys.executable, "-m", "lmtiny.train", *_train_argv(base, workdir, *extra)[1:]],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(predicate, proc, timeout=120):
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.02)


@pytest.mark.slow
def test_resume_past_a_damaged_checkpoint_says_one_warning_and_nothing_else(base, tmp_path):
  """A real `python -m lmtiny.train` resuming past a truncated newest checkpoint: one warning line
  (in its log, stdout) and an empty stderr, not the tracebacks of the reads the failed restore left."""
  workdir = _copy_run(base, tmp_path)
  for f in glob.glob(f"{workdir}/checkpoints/4/state/ocdbt.process_0/d/*"):
    os.truncate(f, 0)
  proc = _spawn_train(base, workdir, "--config.train.steps=6")
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0 and err == "", err[-3000:]
  (warning,) = [line for line in out.splitlines() if "unusable" in line]
  assert warning.startswith("warning: checkpoint at step 4 is unusable (OUT_OF_RANGE: Error reading ")
  assert warning.endswith("resuming from step 2") and "resumed from checkpoint at step 2" in out


@pytest.mark.slow(seconds=5)
def test_sigterm_before_the_loop_exits_0_and_saves_nothing(base, tmp_path):
  workdir = str(tmp_path / "fresh")
  proc = _spawn_train(base, workdir)
  _wait_for(lambda: os.path.exists(f"{workdir}/.lock"), proc)  # start-up: data loaded, not yet training
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "stopped (SIGTERM) before step 1: nothing new to save" in out and "Traceback" not in err
  assert not glob.glob(f"{workdir}/checkpoints/[0-9]*")


@pytest.mark.slow(seconds=10)
def test_kill_9_mid_save_then_resume_repeats_the_same_losses(base, tmp_path, capsys):
  """kill -9 while the step-4 checkpoint is being written (async save in flight): the re-run
  resumes from step 2 and reproduces the uninterrupted run's losses and final val loss."""
  workdir = str(tmp_path / "killed")
  proc = _spawn_train(base, workdir)
  _wait_for(lambda: glob.glob(f"{workdir}/checkpoints/4.orbax-checkpoint-tmp*"), proc, timeout=240)
  proc.kill()
  proc.communicate()
  assert os.path.isdir(f"{workdir}/checkpoints/2")
  assert train.main(_train_argv(base, workdir)) == 0
  out = capsys.readouterr().out
  from lmtiny.runs.metrics import read_metrics
  def curve(d):
    return [(r["step"], r["split"], round(r["loss"], 6)) for r in read_metrics(d) if r["split"] in ("train", "val")]
  assert curve(workdir) == curve(str(base[0] / "run"))  # same records, none duplicated
  # The kill lands while step 4's save is in flight (it takes far longer than the poll interval).
  assert "resumed from checkpoint at step 2" in out or "resumed from checkpoint at step 4" in out
  first = next(r for r in read_metrics(workdir) if r["split"] == "val")  # step 0, before the kill
  assert first["step"] == 0 and f"| val loss {first['loss']:.3f} -> " in out  # the whole run's curve
