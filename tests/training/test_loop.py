"""The training loop: learning, exact resume, mesh change, preemption, divergence, bad input."""
import json
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_fixtures import VOCAB, memory_data, one_device, tiny_config, ROOT
from lmtiny import config as config_lib
from lmtiny.training.benchmark import synthetic_batch
from lmtiny.errors import ConfigError, UserError
from lmtiny.parallel import sharding
from lmtiny.runs.checkpoint import Checkpointer
from lmtiny.training.loop import TrainingDiverged
from lmtiny.training.trainer import Trainer
from lmtiny.training.steps import build_steps, device_batch


def _losses(summary, after=0):
  return [loss for step, loss in summary["train_loss"] if step > after]


def _quiet(_):
  pass


@pytest.mark.slow(seconds=7)
def test_learns_and_writes_run_files(tmp_path):
  cfg = tiny_config(steps=24, eval_every=12, plot=True)
  summary = Trainer(one_device(cfg), str(tmp_path), memory_data(), log=_quiet).run()
  losses = _losses(summary)
  assert losses[0] == pytest.approx(np.log(VOCAB), abs=0.3)
  assert np.mean(losses[-4:]) < losses[0] - 1.0
  (s0, val0, bpb0), _, (s1, val1, bpb1) = summary["val"]
  assert (s0, s1) == (0, 24) and val0 == pytest.approx(np.log(VOCAB), abs=0.3)  # step 0: before training
  assert val1 < val0 - 1.0 and bpb1 < bpb0
  # bpb with 1 byte per token is the loss in bits.
  assert bpb1 == pytest.approx(val1 / np.log(2), rel=1e-5)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == list(range(2, 25, 2))
  assert {"loss", "lr", "grad_norm", "tokens_per_sec"} <= set(train[0])
  assert os.path.exists(tmp_path / "loss.png") and os.listdir(tmp_path / "tensorboard")
  assert json.load(open(tmp_path / "config.json"))["model"]["vocab_size"] == VOCAB
  assert json.load(open(tmp_path / "run_kind.json"))["kind"] == "train"
  assert json.load(open(tmp_path / "config.json"))["rl"]["init"] == ""  # every section, RL's unset


@pytest.mark.slow(seconds=8)
def test_resume_equals_uninterrupted_run(tmp_path):
  cfg = tiny_config(steps=8, checkpoint_every=4)
  cfg.mesh.update(data=2, tensor=4)
  full = Trainer(cfg, str(tmp_path / "full"), memory_data(), log=_quiet).run()
  first = Trainer(cfg, str(tmp_path / "split"), memory_data(), log=_quiet).run(stop_after=3)
  assert first["step"] == 3 and first["preempted"]
  assert Checkpointer(str(tmp_path / "split" / "checkpoints")).all_steps() == [3]
  second = Trainer(cfg, str(tmp_path / "split"), memory_data(), log=_quiet).run()
  assert _losses(first) + _losses(second) == _losses(full)  # exact on CPU, data position included
  assert second["val"] == full["val"][1:]  # the resumed run evaluates at 4 and 8, not again at 0
  steps_logged = [json.loads(l)["step"] for l in open(tmp_path / "split" / "metrics.jsonl")]
  assert steps_logged == sorted(steps_logged)  # the resumed run replaced, not duplicated, records


@pytest.mark.slow(seconds=11)
def test_restore_onto_a_different_mesh(tmp_path):
  cfg = tiny_config(steps=6)
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  full = Trainer(cfg, str(tmp_path / "a"), memory_data(), log=_quiet).run()
  Trainer(cfg, str(tmp_path / "b"), memory_data(), log=_quiet).run(stop_after=3)
  cfg.mesh.update(data=1, fsdp=8, tensor=1)
  resumed = Trainer(cfg, str(tmp_path / "b"), memory_data(), log=_quiet).run()
  np.testing.assert_allclose(_losses(resumed), _losses(full, after=3), rtol=2e-5)


