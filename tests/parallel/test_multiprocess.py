"""Multi-host training, proved with 2 processes x 4 emulated CPU devices on this machine.

The processes join through lmtiny.parallel.distributed.initialize() over localhost (CPU collectives), the
same path `python -m lmtiny.train` takes on a GPU cluster. They train the tiny model on a
data x tensor mesh (4 x 2, spanning both processes), checkpoint, stop, and resume in fresh
processes; the losses match a 1-process 8-device run (this pytest process) to fp32 rounding.
Checkpoints also move between process counts, both ways.

The data is one row per document and as many documents as the global batch has rows, so every
step trains on all of them whatever the process count (each process packs its own slice): the
runs are comparable step for step without depending on how data order maps across counts.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from lm_fixtures import ROOT, xla_flags

HERE = os.path.join(ROOT, "tests")
# Every test here starts two processes that join one mesh (about 100 s on 2 cores in all).
pytestmark = pytest.mark.slow(seconds=100)
import multiprocess_worker as worker  # noqa: E402  (tests/ is on the path: conftest.py)

WORKER = os.path.join(HERE, "multiprocess_worker.py")
RTOL = 2e-5  # fp32: reduction order differs across process layouts (measured ~2e-7)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(tmp_path, name, run_specs, *, num_processes=2, declared=None, timeout=240, env=None):
  """Starts the workers, waits for all (or the first failure), always reaps; returns
  (exit codes, outputs, results) per process. `declared` overrides each one's process count.
  `run_specs`: WORKDIR[:STOP_AFTER][:OPTION=VALUE...] (tests/multiprocess_worker.py)."""
  port = _free_port()
  base = {k: v for k, v in os.environ.items() if not k.startswith(("LMTINY_", "JAX_COORD", "SLURM_", "OMPI_"))}
  # Later launches reuse the first one's compiled programs (same mesh, same layout) through the
  # session's compilation cache, which tests/conftest.py puts in the environment: a directory per
  # process index, since the processes of one launch compile the same programs at once and JAX
  # writes an entry in place (one could read the other's half-written file).
  base.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(), LMTINY_CPU_DEVICES="4", LMTINY_INIT_TIMEOUT="60",
              LMTINY_COORDINATOR=f"127.0.0.1:{port}", LMTINY_TEST_PARENT=str(os.getpid()))
  base.update(env or {})
  out = tmp_path / name
  procs, logs = [], []
  try:
    for i in range(num_processes):
      env = dict(base, LMTINY_PROCESS_ID=str(i), LMTINY_NUM_PROCESSES=str((declared or {}).get(i, num_processes)))
      if "JAX_COMPILATION_CACHE_DIR" in base:
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(base["JAX_COMPILATION_CACHE_DIR"], f"process{i}")
      log = open(tmp_path / f"{name}.log{i}", "w+")
      logs.append(log)
      procs.append(subprocess.Popen([sys.executable, WORKER, str(out), *run_specs], env=env, cwd=HERE,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.time() + timeout
    while time.time() < deadline:
      codes = [p.poll() for p in procs]
      if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
        break  # all done, or one failed: its peers would only wait for the heartbeat timeout
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append("".join(line for line in log if not line.startswith(("W0", "I0", "[Gloo]"))))
    log.close()
  results = [json.loads((tmp_path / f"{name}.{i}").read_text()) if (tmp_path / f"{name}.{i}").exists() else None
             for i in range(num_processes)]
  return [p.returncode for p in procs], outputs, results


def _losses(run):
  assert run["error"] is None, run["error"]
  # Val losses after training (a fresh run also evaluates at step 0, a resumed one does not).
  return np.array([loss for _, loss in run["train_loss"]]), np.array([v[1] for v in run["val"] if v[0] > 0])


def _in_process(workdir, stop_after=None):
  """The reference: one process, the 8 devices tests/conftest.py emulates."""
  import jax
  assert jax.process_count() == 1 and jax.device_count() == 8
  return worker.train(f"{workdir}:{stop_after}" if stop_after else str(workdir))


def _checkpoint_at(src, dst, step):
  """A copy of run directory `src` as it was right after the checkpoint at `step`."""
  shutil.copytree(src, dst)
  for s in os.listdir(dst / "checkpoints"):
    if s.isdigit() and int(s) > step:
      shutil.rmtree(dst / "checkpoints" / s)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """All scenarios, sharing processes to keep the time down (each launch of 2 processes costs
  their start-up, the join and the first compiles):
  reference (1 process, 6 steps) | 2 processes: steps 1-3, stop; then a mesh whose tensor axis
  spans both processes (refused); then steps 1-4, stop (checkpoints 3 and 4), after which process
  1's iterator state at step 4 is spoiled | 2 fresh processes: resume that first run to 6, resume
  the reference's step-3 checkpoint, resume the spoiled run, then a fresh run that process 1 alone
  gets a SIGTERM in | 1 process: resume the 2-process step 3. The first launch also scores fixed
  rows with the evals' scorer (what in-training CORE runs on every process)."""
  tmp = tmp_path_factory.mktemp("multiprocess")
  ref = _in_process(tmp / "ref")
  _checkpoint_at(tmp / "ref", tmp / "ref_at3", 3)
  first = run_processes(tmp, "first", [f"{tmp / 'two'}:3", f"{tmp / 'tp'}:mesh=1,1,8", f"{tmp / 'spoiled'}:4",
                                       "score"])
  assert first[0] == [0, 0], "\n".join(first[1])
  _checkpoint_at(tmp / "two", tmp / "two_at3", 3)
  # Valid JSON but no iterator state: process 0 alone would restore step 4 (a truncated file
  # fails to parse on both, since every process reads all the states to compare counts).
  (tmp / "spoiled" / "checkpoints" / "4" / "data_iter" / "process_1-of-2.json").write_text('{"spoiled": true}')
  second = run_processes(tmp, "second", [str(tmp / "two"), str(tmp / "ref_at3"), str(tmp / "spoiled"),
                                         f"{tmp / 'term'}:sigterm=1@2"])
  assert second[0] == [0, 0], "\n".join(second[1])
  one_from_two = _in_process(tmp / "two_at3")
  return dict(tmp=tmp, ref=ref, first=first[2], second=second[2], one_from_two=one_from_two)


