"""Tests for lmtiny.training.lr_range and the lmtiny.lr_find verb: sweep, smoothing and reading of the curve, the swept step, a real run."""
import json
import os

import jax
import numpy as np
import pytest

from lmtiny import lr_find
from lmtiny.training import lr_range
from lmtiny.errors import ConfigError
from lmtiny.parallel import sharding
from lmtiny.training.param_groups import param_groups
from lmtiny.training.steps import build_steps, device_batch

import lm_fixtures

REPO = lm_fixtures.ROOT


def test_lr_sweep_is_geometric_and_rejects_bad_ranges():
  lrs = lr_range.lr_sweep(1e-6, 1.0, 7)
  assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
  np.testing.assert_allclose(lrs[1:] / lrs[:-1], 10.0)
  for lo, hi, steps in ((1.0, 0.1, 10), (0.0, 1.0, 10), (1e-3, 1e-3, 10), (1e-6, 1.0, 4), (1e-6, float("inf"), 10)):
    with pytest.raises(ConfigError):
      lr_range.lr_sweep(lo, hi, steps)


def test_suggested_flags_move_explicit_embedding_lrs_with_the_matrix_lr():
  # The sweep keeps embed_lr / lr fixed, so the suggestion must too (tiny: 2.5e-3 / 0.02 = 1/8).
  optim = lm_fixtures.load_config_module("tiny").get_config().optim
  assert lr_range.suggested_flags(0.04, optim) == ("--config.optim.lr=0.04 --config.optim.embed_lr=0.005 "
                                                  "--config.optim.unembed_lr=0.005")
  optim.update(embed_lr=0.0, unembed_lr=0.0)  # 0: the same as lr, nothing more to say
  assert lr_range.suggested_flags(0.04, optim) == "--config.optim.lr=0.04"


def test_smoothing_has_no_lag_where_a_plain_ema_does():
  ramp = np.linspace(0.0, 20.0, 401)
  beta = 0.9
  smoothed, forward = lr_range.smooth(ramp, beta), lr_range.ema(ramp, beta)
  middle = slice(195, 206)  # far from both ends, where the bias correction has died out
  np.testing.assert_allclose(smoothed[middle], ramp[middle], atol=1e-6)
  lag = beta / (1 - beta) * (ramp[1] - ramp[0])  # a plain EMA trails a ramp by beta / (1 - beta) steps
  np.testing.assert_allclose(ramp[middle] - forward[middle], lag, rtol=1e-6)
  np.testing.assert_allclose(lr_range.smooth(np.full(30, 2.5), beta), 2.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_analyze_reads_a_noisy_curve_like_the_clean_one(seed):
  lrs = np.geomspace(1e-5, 1.0, 301)
  x = np.log10(lrs)
  # Falls fastest at 1e-3 (the tanh's centre), bottoms out at 1e-2, then blows up.
  clean = 3.0 - np.tanh((x + 3.0) / 0.5) + np.exp(3.0 * (x + 1.0))
  assert lrs[np.argmin(clean)] == pytest.approx(1e-2)
  noisy = clean + np.random.default_rng(seed).normal(0.0, 0.03, lrs.size)
  noisy[-5:] = np.nan  # diverged steps at the end are dropped
  smoothed, steepest, lowest, suggested = lr_range.analyze(lrs, noisy, beta=lr_range.default_beta(301))
  assert abs(np.log10(steepest / 1e-3)) < 0.1   # within a quarter of the 1-decade tanh width
  assert abs(np.log10(lowest / 1e-2)) < 0.1
  assert suggested == pytest.approx(lowest / 10)
  assert len(smoothed) == 296
  assert np.abs(np.diff(smoothed[:60])).max() < np.abs(np.diff(noisy[:60])).max() / 5  # noise averaged out


def test_analyze_needs_finite_losses():
  with pytest.raises(ConfigError, match="lower --min"):
    lr_range.analyze(np.geomspace(1e-3, 1, 4), np.array([1.0, np.nan, np.inf, np.nan]), 0.9)


def _constant_lr_config(lr, embed_lr, unembed_lr):
  cfg = lm_fixtures.tiny_config()
  cfg.optim.update(lr=lr, embed_lr=embed_lr, unembed_lr=unembed_lr, warmup_steps=0, min_lr_ratio=1.0,
                   weight_decay=0.1, grad_clip=0.5)
  return cfg


def test_sweep_schedule_lists_the_sweep():
  np.testing.assert_allclose([lr_range.sweep_schedule(1e-6, 1.0, 7)(i) for i in range(7)],
                             lr_range.lr_sweep(1e-6, 1.0, 7), rtol=1e-12)


@pytest.mark.slow(seconds=10)
def test_swept_step_equals_the_trainer_step_at_that_lr():
  """Step i of the sweep is the trainer's own update at constant LR lr_i, group ratios kept."""
  low, high = 1e-2, 3e-1  # a 2-step sweep: step 0 at 1e-2, step 1 at 3e-1
  cfg = _constant_lr_config(1.0, 20.0, 0.4)  # embedding 20x, unembedding 0.4x the matrix LR
  mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])  # one device: compiles fastest
  swept = build_steps(cfg, mesh, 2, schedule=lr_range.sweep_schedule(low, high, 2))
  refs = [build_steps(_constant_lr_config(lr, 20 * lr, 0.4 * lr), mesh, 2) for lr in (low, high)]
  from lmtiny.data.pipeline import make_train_iterator
  it = make_train_iterator(lm_fixtures.memory_data().train_docs, seq_len=cfg.train.seq_len, batch_size=16,
                           bos_id=0, seed=0)
  with jax.set_mesh(mesh):
    state = swept.init()  # same optimizer structure in every run: one initialiser serves all
    for i, ref in enumerate(refs):
      batch = device_batch(next(it), mesh)
      before = jax.tree.map(np.asarray, state)
      ref_state, ref_metrics = ref.train_step(jax.tree.map(jax.numpy.asarray, before), batch)
      state, metrics = swept.train_step(state, batch)
      assert float(metrics["lr"]) == pytest.approx((low, high)[i], rel=1e-6)
      assert float(metrics["loss"]) == float(ref_metrics["loss"])
      moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                                           state["params"], before["params"]))
      assert min(moved) > 0.5 * 0.4 * (low, high)[i]  # every tensor moved by about its group's LR
      # The swept LR is a traced scalar, the reference's a constant XLA folds in: the same update
      # to float32 rounding, measured against the update's own size. Adam's first step is about
      # lr * g / (|g| + eps), so an entry whose gradient is near eps (a token seen once) turns
      # a rounding of g into up to 1e-3 of the step: a few such entries, none further off. The
      # rest agree to 1e-5 of the step, or to one float32 spacing of the parameter the update lands
      # on (a norm scale near 1.0 moved by 1e-2 rounds to 1.2e-5 of its step: XLA's thread count
      # decides such a rounding).
      for name, a, b, b0 in zip(param_groups(state["params"]), jax.tree.leaves(state["params"]),
                                jax.tree.leaves(ref_state["params"]), jax.tree.leaves(before["params"])):
        a, b = np.asarray(a), np.asarray(b)
        step = np.abs(b - b0).max()
        off = np.abs(a - b)
        rounding = np.maximum(1e-5 * step, np.spacing(np.abs(b)))
        assert off.max() <= 1e-3 * step and np.mean(off > rounding) <= 1e-3, (name, off.max() / step)