@pytest.mark.slow(seconds=7)
def test_gradient_accumulation_matches_one_big_batch(tmp_path):
  whole = Trainer(tiny_config(steps=3), str(tmp_path / "a"), memory_data(), log=_quiet).run()
  accumulated = Trainer(tiny_config(steps=3, micro_batch_size=8), str(tmp_path / "b"), memory_data(),
                        log=_quiet).run()
  np.testing.assert_allclose(_losses(accumulated), _losses(whole), rtol=2e-5)
  # device_batch_size=1 on 8 data-parallel devices: micro-batches of 8, accumulation 2.
  cfg = tiny_config(steps=3, device_batch_size=1)
  assert config_lib.accumulation_steps(config_lib.resolve_batch(cfg, 8).train) == 2
  per_device = Trainer(cfg, str(tmp_path / "c"), memory_data(), log=_quiet).run()
  np.testing.assert_allclose(_losses(per_device), _losses(accumulated), rtol=1e-6)
  assert json.load(open(tmp_path / "c" / "config.json"))["train"]["device_batch_size"] == 1


@pytest.mark.slow(seconds=6)
def test_sigterm_saves_and_stops(tmp_path):
  def log(line):
    if line.startswith("step      2/"):
      os.kill(os.getpid(), signal.SIGTERM)

  summary = Trainer(one_device(tiny_config(steps=8)), str(tmp_path), memory_data(), log=log).run()
  assert summary["preempted"] and summary["step"] < 8
  assert Checkpointer(str(tmp_path / "checkpoints")).latest_step() == summary["step"]


@pytest.mark.slow(seconds=4)  # measured on 2 cores: out of the inner loop
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  trainer = Trainer(one_device(tiny_config(steps=8, checkpoint_every=2)), str(tmp_path), memory_data(), log=_quiet)
  real_step = trainer.steps.train_step

  def poisoned(state, batch):  # step 5 reports a NaN loss, as a diverging run would
    state, metrics = real_step(state, batch)
    bad = int(jax.device_get(state["step"])) == 5
    return state, {**metrics, "loss": metrics["loss"] * (np.nan if bad else 1.0)}

  trainer.steps.train_step = poisoned
  with pytest.raises(TrainingDiverged, match="at step 5.*last good checkpoint is step 4"):
    trainer.run()
  assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [2, 4]


def test_data_vocab_must_match_model(tmp_path):
  data = memory_data()
  data.tokenizer.vocab_size = VOCAB * 2
  with pytest.raises(ConfigError, match=r"model.vocab_size=128"):
    Trainer(tiny_config(), str(tmp_path / "run"), data)
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("kind", ["rl", "sft"])
def test_train_refuses_a_run_of_another_kind_before_any_write(tmp_path, kind):
  # Before: train resumed an RL (or SFT) run of the same model as its own, rewriting its config.json
  # and pruning its checkpoints. rl: a run from before run_kind.json (inferred); sft: recorded.
  cfg = tiny_config(steps=2)
  run = tmp_path / "run"
  run.mkdir()
  config = json.loads(cfg.to_json_best_effort())
  if kind == "rl":
    config["rl"] = {"steps": 2}
  else:
    (run / "run_kind.json").write_text(json.dumps({"kind": "sft"}))
  (run / "config.json").write_text(json.dumps(config))
  before = {name: (run / name).read_text() for name in os.listdir(run)}
  with pytest.raises(ConfigError, match=rf"^--workdir={run}: holds an? {kind} run \(lmtiny.{kind}\) \((inferred from|"
                     rf"recorded in) {run}/(config|run_kind).json\), not a train run \(lmtiny.train\)"):
    Trainer(cfg, str(run), memory_data(), log=_quiet).run()
  assert {name: (run / name).read_text() for name in os.listdir(run) if name != ".lock"} == before


