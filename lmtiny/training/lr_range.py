"""The learning-rate range test behind `python -m lmtiny.lr_find`: train briefly with an exponentially growing LR and read the loss curve.

Step i trains one real batch at lr_i = min * (max / min) ** (i / (steps - 1)), with the trainer's
own train step (clipping, AdamW, masked weight decay, per-group LR multipliers) built with that
sweep as its schedule. The swept LR is
the matrix LR, `optim.lr`; embedding and unembedding groups keep their ratio to it. The test
stops early once the loss is not finite or its running average exceeds 4x its best.

Reading the curve: the losses are smoothed by a forward-backward exponential average (no lag, so
the LR axis is not shifted). Reported are the LR of steepest descent (most negative slope of the
smoothed loss per unit log LR, before its minimum), the LR of the minimum smoothed loss, and a
suggested peak LR = minimum-loss LR / 10, the usual rule for a warmup + decay schedule. Writes
`lr_find.png` (loss vs LR) and `lr_find.json` (the curve and the three LRs) to the run directory.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable

import jax
import numpy as np

from lmtiny.errors import ConfigError
from lmtiny.fs.atomic import atomic_write_json
from lmtiny.runs.figures import new_figure, save_figure
from lmtiny.training.resolved import resolve_run, ResolvedRun
from lmtiny.training.steps import device_batch
from lmtiny.training.trainer import Trainer

DIVERGENCE_FACTOR = 4.0


@dataclasses.dataclass
class RangeTestResult:
  lrs: np.ndarray        # the LR of each completed step
  losses: np.ndarray     # the training loss of each step (before its update)
  smoothed: np.ndarray
  steepest_lr: float
  min_loss_lr: float
  suggested_lr: float
  stopped_early: bool    # diverged before reaching the last LR

  def to_json(self) -> dict:
    return dict(lrs=self.lrs.tolist(), losses=self.losses.tolist(), smoothed=self.smoothed.tolist(),
                steepest_lr=self.steepest_lr, min_loss_lr=self.min_loss_lr, suggested_lr=self.suggested_lr,
                stopped_early=self.stopped_early)


def lr_sweep(min_lr: float, max_lr: float, steps: int) -> np.ndarray:
  """Geometric LRs from min_lr to max_lr inclusive."""
  if not 0 < min_lr < max_lr < float("inf"):
    raise ConfigError(f"--min={min_lr:g} --max={max_lr:g}: need 0 < min < max, both finite")
  if steps < 5:
    raise ConfigError(f"--steps={steps}: need at least 5 steps to read a slope")
  return np.geomspace(min_lr, max_lr, steps)


def default_beta(steps: int) -> float:
  """Smoothing over about 5% of the sweep (at least 2 steps)."""
  return 1.0 - 1.0 / max(2.0, steps / 20)


def ema(values: np.ndarray, beta: float) -> np.ndarray:
  """Bias-corrected exponential moving average (the first value is not pulled towards 0)."""
  out, avg = np.empty(len(values)), 0.0
  for i, v in enumerate(values):
    avg = beta * avg + (1 - beta) * v
    out[i] = avg / (1 - beta ** (i + 1))
  return out


def smooth(losses: np.ndarray, beta: float) -> np.ndarray:
  """Forward-backward EMA: the mean of the forward pass and the reversed backward pass, no lag."""
  losses = np.asarray(losses, np.float64)
  return 0.5 * (ema(losses, beta) + ema(losses[::-1], beta)[::-1])


def analyze(lrs: np.ndarray, losses: np.ndarray, beta: float) -> tuple[np.ndarray, float, float, float]:
  """(smoothed losses, steepest-descent LR, minimum-loss LR, suggested peak LR)."""
  lrs, losses = np.asarray(lrs, np.float64), np.asarray(losses, np.float64)
  finite = np.isfinite(losses)
  if finite.sum() < 3:
    raise ConfigError(f"the loss was finite for only {int(finite.sum())} step(s): lower --min")
  lrs, losses = lrs[finite], losses[finite]
  smoothed = smooth(losses, beta)
  lowest = int(np.argmin(smoothed))
  slopes = np.gradient(smoothed, np.log(lrs))
  # Skip the first smoothing window (the edge of the smoother is as noisy as the raw loss) and
  # look for the steepest fall before the minimum.
  skip = min(int(round(1 / (1 - beta))), max(lowest - 2, 0))
  steepest = skip + int(np.argmin(slopes[skip:max(lowest, skip + 2)]))
  return smoothed, float(lrs[steepest]), float(lrs[lowest]), float(lrs[lowest] / 10)


def sweep_schedule(min_lr: float, max_lr: float, steps: int):
  """The matrix LR of step i: min_lr * (max_lr / min_lr) ** (i / (steps - 1)), as lr_sweep lists."""
  ratio = max_lr / min_lr
  return lambda count: min_lr * ratio ** (count / (steps - 1))


def sweep_config(cfg, steps: int):
  """The config of a sweep of `steps` steps (its horizon: the sweep, not the config's)."""
  cfg = cfg.copy_and_resolve_references()
  cfg.train.update(steps=steps, tokens_per_param=0.0)
  return cfg


def range_test(cfg, data, *, min_lr: float = 1e-6, max_lr: float = 1.0, steps: int = 200,
               workdir: str = "runs/lr_find", log: Callable[[str], None] = print) -> RangeTestResult:
  """Runs the LR range test for `cfg` (a config, or sweep_config's resolved) on `data` (what
  lmtiny.data.dataset.load_data returns)."""
  lrs = lr_sweep(min_lr, max_lr, steps)
  run = cfg if isinstance(cfg, ResolvedRun) else resolve_run(sweep_config(cfg, steps))
  trainer = Trainer(run, workdir, data, log=log, schedule=sweep_schedule(min_lr, max_lr, steps))
  built, mesh = trainer.steps, trainer.mesh
  beta = default_beta(steps)
  log(f"LR range test: {steps} steps from {min_lr:g} to {max_lr:g} | {trainer.num_params / 1e6:.2f}M params | "
      f"{run.cfg.train.batch_tokens} tokens per step")
  losses, best, running, stopped_early = [], math.inf, 0.0, False
  train_iter = trainer.train_iterator()
  with jax.set_mesh(mesh):
    state = built.init()
    for i, lr in enumerate(lrs):
      state, metrics = built.train_step(state, device_batch(next(train_iter), mesh))
      loss = float(metrics["loss"])  # blocks every step: the divergence check needs it anyway
      losses.append(loss)
      running = beta * running + (1 - beta) * loss
      average = running / (1 - beta ** (i + 1))
      best = min(best, average)
      if i % max(1, steps // 10) == 0:
        log(f"step {i:>5}/{steps} | lr {lr:.3e} | loss {loss:.4f}")
      if not math.isfinite(loss) or average > DIVERGENCE_FACTOR * best:
        stopped_early = i < steps - 1
        log(f"step {i:>5}/{steps} | lr {lr:.3e} | loss {loss:.4f}: diverged, stopping")
        break
  done = np.asarray(losses)
  smoothed, steepest, lowest, suggested = analyze(lrs[:len(done)], done, beta)
  finite_lrs = lrs[:len(done)][np.isfinite(done)]
  return RangeTestResult(lrs=finite_lrs, losses=done[np.isfinite(done)], smoothed=smoothed, steepest_lr=steepest,
                         min_loss_lr=lowest, suggested_lr=suggested, stopped_early=stopped_early)


def save_plot(result: RangeTestResult, path: str, title: str = "") -> str:
  """Loss (raw and smoothed) against LR on a log axis, with the three LRs marked."""
  fig, ax = new_figure(7, 4.5)
  ax.plot(result.lrs, result.losses, color="0.75", lw=1, label="loss")
  ax.plot(result.lrs, result.smoothed, color="C0", lw=2, label="smoothed")
  for lr, color, name in ((result.steepest_lr, "C2", "steepest"), (result.min_loss_lr, "C3", "minimum"),
                          (result.suggested_lr, "C1", "suggested peak")):
    ax.axvline(lr, color=color, ls="--", lw=1, label=f"{name} {lr:.2e}")
  ax.set_xscale("log")
  low, high = float(min(np.min(result.losses), np.min(result.smoothed))), float(result.smoothed[0])
  ax.set_ylim(low - 0.1 * (high - low + 1e-3), high + 0.5 * (high - low + 1e-3))
  ax.set_xlabel("learning rate (optim.lr)")
  ax.set_ylabel("training loss")
  ax.set_title(title or "LR range test")
  ax.legend(fontsize=8)
  return save_figure(fig, path, dpi=110)


def write_outputs(result: RangeTestResult, workdir: str, title: str = "") -> tuple[str, str]:
  """lr_find.png and lr_find.json in `workdir`, each written to a temp name then renamed."""
  os.makedirs(workdir, exist_ok=True)
  png = save_plot(result, os.path.join(workdir, "lr_find.png"), title)
  path = os.path.join(workdir, "lr_find.json")
  atomic_write_json(path, result.to_json())
  return png, path


def suggested_flags(lr: float, optim) -> str:
  """The overrides that run what the sweep measured at matrix LR `lr`: the embedding and unembedding
  LRs a config sets explicitly moved with it (the sweep keeps their ratio to optim.lr)."""
  flags = [f"--config.optim.lr={lr:.2g}"]
  for name in ("embed_lr", "unembed_lr"):
    if optim[name]:
      flags.append(f"--config.optim.{name}={optim[name] * lr / optim.lr:.2g}")
  return " ".join(flags)


def summary(result: RangeTestResult, optim) -> str:
  """What the sweep found; `optim` is the swept config's optim section (for the suggested flags)."""
  lines = [f"steepest descent at lr {result.steepest_lr:.3e}",
           f"minimum smoothed loss {float(np.min(result.smoothed)):.4f} at lr {result.min_loss_lr:.3e}"
           + (" (then diverged)" if result.stopped_early else ""),
           f"suggested peak LR: {result.suggested_lr:.3e}  ({suggested_flags(result.suggested_lr, optim)})"]
  if not result.stopped_early and result.min_loss_lr >= result.lrs[-1]:
    lines.append("note: the loss was still falling at --max; raise --max to see where it turns")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line.