@pytest.mark.slow(seconds=6)
def test_range_test_on_a_learnable_task(tmp_path):
  cfg = lm_fixtures.tiny_config()
  result = lr_range.range_test(cfg, lm_fixtures.memory_data(), min_lr=1e-4, max_lr=30.0, steps=36,
                              workdir=str(tmp_path), log=lambda s: None)
  assert result.stopped_early  # a max LR of 30 diverges
  assert len(result.lrs) == len(result.losses) == len(result.smoothed) < 36
  assert np.min(result.losses) < result.losses[0] - 1.0  # it learned before diverging
  assert 1e-3 < result.steepest_lr < result.min_loss_lr < 3.0
  assert result.suggested_lr == pytest.approx(result.min_loss_lr / 10)
  png, path = lr_range.write_outputs(result, str(tmp_path / "out"), "test")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(path) as f:
    saved = json.load(f)
  assert saved["suggested_lr"] == result.suggested_lr and saved["losses"] == result.losses.tolist()
  assert sorted(os.listdir(tmp_path / "out")) == ["lr_find.json", "lr_find.png"]  # no temp files left
  text = lr_range.summary(result, cfg.optim)
  assert "steepest descent" in text and f"--config.optim.lr={result.suggested_lr:.2g}" in text


@pytest.mark.parametrize("argv,message", [
    (["--min", "1e-6"], "--config is required"),
    (["--config", "configs/tiny.py", "--min", "1", "--max", "0.1"], "need 0 < min < max"),
    (["--config", "configs/tiny.py", "--steps", "3"], "--steps=3"),
    (["--config", "configs/tiny.py", "--config.train.seq_len=4096"], "config.train.seq_len=4096"),
    (["--config", "configs/nope.py"], "cannot load config file"),
])
def test_cli_bad_input_one_line_exit_2(argv, message, capsys, monkeypatch):
  monkeypatch.chdir(REPO)
  assert lr_find.main(["lr_find"] + argv) == 2
  captured = capsys.readouterr()
  assert captured.out == "" and captured.err.startswith("error: ") and message in captured.err
  assert captured.err.count("\n") == 1