@pytest.mark.parametrize("override,field", [
    (dict(batch_tokens=32 * 12), "train.batch_tokens"),     # 12 sequences over data=8
    (dict(batch_tokens=32 * 16, micro_batch_size=4), "train.micro_batch_size"),
    (dict(batch_tokens=32 * 24, device_batch_size=2), "train.device_batch_size"),  # 16 per micro-step
])
def test_batch_must_divide_over_data_parallel_devices(tmp_path, override, field):
  with pytest.raises(ConfigError, match=field):
    Trainer(tiny_config(**override), str(tmp_path / "run"), memory_data())
  assert not os.path.exists(tmp_path / "run")


def _eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in it, with the scan body depth."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


@pytest.mark.slow(seconds=4)
def test_weight_gradients_leave_every_micro_step_in_float32_and_z_loss_changes_only_the_gradient():
  """bf16 compute with 16 micro-steps: the accumulation scan takes the float32 weights, casts each
  to bf16 where it multiplies, and adds float32 weight gradients to the accumulator with no
  bf16 -> float32 convert of a weight-shaped value (a gradient rounded to bf16, as autodiff
  through the cast gives, would need one); z-loss adds to the gradient, not to the reported
  cross-entropy. (One row of 32 tokens per micro-step: no activation has a weight's shape.)"""
  cfg = tiny_config(micro_batch_size=1)
  cfg.model.update(dtype="bfloat16")
  cfg.mesh.update(data=1)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  steps = build_steps(cfg, mesh, total_steps=4)
  matrices = [tuple(x.shape) for x in jax.tree.leaves(steps.abstract_state["params"]) if x.ndim >= 2]
  # each matrix's shape and its 2-D forms (the dense layer multiplies [in, out])
  weight_shapes = set(matrices) | {(math.prod(s[:k]), math.prod(s[k:])) for s in matrices for k in range(1, len(s))}
  with jax.set_mesh(mesh):
    state = steps.init()
    batch = device_batch(synthetic_batch(cfg, 16), mesh)
    # The step's Python function: a jit with compiler options (lmtiny.parallel.xla_options) cannot nest.
    jaxpr = jax.make_jaxpr(steps.train_step.__wrapped__)(state, batch).jaxpr
    scans = [e for e in _eqns(jaxpr) if e.primitive.name == "scan"]
    assert scans, "no accumulation scan"
    body = scans[0].params["jaxpr"].jaxpr
    converts = [e for e in _eqns(body) if e.primitive.name == "convert_element_type"
                and tuple(e.invars[0].aval.shape) in weight_shapes]
    to_bf16 = [e for e in converts if e.invars[0].aval.dtype == jnp.float32 and e.outvars[0].aval.dtype == jnp.bfloat16]
    assert len(to_bf16) >= len(matrices) - 1  # the matrices, cast where used (not the embedding table)
    rounded_grads = [e for e in converts if e.invars[0].aval.dtype == jnp.bfloat16 and e.outvars[0].aval.dtype == jnp.float32]
    assert rounded_grads == []
    _, plain = steps.train_step(state, batch)
    cfg.train.z_loss = 1e-2
    z_steps = build_steps(cfg, mesh, total_steps=4)
    _, with_z = z_steps.train_step(z_steps.init(), batch)
  assert float(with_z["loss"]) == float(plain["loss"])
  assert float(with_z["grad_norm"]) != float(plain["grad_norm"])


def test_full_fine_tuning_takes_over_the_base_weights_instead_of_copying_them(tmp_path):
  """A run started from init_params (full SFT) holds the weights once: the base's buffers are
  donated to the state (a d32 fine-tune would otherwise carry 7.5 GB of fp32 base weights
  beside its own), and the trainer keeps no reference to them."""
  cfg = tiny_config(steps=1, checkpoint_every=1)
  base_run = Trainer(one_device(cfg), str(tmp_path / "base"), memory_data(), log=_quiet)
  with jax.set_mesh(base_run.mesh):
    base = base_run.steps.init()["params"]
    want = jax.tree.map(np.array, base)  # copies: a zero-copy view would pin the buffers on CPU
    state = base_run.steps.init(base)
  assert all(x.is_deleted() for x in jax.tree.leaves(base))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state["params"]), want)
  fine_tune = Trainer(one_device(cfg), str(tmp_path / "ft"), memory_data(), log=_quiet, init_params=state["params"])
  fine_tune.run()
  assert fine_tune.init_params is None and all(x.is_deleted() for x in jax.tree.leaves(state["params"]))