def test_two_processes_form_one_mesh(runs):
  for i, r in enumerate(runs["first"]):
    assert (r["mode"], r["process_index"], r["process_count"]) == ("explicit", i, 2)
    assert (r["devices"], r["local_devices"], r["is_main"]) == (8, 4, i == 0)


def test_the_evals_scorer_on_two_processes_scores_like_one(runs):
  # Each process feeds its own rows of every batch and gets every row's score back.
  ref = worker.score()
  for r in runs["first"]:
    got = r["runs"][-1]
    assert got["tokens"] == ref["tokens"] and got["greedy_match"] == ref["greedy_match"]
    np.testing.assert_allclose(got["loss_sum"], ref["loss_sum"], rtol=RTOL)


def test_two_processes_train_and_resume_like_one(runs):
  ref_train, ref_val = _losses(runs["ref"])
  assert len(ref_train) == 6 and ref_train[-1] < ref_train[0] - 0.5  # it learns
  for first, second in zip(runs["first"], runs["second"]):  # both processes see the same numbers
    stopped, _ = _losses(first["runs"][0])
    resumed, val = _losses(second["runs"][0])
    assert first["runs"][0]["step"] == 3 and "resumed from checkpoint at step 3" in second["runs"][0]["log"]
    np.testing.assert_allclose(np.r_[stopped, resumed], ref_train, rtol=RTOL)
    np.testing.assert_allclose(val, ref_val, rtol=RTOL)
  states = sorted(os.listdir(runs["tmp"] / "two_at3" / "checkpoints" / "3" / "data_iter"))
  assert [s for s in states if s.endswith(".json")] == ["process_0-of-2.json", "process_1-of-2.json"]


