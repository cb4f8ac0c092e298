"""AdamW with warmup + cosine, global-norm clipping, masked weight decay and per-group LRs.

Groups: the token embedding, the unembedding (lm_head) and everything else ("matrices", which
also holds the norm scales). Weight decay applies only to weight matrices, read from each
parameter's `logical_axes` (lmtiny.model.transformer.is_matrix: two or more of embed/heads/kv_heads/mlp/
head_dim/vocab, never "norm"), and never to the embedding or unembedding tables: norm scales
stay undecayed when scan_layers stacks them into [L, D]. Group LRs are expressed as multipliers of the matrix schedule, so one
Adam state and one schedule serve all groups. optim.name = "muon" (lmtiny.training.muon) and
"normuon" (nanochat's 2026 optimizer, lmtiny.training.normuon) use the same schedules.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

from lmtiny.training.muon import make_muon_optimizer
from lmtiny.training.normuon import make_normuon_optimizer
from lmtiny.training.param_groups import decay_mask, group_lr_multipliers, scale_by_group


def lr_schedule(o, total_steps: int) -> optax.Schedule:
  """Linear warmup to `o.lr`, then (optim.schedule) cosine decay to `o.lr * o.min_lr_ratio` at
  `total_steps`, or wsd / constant (`wsd_schedule`), or nanochat's warmdown (`warmdown_schedule`)."""
  if o.schedule == "warmdown":
    return warmdown_schedule(o, total_steps)
  if o.schedule != "cosine":
    return wsd_schedule(o, total_steps)
  warmup = min(o.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else o.lr, peak_value=o.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=o.lr * o.min_lr_ratio)


def wsd_schedule(o, total_steps: int) -> optax.Schedule:
  """Warmup-stable-decay (nanochat's base_train): linear warmup from 0 over `o.warmup_steps`, the
  constant `o.lr`, then over the last `round(o.decay_fraction * total_steps)` steps a linear
  decay reaching `o.lr * o.min_lr_ratio` at `total_steps`. `o.schedule == "constant"` has no decay."""
  warmup = min(o.warmup_steps, max(total_steps - 1, 0))
  decay = 0 if o.schedule == "constant" else min(round(o.decay_fraction * total_steps), total_steps - warmup)
  decay_start, floor = total_steps - decay, o.lr * o.min_lr_ratio

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = o.lr * step / max(warmup, 1)
    progress = jnp.clip((total_steps - step) / max(decay, 1), 0.0, 1.0)  # 1 at decay_start, 0 at the end
    decayed = floor + (o.lr - floor) * progress
    return jnp.where(step < warmup, warm, jnp.where(step <= decay_start, o.lr, decayed))

  return schedule


def warmdown_schedule(o, total_steps: int) -> optax.Schedule:
  """nanochat's get_lr_multiplier times `o.lr`: (step + 1) / `o.warmup_steps` during the warmup
  (the first step already moves, unlike "wsd"), then constant, then over the last
  `round(o.decay_fraction * total_steps)` steps linear to `o.lr * o.min_lr_ratio` at total_steps."""
  warmup, decay = o.warmup_steps, round(o.decay_fraction * total_steps)
  decay_start, floor = total_steps - decay, o.min_lr_ratio

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = (step + 1) / max(warmup, 1)
    progress = jnp.clip((total_steps - step) / max(decay, 1), 0.0, 1.0)  # 1 at decay_start, 0 at the end
    decayed = progress + (1 - progress) * floor
    return o.lr * jnp.where(step < warmup, warm, jnp.where(step <= decay_start, 1.0, decayed))

  return schedule


def make_optimizer(o, d_model: int, total_steps: int, schedule: optax.Schedule | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`schedule` replaces warmup + cosine for the matrix LR (the LR finder's sweep); the group
  LRs keep their ratio to it. `o.name == "muon"` gives lmtiny.training.muon's Muon + AdamW combination,
  "normuon" nanochat's 2026 optimizer (lmtiny.training.normuon). The schedule returned (logged as
  "lr") is the matrix LR's."""
  schedule = schedule or lr_schedule(o, total_steps)
  if o.name == "muon":
    return make_muon_optimizer(o, d_model, schedule), schedule
  if o.name == "normuon":
    return make_normuon_optimizer(o, d_model, total_steps, schedule), schedule
  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  parts += [
      optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
      optax.add_decayed_weights(o.weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(schedule),
  ]
  multipliers = group_lr_multipliers(o, d_model)
  if any(v != 1.0 for v in multipliers.values()):
    parts.append(scale_by_group(multipliers))
  return optax.chain(*parts), schedule