@pytest.mark.slow(seconds=8)
def test_core_during_training_equals_the_eval_cli_on_the_checkpoint(tmp_path, capsys):
  # train.core_every scores DCLM CORE and the HF6 tasks with the live parameters; the eval CLI, from
  # the saved checkpoint, must find the same accuracies (same items, same tokenizer, same weights).
  import eval_fixtures
  from lmtiny import eval as eval_cli
  from lmtiny.tasks import dclm, hf6
  fixtures = os.path.join(ROOT, "tests", "fixtures", "evals")
  tok = eval_fixtures.make_tokenizer(str(tmp_path / "tok"))
  cfg = eval_fixtures.run_config()
  cfg.train.update(steps=2, eval_every=2, core_every=1, core_tasks="core,hf6", core_items=3, core_data_dir=fixtures,
                   sample_tokens=4)
  data = memory_data(vocab=eval_fixtures.VOCAB)
  data.tokenizer = tok
  workdir = str(tmp_path / "run")
  Trainer(cfg, workdir, data).run()
  out = capsys.readouterr().out
  assert "step      1/2 | CORE (DCLM, 22 tasks) " in out and "step      2/2 | CORE (DCLM, 22 tasks) " in out
  assert "step      2/2 | HF6 mean " in out and "hellaswag " in out and "bigbench_operators " in out
  logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  by_split = {split: [r for r in logged if r["split"] == split] for split in ("core", "hf6")}
  assert [r["step"] for r in by_split["core"]] == [1, 2] and [r["step"] for r in by_split["hf6"]] == [1, 2]
  assert "hellaswag" not in by_split["core"][-1] and "core" not in by_split["hf6"][-1]
  assert eval_cli.main(["--workdir", workdir, "--tasks", "core,hf6", "--data-dir", fixtures, "--max-items", "3"]) == 0
  evaluated = json.load(open(os.path.join(workdir, "eval.json")))
  assert evaluated["step"] == 2
  for split in ("core", "hf6"):
    assert by_split[split][-1][split] == pytest.approx(evaluated[split], abs=1e-9)
  keys = [k for k in evaluated["results"] if k.startswith(dclm.KEY_PREFIX)] + list(hf6.TASKS)
  assert len(keys) == 28
  for name in keys:
    split = "core" if name.startswith(dclm.KEY_PREFIX) else "hf6"
    assert by_split[split][-1][name] == pytest.approx(evaluated["results"][name]["centered"], abs=1e-9)


@pytest.mark.parametrize("overrides, message", [
    ({"core_tasks": "core,nope"}, "config.train.core_tasks='core,nope': unknown task 'nope'"),
    ({"core_data_dir": "/nonexistent"}, "config.train.core_data_dir=/nonexistent: no eval_bundle/core.yaml"),
    ({"core_tasks": "hf6", "core_data_dir": "/nonexistent"}, "config.train.core_data_dir=/nonexistent: no hellaswag"),
])
def test_core_during_training_fails_before_the_first_step(tmp_path, overrides, message):
  fixtures = os.path.join(ROOT, "tests", "fixtures", "evals")
  cfg = tiny_config(core_every=1, **{"core_data_dir": fixtures, **overrides})
  with pytest.raises(UserError, match=message):
    config_lib.validate(cfg)
    Trainer(cfg, str(tmp_path / "run"), memory_data(), log=_quiet)
  assert not os.path.exists(tmp_path / "run")
