"""A run's config, checked once and resolved once, at the edge.

  run = resolve_run(cfg)          # or resolve_run(cfg, mesh), resolve_run(cfg, devices=...)

`resolve_run` checks every section (lmtiny.config.validate: model, train, optim, data, mesh, lora,
sft, rl), applies nanochat's batch-size rules (lmtiny.plan.recipe), builds the mesh, sets the
micro-batch for it (train.device_batch_size), checks that the batch divides over the devices and
processes and that the evaluation tasks exist, and derives the horizon. Everything downstream
reads `run.cfg` and the derived fields, and checks nothing again.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import ml_collections

from lmtiny import config as config_lib
from lmtiny.errors import ConfigError
from lmtiny.model.adapters import parse_targets
from lmtiny.parallel import sharding
from lmtiny.plan import counts, recipe
from lmtiny.tasks import chat_suite, dclm, hf6


@dataclasses.dataclass(frozen=True)
class ResolvedRun:
  # Checked, the recipe's rules applied: what config.json records. train.device_batch_size stays as
  # set, so a resume on other devices splits its batch anew (micro_batch is this mesh's split).
  cfg: ml_collections.ConfigDict
  mesh: Any
  total_steps: int
  process_batch: int  # sequences this process feeds per optimizer step
  micro_batch: int  # sequences per micro-step, all processes together


def resolve_run(cfg, mesh=None, *, devices: Sequence | None = None,
            checks: Sequence[Callable[[Any, Any], None]] = ()) -> ResolvedRun:
  """`cfg` checked and resolved for `mesh` (default: made from cfg.mesh over `devices`, default
  all). `checks` (cfg, mesh) are a stage's own checks that need the mesh, run after the config's
  and before the batch's (so their message names the fields the user set)."""
  cfg = recipe.resolve(cfg)  # the recipe checks the fields it reads; the rest is checked here
  config_lib.validate(cfg)
  if cfg.lora.rank:
    parse_targets(cfg.lora.targets)
  if cfg.train.core_every:
    hf6.task_names(cfg.train.core_tasks, f"config.train.core_tasks={cfg.train.core_tasks!r}", also=(dclm.CORE,))
  if cfg.sft.chat_eval_every:
    chat_suite.chat_task_names(cfg.sft.chat_eval_tasks, "config.sft.chat_eval_tasks")
  if mesh is None:
    mesh = sharding.make_mesh(cfg.mesh, devices)
  for check in checks:
    check(cfg, mesh)
  split = config_lib.resolve_batch(cfg, sharding.data_parallel_size(mesh))
  check_batch_divisibility(split, mesh)
  t = cfg.train
  return ResolvedRun(cfg=cfg, mesh=mesh,
                     total_steps=config_lib.total_steps(cfg, recipe.horizon_params(cfg.model, t),
                                                        counts.train_flops_per_token(cfg.model, t.seq_len)),
                     process_batch=config_lib.global_batch_size(t) // jax.process_count(),
                     micro_batch=config_lib.micro_batch_size(split.train))


def check_batch_divisibility(cfg, mesh) -> None:
  """A resolved batch's micro-batches split evenly over the data-parallel devices and the processes."""
  dp = sharding.data_parallel_size(mesh)
  t = cfg.train
  micro = config_lib.micro_batch_size(t)
  if micro % dp:
    field = "train.micro_batch_size" if t.micro_batch_size else "train.batch_tokens"
    value = t.micro_batch_size or t.batch_tokens
    raise ConfigError(f"config.{field}={value!r}: {micro} sequences per (micro-)batch do not divide over "
                      f"the data-parallel size {dp} (mesh data x fsdp)")
  if micro % jax.process_count():
    raise ConfigError(f"config.train.batch_tokens={t.batch_tokens!r}: {micro} sequences per micro-batch do "
                      f"not divide over {jax.process_count()} processes")
  if jax.process_count() > 1:
    sharding.check_process_local_batches(mesh)
