"""float16 with dynamic loss scaling: the scale's rule; a forced overflow skips steps (leaving the
state untouched) and halves the scale until gradients are finite; exact resume on 8 devices."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_fixtures import memory_data, one_device, tiny_config
from lmtiny.training import loss_scale
from lmtiny.training.trainer import Trainer


def _quiet(_):
  pass


def _fp16_config(**train):
  cfg = tiny_config(**train)
  cfg.model.dtype = "float16"
  return cfg


def test_scale_doubles_after_period_and_halves_on_overflow():
  o = tiny_config().optim
  o.update(loss_scale_init=8.0, loss_scale_period=3)
  state = loss_scale.init_state(o)
  trace = []
  for finite in (True, True, True, True, False, True, False, False):
    state = loss_scale.next_state(state, jnp.asarray(finite), o.loss_scale_period)
    trace.append((float(state["scale"]), int(state["good_steps"]), int(state["skipped_steps"])))
  assert trace == [(8, 1, 0), (8, 2, 0), (16, 0, 0), (16, 1, 0), (8, 0, 1), (8, 1, 1), (4, 0, 2), (2, 0, 3)]
  assert not loss_scale.all_finite({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.inf])})
  assert loss_scale.all_finite({"a": jnp.ones(3), "b": jnp.array([1.0, 3e38])})


@pytest.mark.slow(seconds=6)
def test_forced_overflow_skips_and_halves_until_finite(tmp_path):
  cfg = _fp16_config(steps=14, log_every=1, eval_every=14, checkpoint_every=14)
  cfg.optim.update(loss_scale_init=2.0 ** 26)  # per-token backward seed 2^26 / 512 tokens: overflows
  lines = []
  trainer = Trainer(one_device(cfg), str(tmp_path), memory_data(), log=lines.append)
  real_step, first = trainer.steps.train_step, {}

  def watched(state, batch):  # keep host copies of the state around the first (skipped) step
    if not first:
      first["before"] = jax.device_get({k: state[k] for k in ("params", "opt_state")})
      state, metrics = real_step(state, batch)
      first["after"] = jax.device_get({k: state[k] for k in ("params", "opt_state", "step")})
      return state, metrics
    return real_step(state, batch)

  trainer.steps.train_step = watched
  summary = trainer.run()  # the NaN-divergence stop must not fire for skipped float16 steps
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train = [r for r in records if r["split"] == "train"]
  scales = [r["loss_scale"] for r in train]  # the scale each step ran with
  skipped = [int(r["skipped_steps"]) for r in train]  # counted after each step
  k = skipped[-1]
  applies = [b == a for a, b in zip([0] + skipped, skipped)]
  first_apply = applies.index(True)  # overflow at first, halving each step until gradients are finite
  assert first_apply >= 2 and skipped[:first_apply] == list(range(1, first_apply + 1))
  assert sum(applies) >= 6  # then most steps apply (a later overflow may halve the scale once more)
  assert all(b - a in (0, 1) for a, b in zip([0] + skipped, skipped))
  assert scales == [2.0 ** 26 / 2 ** s for s in [0] + skipped[:-1]]  # halved per skip, kept otherwise
  assert sum("skipped: non-finite gradients" in l for l in lines) == k
  assert float(trainer.state["loss_scale"]["scale"]) == 2.0 ** 26 / 2 ** k
  assert int(trainer.state["loss_scale"]["skipped_steps"]) == k
  # The skipped first step left parameters and optimizer state exactly as they were.
  assert int(first["after"].pop("step")) == 1
  for got, want in zip(jax.tree.leaves(first["after"]), jax.tree.leaves(first["before"])):
    np.testing.assert_array_equal(got, want)
  losses = [loss for _, loss in summary["train_loss"]]
  assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.3  # float16 compute learns once steps apply


@pytest.mark.slow(seconds=9)
def test_resume_reproduces_losses_and_scale_on_8_devices(tmp_path):
  # A period of 2 doubles the scale every second finite step, before and after the resume point:
  # the counter must resume mid-period for the scales to agree.
  cfg = _fp16_config(steps=10, checkpoint_every=5, eval_every=10)
  cfg.optim.update(loss_scale_init=2.0 ** 12, loss_scale_period=2)
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  full = Trainer(cfg, str(tmp_path / "full"), memory_data(), log=_quiet)
  full_summary = full.run()
  first = Trainer(cfg, str(tmp_path / "split"), memory_data(), log=_quiet).run(stop_after=5)
  resumed = Trainer(cfg, str(tmp_path / "split"), memory_data(), log=_quiet)
  second = resumed.run()
  assert first["step"] == 5 and int(jax.device_get(resumed.state["step"])) == 10
  assert [l for _, l in first["train_loss"] + second["train_loss"]] == [l for _, l in full_summary["train_loss"]]
  want, got = jax.device_get(full.state["loss_scale"]), jax.device_get(resumed.state["loss_scale"])
  assert {k: float(v) for k, v in got.items()} == {k: float(v) for k, v in want.items()}
  assert float(want["scale"]) > 2.0 ** 12  # it grew