def test_checkpoint_from_two_processes_resumes_in_one(runs):
  ref_train, ref_val = _losses(runs["ref"])
  resumed, val = _losses(runs["one_from_two"])
  np.testing.assert_allclose(resumed, ref_train[3:], rtol=RTOL)
  np.testing.assert_allclose(val, ref_val, rtol=RTOL)
  _data_position_reported(runs["one_from_two"]["log"], written_by=2)


def test_checkpoint_from_one_process_resumes_in_two(runs):
  ref_train, ref_val = _losses(runs["ref"])
  for r in runs["second"]:
    resumed, val = _losses(r["runs"][1])
    np.testing.assert_allclose(resumed, ref_train[3:], rtol=RTOL)
    np.testing.assert_allclose(val, ref_val, rtol=RTOL)
  _data_position_reported(runs["second"][0]["runs"][1]["log"], written_by=1)


def _data_position_reported(log, written_by):
  """A different process count either maps the data position exactly (silently) or says in one
  line what the data order does; never a silent reset."""
  notes = [line for line in log if f"written by {written_by} process" in line]
  mapped = [line for line in log if "data position mapped" in line]
  assert len(notes) == 1 or mapped, log


def test_checkpoint_unusable_on_one_process_is_skipped_by_all(runs):
  """Step 4 restores on process 0 but not on process 1 (its iterator state is spoiled): the
  processes agree on the verdict, so both resume from step 3 and train on in step; the warning
  names the step and the process that failed, and step 4 is moved aside (by process 0)."""
  ref_train, ref_val = _losses(runs["ref"])
  for r in runs["second"]:
    run = r["runs"][2]
    resumed, val = _losses(run)
    np.testing.assert_allclose(resumed, ref_train[3:], rtol=RTOL)
    np.testing.assert_allclose(val, ref_val, rtol=RTOL)
    (warning,) = [line for line in run["log"] if line.startswith("warning: checkpoint at step 4")]
    assert warning.startswith("warning: checkpoint at step 4 is unusable (process 1: ")
    assert warning.endswith("resuming from step 3")
    assert [line for line in run["log"] if line.startswith("resumed from")] == ["resumed from checkpoint at step 3"]
  assert sorted(d[:10] for d in os.listdir(runs["tmp"] / "spoiled" / "checkpoints")) == ["3", "6", "corrupt-4-"]


def test_process_count_that_disagrees_with_the_coordinator_is_one_line(tmp_path):
  codes, outputs, results = run_processes(tmp_path, "join", [], declared={1: 3}, timeout=120)
  assert codes[1] == 2, outputs[1]
  errors = [line for line in outputs[1].splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "LMTINY_NUM_PROCESSES=3 but the coordinator at 127.0.0.1:" in errors[0]
  assert errors[0].endswith("runs 2 processes")
  assert results[0] is None or results[0]["process_count"] == 2


def test_sigterm_on_one_host_stops_both_at_the_same_step(runs):
  """A preemption notice reaching process 1 only: the all-reduced decision stops both processes
  at one step, both save that checkpoint and exit 0 (no mismatched collectives, no hang)."""
  term = [r["runs"][3] for r in runs["second"]]
  assert [r["error"] for r in term] == [None, None], term
  steps = [r["step"] for r in term]
  assert steps[0] == steps[1] and 2 <= steps[0] < 6
  for r in term:
    assert f"stopped early (SIGTERM or stop_after): saved checkpoint at step {steps[0]}" in r["log"]
  run = runs["tmp"] / "term"
  assert sorted(os.listdir(run / "checkpoints"), key=int)[-1] == str(steps[0])
  assert sorted(os.listdir(run / "checkpoints" / str(steps[0]) / "data_iter"))[:2] == [
      "commit_success.txt", "process_0-of-2.json"]


def test_tensor_axis_across_processes_is_refused_in_one_line(runs):
  """data=1, tensor=8 over 2 x 4 devices: each process would feed different rows into batch
  shards that both hold; refused before anything is built."""
  for r in runs["first"]:
    error = r["runs"][1]["error"]
    assert error.startswith("ConfigError: config.mesh={'data': 1, 'fsdp': 1, 'tensor': 8}: a batch shard is held "
                            "by devices of processes [0, 1]"), error
  assert not os.path.exists(runs["tmp"] / "tp")
