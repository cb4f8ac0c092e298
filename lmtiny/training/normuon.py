"""nanochat's 2026 optimizer (optim.name = "normuon"): its Muon variant on the block matrices,
AdamW with fixed per-group settings on everything else.

Follows karpathy/nanochat's nanochat/optim.py (MuonAdamW) and gpt.py's setup_optimizer at
92d63d4 (2026-07-03); tests/nanochat_optim_reference.py is an independent PyTorch version of the
same step that tests/training/test_normuon.py runs side by side with this one.

Muon, per block matrix W (attention q/k/v/o, MLP up/gate/down, the value-embedding gate) with
gradient G, momentum m and learning rate lr, all on the 2-D view [fan_in, fan_out] of
`muon.matrix_view` (torch stores the transpose, [out, in]: its rows are our columns):

  buf <- buf + (1 - m) (G - buf);  U <- G + m (buf - G)       (Nesterov)
  U   <- U * (|U|_F / sqrt(fan_out)) / |U[:, j]|              (MuonEq: every output unit's
                                                               weights to the mean norm)
  O   <- PolarExpress(U)                                      (~ the nearest semi-orthogonal matrix:
                                                               U / (1.01 |U|_F), then X <- a X + (b A + c A^2) X,
                                                               A = X X^T on the wide orientation, one
                                                               coefficient triple per iteration)
  O   <- O * sqrt(min(fan_in, fan_out)) / |O|_F               (Muon+: the Frobenius norm of an exactly
                                                               semi-orthogonal matrix)
  O   <- NorMuon(O)                                           (below)
  W   <- W - lr * f * (O + wd * W * [O * W >= 0])             (cautious weight decay)

with nanochat's shape factor f = sqrt(max(1, fan_out / fan_in)) (torch's rows over columns).
NorMuon keeps one second moment per output unit when fan_out >= fan_in (the mean of O^2 over the
fan-in axes) and one per input unit otherwise (over the fan-out axes): v <- v + (1 - beta2)
(mean - v), O <- O / sqrt(v), then O rescaled to its Frobenius norm before the division. Matrices
of one shape are orthogonalised as one batch, split over the devices (`muon.orthogonalise_by_shape`),
and renormalised once gathered (the devices exchange bf16 Polar Express results, not float32);
MuonEq, NorMuon and the decay are elementwise work and reductions on the (sharded) weights.

Schedules, all of the step and total_steps: the learning rate is `optim.schedule` (nanochat's is
"warmdown", lmtiny.training.optim.warmdown_schedule), shared by every group as a multiplier of
its peak LR; Muon's momentum warms linearly from `muon_momentum_start` to `muon_momentum` over
`muon_momentum_warmup` steps, then moves linearly to `muon_momentum_warmdown` over the last
round(decay_fraction * total_steps) steps (0 = no change); Muon's weight decay is
`optim.weight_decay`, constant or (weight_decay_schedule = "cosine") wd * (1 + cos(pi step / total)) / 2.

Groups (nanochat's setup_optimizer): Muon at optim.lr on the block matrices; AdamW on lm_head
(optim.unembed_lr), the embedding (optim.embed_lr), the value embeddings (half the embedding LR),
the three x (768 / d_model) ** 0.5 when optim.scale_lr_by_width; resid_lambdas at optim.scalar_lr
/ 100, x0_lambdas at optim.scalar_lr; the smear gate, smear and backout scalars at optim.smear_lr,
and with them the norm scales if the model has any (model.norm_scale; nanochat has none). Any
other leaf (LoRA adapters) gets AdamW at the matrix LR with optim.b1 / b2 / eps and no decay.
optim.b1 / b2 / eps do not apply to the named groups: nanochat fixes each group's own below.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lmtiny.model.transformer import path_names
from lmtiny.training.muon import is_muon_param, matrix_axes, matrix_view, orthogonalise_by_shape

# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932) coefficients for 5
# iterations, safety factor 2e-2 and cushion 2, as nanochat uses them: one (a, b, c) per iteration.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


class AdamGroup(NamedTuple):
  b1: float
  b2: float
  weight_decay: float


# nanochat's AdamW settings per group, fixed in its code rather than flags (tuned there; the
# config carries only the learning rates). One tiny eps for all: Adam's step stays sign-like.
ADAM_EPS = 1e-10
ADAM_GROUPS = {
    "unembed": AdamGroup(0.8, 0.96, 0.01),       # lm_head: a slower second moment than the default
    "embed": AdamGroup(0.8, 0.995, 0.001),       # token rows see sparse gradients: long v memory
    "value_embed": AdamGroup(0.8, 0.995, 0.01),  # tables like the embedding's, decayed more
    "resid": AdamGroup(0.8, 0.95, 0.05),         # resid_lambdas: pulled gently back towards 0
    "x0": AdamGroup(0.96, 0.95, 0.0),            # x0_lambdas: a higher beta1 smooths their noisy gradient
    "smear": AdamGroup(0.8, 0.95, 0.0),          # smear gate/scalars, backout, norm scales: undecayed
}
RESID_LR_SCALE = 0.01       # resid_lambdas scale the whole residual stream: 1% of the scalar LR
VALUE_EMBED_LR_SCALE = 0.5  # value embeddings at half the embedding LR
_SMEAR_LEAVES = ("smear_gate", "smear_lambda", "backout_lambda", "scale")  # scale: norm scales
_SCALAR_GROUPS = {"resid_lambdas": "resid", "x0_lambdas": "x0", "value_embed": "value_embed"}


class NorMuonState(NamedTuple):
  count: jax.Array    # updates applied so far (drives the momentum and weight decay schedules)
  momentum: Any       # one buffer per matrix, shaped and sharded like it
  second_moment: Any  # NorMuon's factored second moment: the matrix's shape, 1 on the reduced axes


def group_of(path, p) -> str:
  """The normuon group of one parameter (see the module docstring)."""
  names = path_names(path)
  leaf = names[-1]
  if is_muon_param(path, p):
    return "muon"
  if "lm_head" in names:
    return "unembed"
  if "embed" in names:
    return "embed"
  if leaf in _SCALAR_GROUPS:
    return _SCALAR_GROUPS[leaf]
  if leaf in _SMEAR_LEAVES:
    return "smear"
  return "other"


def group_lrs(o, d_model: int) -> dict[str, float]:
  """Each group's peak learning rate (the LR schedule's multiplier of 1)."""
  width = (768 / d_model) ** 0.5 if o.scale_lr_by_width else 1.0
  embed = (o.embed_lr or o.lr) * width
  return {"muon": o.lr, "other": o.lr, "unembed": (o.unembed_lr or o.lr) * width, "embed": embed,
          "value_embed": embed * VALUE_EMBED_LR_SCALE, "resid": o.scalar_lr * RESID_LR_SCALE,
          "x0": o.scalar_lr, "smear": o.smear_lr}


def momentum_schedule(o, total_steps: int) -> optax.Schedule:
  """Muon's momentum at each step: warmup, constant, then the move to muon_momentum_warmdown."""
  start, peak, warmup = o.muon_momentum_start, o.muon_momentum, o.muon_momentum_warmup
  final = o.muon_momentum_warmdown or peak
  warmdown = round(o.decay_fraction * total_steps)
  warmdown_start = total_steps - warmdown

  def schedule(count):
    step = jnp.asarray(count, jnp.float32)
    warm = start + (peak - start) * step / max(warmup, 1)
    progress = jnp.clip((step - warmdown_start) / max(warmdown, 1), 0.0, 1.0)
    down = peak + (final - peak) * progress
    return jnp.where(step < warmup, warm, jnp.where(step >= warmdown_start, down, peak))

  return schedule


