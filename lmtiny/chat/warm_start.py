"""The base run's optimizer state as SFT's starting point (config.sft.load_optimizer; nanochat's
`--load-optimizer=1`), and SFT's LR fraction (config.sft.init_lr_frac).

  check_base_optimizer(cfg)                         # before anything loads: one line if it cannot be
  trainer = Trainer(..., init_opt_state=BaseOptimizerState(cfg))
  schedule = scaled_schedule(cfg, total_steps)      # every group's LR x sft.init_lr_frac
  scale = epoch_lr_scale(cfg)                       # the same over one epoch's progress (sft.steps=0)

What is restored is the whole optimizer state of the base checkpoint sft.init_step (Adam's moments
and step count, Muon's momentum and second moments). What restarts, as in nanochat's SFT, is what
follows SFT's own steps: the step counts that drive the LR schedule and Muon's momentum and weight
decay schedules (their values come from this run's config, counted from its step 0). Adam's count
is kept: its bias correction continues from the base run's steps, as torch's AdamW `step` does.
"""
from __future__ import annotations

import jax
import optax
from flax import nnx

from lmtiny.errors import ConfigError
from lmtiny.model.transformer import abstract_model
from lmtiny.runs.checkpoint import restore_part
from lmtiny.runs.config_file import read_run_config
from lmtiny.training.budget import budget_lr
from lmtiny.training.optim import lr_schedule, make_optimizer

_KEPT_COUNTS = (optax.ScaleByAdamState,)  # counts that continue from the base run (bias correction)


def _optimizer_shapes(cfg):
  params = nnx.state(abstract_model(cfg.model), nnx.Param)
  tx, _ = make_optimizer(cfg.optim, cfg.model.d_model, max(int(cfg.train.steps), 1))
  tree = jax.eval_shape(tx.init, params)
  return jax.tree.structure(tree), [(x.shape, str(x.dtype)) for x in jax.tree.leaves(tree)]


def check_base_optimizer(cfg) -> None:
  """With sft.load_optimizer, a ConfigError in one line unless the base run's checkpoint holds an
  optimizer state of this run's shape: a full (not LoRA) base and run, the same optimizer."""
  if not cfg.sft.load_optimizer:
    return
  why = "set config.sft.load_optimizer=False to start with a fresh optimizer"
  if cfg.lora.rank:
    raise ConfigError(f"config.sft.load_optimizer=True: a LoRA run (config.lora.rank={cfg.lora.rank}) trains new "
                      f"adapters, which have no optimizer state in the base run; {why}")
  base = read_run_config(cfg.sft.init)
  if base.lora.rank:
    raise ConfigError(f"config.sft.load_optimizer=True: the base run {cfg.sft.init} is a LoRA run, whose optimizer "
                      f"state is its adapters'; {why}")
  if base.optim.name != cfg.optim.name:
    raise ConfigError(f"config.sft.load_optimizer=True: the base run {cfg.sft.init} used optim.name="
                      f"{base.optim.name!r}, this run {cfg.optim.name!r}; use the same optimizer, or {why}")
  if _optimizer_shapes(base) != _optimizer_shapes(cfg):
    raise ConfigError(f"config.sft.load_optimizer=True: the base run {cfg.sft.init}'s optimizer state has other "
                      f"shapes than this run's (the optim settings differ); {why}")


def restart_counts(restored, fresh):
  """`restored` with every step count taken from `fresh` (a new state: 0) except _KEPT_COUNTS'."""
  if isinstance(restored, _KEPT_COUNTS):
    return restored
  if hasattr(restored, "_fields"):  # an optax state (NamedTuple)
    return type(restored)(*(getattr(fresh, f) if f == "count" else restart_counts(getattr(restored, f), getattr(fresh, f))
                            for f in restored._fields))
  if isinstance(restored, (tuple, list)):
    return type(restored)(restart_counts(r, f) for r, f in zip(restored, fresh))
  if isinstance(restored, dict):
    return {k: restart_counts(v, fresh[k]) for k, v in restored.items()}
  return restored


class BaseOptimizerState:
  """fresh optimizer state -> the base checkpoint's, placed as the fresh one is (the Trainer's
  init_opt_state, called once when the run starts, never on a resume)."""

  def __init__(self, cfg, log=print):
    self.directory = f"{cfg.sft.init}/checkpoints"
    self.step, self.log = cfg.sft.init_step, log

  def __call__(self, fresh):
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), fresh)
    restored = restore_part(self.directory, self.step, "opt_state", target, "optimizer")
    self.log(f"optimizer state from the base run's step {self.step} (its schedules' step counts restart)")
    return restart_counts(restored, fresh)


def scaled_schedule(cfg, total_steps: int) -> optax.Schedule | None:
  """The matrix LR schedule x sft.init_lr_frac (every group's LR keeps its ratio to it); None at 1."""
  frac = cfg.sft.init_lr_frac
  if frac == 1:
    return None
  schedule = lr_schedule(cfg.optim, total_steps)
  return lambda step: frac * schedule(step)


def epoch_lr_scale(cfg):
  """(step, progress through the epoch) -> the LR as a multiple of optim.lr, x sft.init_lr_frac:
  optim.warmup_steps in steps, then optim.schedule over the progress (lmtiny.training.budget.budget_lr,
  which a time budget's progress drives the same way)."""
  o, frac = cfg.optim, cfg.sft.init_lr_frac
  return lambda step, progress: frac * budget_lr(o, step, progress) / o.lr
