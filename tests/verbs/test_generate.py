"""The generate CLI on a real (tiny) run directory: a 2-step training run on an 8-device mesh with
its own sentencepiece tokenizer, restored onto one device; completion, chat, and bad input."""
import glob
import io
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from lm_fixtures import ROOT, memory_data, tiny_config, xla_flags
from lmtiny import generate
from lmtiny.corpus.embedded import iter_embedded_documents
from lmtiny.model.sampling import Sampler, SamplingParams
from lmtiny.runs.directory import load_run, load_weights, RunError
from lmtiny.tokenizer import render_for_completion, train_tokenizer
from lmtiny.training.trainer import Trainer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("generate")
  tok = train_tokenizer(iter_embedded_documents(60_000), 512, str(root / "tok"))
  cfg = tiny_config(steps=2, checkpoint_every=2, eval_batches=0)
  cfg.model.update(vocab_size=tok.vocab_size)
  cfg.mesh.update(data=2, tensor=4)  # trained sharded; sampling restores onto one device
  data = memory_data(vocab=tok.vocab_size)
  data.tokenizer, data.bos_id = tok, tok.bos_id
  trainer = Trainer(cfg, str(root / "run"), data, log=lambda _: None)
  trainer.run()
  return SimpleNamespace(path=str(root / "run"), params=jax.device_get(trainer.state["params"]))


def _args(**kw):
  base = dict(max_new_tokens=6, temperature=0.0, top_k=50, top_p=0.95, seed=0, num_samples=1, stop=[],
              chat=False, prompt="x")
  return SimpleNamespace(**{**base, **kw})


@pytest.mark.slow(seconds=10)
def test_restores_trained_params_onto_one_device(run_dir):
  run, restored = load_weights(run_dir.path)
  assert run.step == 2 and run.tokenizer.vocab_size == 512
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(run_dir.params)):
    assert len(got.sharding.device_set) == 1
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert len(jax.tree.leaves(restored)) == len(jax.tree.leaves(run_dir.params))
  with pytest.raises(RunError, match="--step=5: no such checkpoint"):
    load_run(run_dir.path, step=5)


@pytest.fixture(scope="module")
def loaded(run_dir):
  run, params = load_weights(run_dir.path)
  return run, Sampler(run.model(params))


def test_complete_streams_the_sampler_output(loaded):
  run, sampler = loaded
  out, err = io.StringIO(), io.StringIO()
  texts = generate.complete(sampler, run, "def f", SamplingParams(0.0), _args(), out=out, err=err)
  tok = run.tokenizer
  want = sampler.generate([[tok.bos_id] + tok.encode("def f")], max_new_tokens=6, sampling=SamplingParams(0.0),
                          stop_ids=[tok.bos_id]).tokens[0]
  assert texts == [tok.decode(want)]
  assert out.getvalue() == "def f" + texts[0] + "\n"
  assert "prefill" in err.getvalue() and "tok/s" in err.getvalue()


def test_chat_keeps_the_history_and_stops_at_assistant_end(loaded):
  run, sampler = loaded
  tok = run.tokenizer
  calls = []

  class Spy:
    def generate(self, prompts, **kw):
      calls.append((prompts[0], kw["stop_ids"]))
      return sampler.generate(prompts, **kw)

  out = io.StringIO()
  history = generate.chat(Spy(), run, SamplingParams(0.0), _args(chat=True), ["hello\n", "\n", "more please\n"],
                          out=out, err=io.StringIO())
  assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
  assert calls[0][0] == render_for_completion(tok, history[:1])
  assert calls[1][0] == render_for_completion(tok, history[:3])  # the first exchange is in the prompt
  assert set(calls[0][1]) == {tok.special_id("assistant_end"), tok.bos_id}
  assert out.getvalue() == "".join(f"assistant: {m['content']}\n" for m in history[1::2])


def _cli(*argv, timeout=240):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=xla_flags())
  return subprocess.run([sys.executable, "-m", "lmtiny.generate", *argv], capture_output=True,
                        text=True, cwd=ROOT, env=env, timeout=timeout)


@pytest.mark.parametrize("argv, message", [
    (["--prompt", ""], "--prompt: empty"),
    (["--prompt", "hi", "--top-p", "0"], "--top-p=0.0: must be in (0, 1]"),
    (["--prompt", "hi", "--top-p", "1.5"], "--top-p=1.5: must be in (0, 1]"),
    (["--prompt", "word " * 80], "but the model's context is 64 tokens"),
    (["--prompt", "hi", "--step", "7"], "--step=7: no such checkpoint"),
    (["--prompt", "hi", "--group-size", "7"], "--group-size=7: only applies with --quantize"),
])
def test_cli_bad_input_exits_2_with_one_line(run_dir, argv, message, capsys):
  # in-process (the subprocess tests below check what a fresh interpreter prints; the journeys type
  # the documented commands: completion, --num-samples, piped chat, a relative --workdir)
  assert generate.main(["--workdir", run_dir.path, *argv]) == 2
  out, err = capsys.readouterr()
  assert err.count("\n") == 1 and err.startswith("error: ") and message in err
  assert out == ""


def test_cli_without_a_checkpoint_exits_2(tmp_path):
  done = _cli("--workdir", str(tmp_path), "--prompt", "hi")
  assert done.returncode == 2 and done.stderr.startswith("error: ") and "no checkpoint" in done.stderr
  assert os.listdir(tmp_path) == []  # nothing was created


def _run_with_damaged(run_dir, tmp_path, damaged):
  """A copy of the run with a second checkpoint (3, a copy of 2); every array-data file of the
  steps in `damaged` cut to nothing (so the parameters cannot survive, whatever the file order)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(run_dir.path, workdir)
  shutil.copytree(f"{workdir}/checkpoints/2", f"{workdir}/checkpoints/3")
  for step in damaged:
    for f in glob.glob(f"{workdir}/checkpoints/{step}/state/ocdbt.process_0/d/*"):
      os.truncate(f, 0)
  return workdir


@pytest.mark.slow(seconds=3)  # measured on 2 cores: out of the inner loop
def test_cli_falls_back_past_a_damaged_checkpoint_in_one_line(run_dir, tmp_path):
  """One warning line for the skipped checkpoint and nothing else: the reads a failed restore
  abandons (tracebacks of "Event loop is closed", unretrieved task errors) are not printed."""
  workdir = _run_with_damaged(run_dir, tmp_path, [3])
  done = _cli("--workdir", workdir, "--prompt", "def ", "--max-new-tokens", "3")
  assert done.returncode == 0, done.stderr
  lines = done.stderr.splitlines()
  assert len(lines) == 3, done.stderr[-3000:]  # the warning, the run's line, the timing line
  assert lines[0].startswith(f"warning: {workdir}: checkpoint at step 3 is unusable (OUT_OF_RANGE: Error reading ")
  assert lines[1].startswith(f"{workdir}: step 2, ") and lines[2].startswith("prefill ")


def test_cli_with_every_checkpoint_damaged_is_one_error_and_its_warnings(run_dir, tmp_path):
  workdir = _run_with_damaged(run_dir, tmp_path, [2, 3])
  done = _cli("--workdir", workdir, "--prompt", "def ")
  assert done.returncode == 2 and done.stdout == ""
  lines = done.stderr.splitlines()
  assert len(lines) == 3, done.stderr[-3000:]
  assert [line.split(" is unusable")[0] for line in lines[:2]] == [
      f"warning: {workdir}: checkpoint at step {step}" for step in (3, 2)]
  assert lines[2].startswith(f"error: --workdir={workdir}: no usable checkpoint (step 3: OUT_OF_RANGE: ")