def weight_decay_schedule(o, total_steps: int) -> optax.Schedule:
  """Muon's weight decay at each step: optim.weight_decay, or its cosine to 0 at total_steps."""
  wd = o.weight_decay
  if o.weight_decay_schedule == "constant":
    return lambda count: jnp.asarray(wd, jnp.float32)
  return lambda count: wd * 0.5 * (1 + jnp.cos(jnp.pi * jnp.asarray(count, jnp.float32) / max(total_steps, 1)))


def polar_express(x_BxMxN: jax.Array, steps: int, dtype) -> jax.Array:
  """Polar Express orthogonalisation of each wide (M <= N) matrix of a batch, in `dtype`."""
  x = x_BxMxN.astype(dtype)
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(-2, -1), keepdims=True))
  x = (x / (norm * 1.01 + 1e-6).astype(dtype)).astype(dtype)
  for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
    gram = x @ jnp.swapaxes(x, -1, -2)
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x


def renormalise(x_BxMxN: jax.Array) -> jax.Array:
  """Muon+: each matrix (M <= N) scaled to Frobenius norm sqrt(M), in float32."""
  x = x_BxMxN.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))
  return x * (math.sqrt(x.shape[-2]) / jnp.maximum(norm, 1e-6))


def _sizes(shape, axes) -> int:
  return math.prod(shape[a] for a in axes)


def reduced_axes(path, shape) -> tuple[int, ...]:
  """The axes NorMuon averages over: fan-in when fan_out >= fan_in (a second moment per output
  unit, torch's rows), else fan-out (one per input unit)."""
  _, ins, outs = matrix_axes(path, len(shape))
  return ins if _sizes(shape, outs) >= _sizes(shape, ins) else outs


def _factored_zeros(path, p):
  axes = reduced_axes(path, p.shape)
  return jnp.zeros(tuple(1 if a in axes else n for a, n in enumerate(p.shape)), jnp.float32)


def equilibrate(path, u, dtype) -> jax.Array:
  """MuonEq in `dtype` (returned as float32): each output unit's fan-in weights scaled to the
  mean norm, |U|_F / sqrt(fan_out)."""
  _, ins, outs = matrix_axes(path, u.ndim)
  x = u.astype(dtype)
  sq = jnp.square(x.astype(jnp.float32))
  target = jnp.sqrt(jnp.sum(sq, axis=ins + outs, keepdims=True)) / math.sqrt(_sizes(u.shape, outs))
  unit = jnp.maximum(jnp.sqrt(jnp.sum(sq, axis=ins, keepdims=True)), 1e-6)
  return (x * (target / unit).astype(dtype)).astype(jnp.float32)


def variance_reduce(path, o, v, beta2: float) -> tuple[jax.Array, jax.Array]:
  """NorMuon: (the update divided by the root of its factored second moment and rescaled to its
  own Frobenius norm, the new second moment)."""
  _, ins, outs = matrix_axes(path, o.ndim)
  axes, whole = reduced_axes(path, o.shape), ins + outs
  count = _sizes(o.shape, axes)
  mean_sq = jnp.mean(jnp.square(o), axis=axes, keepdims=True)
  norm = jnp.sqrt(jnp.sum(mean_sq, axis=whole, keepdims=True) * count)
  v = v + (1 - beta2) * (mean_sq - v)
  step = jax.lax.rsqrt(jnp.maximum(v, 1e-10))
  new_norm = jnp.sqrt(jnp.sum(mean_sq * count * jnp.square(step), axis=whole, keepdims=True))
  return o * (step * (norm / jnp.maximum(new_norm, 1e-10))), v


def scale_by_normuon(o, total_steps: int) -> optax.GradientTransformation:
  """nanochat's Muon up to its learning rate: f * (O + wd * W * mask); needs the parameters."""
  momentum_at, decay_at = momentum_schedule(o, total_steps), weight_decay_schedule(o, total_steps)
  ns_dtype, steps, beta2 = jnp.dtype(o.muon_ns_dtype), o.muon_ns_steps, o.muon_beta2

  def init(params):
    return NorMuonState(count=jnp.zeros((), jnp.int32), momentum=jax.tree.map(jnp.zeros_like, params),
                        second_moment=jax.tree_util.tree_map_with_path(_factored_zeros, params))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("normuon's cautious weight decay needs the parameters: tx.update(grads, state, params)")
    m, wd = momentum_at(state.count), decay_at(state.count)
    flat, treedef = jax.tree_util.tree_flatten_with_path(grads)
    paths = [path for path, _ in flat]
    buffers = [b + (1 - m) * (g - b) for (_, g), b in zip(flat, jax.tree.leaves(state.momentum))]
    nesterov = [g + m * (b - g) for (_, g), b in zip(flat, buffers)]
    balanced = treedef.unflatten([equilibrate(p, u, ns_dtype) for p, u in zip(paths, nesterov)])
    ortho = jax.tree.leaves(orthogonalise_by_shape(balanced, lambda x: polar_express(x, steps, ns_dtype), ns_dtype,
                                                   shape_factor=False, rescale=renormalise))
    reduced = [variance_reduce(p, x, v, beta2) for p, x, v in zip(paths, ortho, jax.tree.leaves(state.second_moment))]
    updates = []
    for path, (x, _), w in zip(paths, reduced, jax.tree.leaves(params)):
      w32 = w.astype(jnp.float32)
      decay = wd * w32 * (x * w32 >= 0) if o.cautious_weight_decay else wd * w32
      updates.append((matrix_view(path, w.shape)[1] * (x + decay)).astype(w.dtype))
    new_state = NorMuonState(count=state.count + 1, momentum=treedef.unflatten(buffers),
                             second_moment=treedef.unflatten([v for _, v in reduced]))
    return treedef.unflatten(updates), new_state

  return optax.GradientTransformation(init, update)


def _adam(group: AdamGroup | None, o, lr: optax.Schedule) -> optax.GradientTransformation:
  b1, b2, eps, wd = (group.b1, group.b2, ADAM_EPS, group.weight_decay) if group else (o.b1, o.b2, o.eps, 0.0)
  parts = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
  if wd:
    parts.append(optax.add_decayed_weights(wd))
  return optax.chain(*parts, optax.scale_by_learning_rate(lr))


def make_normuon_optimizer(o, d_model: int, total_steps: int, schedule: optax.Schedule
                           ) -> optax.GradientTransformation:
  """Global-norm clip (optim.grad_clip > 0), then Muon and the AdamW groups. `schedule` is the
  Muon LR; every group's LR keeps its ratio to it."""
  peaks = group_lrs(o, d_model)

  def scaled(label):
    ratio = peaks[label] / o.lr
    return lambda count: schedule(count) * ratio

  transforms = {"muon": optax.chain(scale_by_normuon(o, total_steps), optax.scale_by_learning_rate(schedule)),
                "other": _adam(None, o, schedule)}
  transforms.update({label: _adam(group, o, scaled(label)) for label, group in ADAM_GROUPS.items()})

  def labels(params):
    return jax.tree_util.tree_map_with_path(group_of, params)

  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  return optax.chain(*parts, optax.multi_transform(transforms, labels))


def group_names(params) -> dict[str, str]:
  """'/'-joined parameter path -> normuon group (for reports and tests)."""
  return {"/".join(path_names(path)): group_of(path, p) for path, p in jax.tree_util.tree_flatten_with_path(params)[0]}
