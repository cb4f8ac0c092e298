"""Muon on the transformer blocks' matrices, AdamW on everything else (optim.name = "muon").

Muon (MomentUm Orthogonalized by Newton-Schulz; Keller Jordan, modded-nanogpt; the variant in
nanochat's base_train): per matrix W with gradient G, momentum m (warming linearly from
`optim.muon_momentum_start` to `optim.muon_momentum` over `optim.muon_momentum_warmup` updates),

  buf <- m * buf + (1 - m) * G              (the momentum buffer)
  U   <- (1 - m) * G + m * buf              (Nesterov)
  O   <- NewtonSchulz5(U)                   (~ the nearest semi-orthogonal matrix, U V^T of U's SVD)
  W   <- W - lr * sqrt(max(1, fan_out / fan_in)) * O

NewtonSchulz5 scales U to unit Frobenius norm and runs `optim.muon_ns_steps` iterations of the
quintic X <- a X + (b A + c A^2) X, A = X X^T, (a, b, c) = (3.4445, -4.7750, 2.0315), on the
wide orientation (rows <= cols) in `optim.muon_ns_dtype`. There is no bias correction.

Each weight is orthogonalised as the 2-D matrix it multiplies with: q/k/v [D, H, Dh] as
[D, H*Dh], o [H, Dh, D] as [H*Dh, D], MLP up/gate [D, F] and down [F, D]; a leading layer axis
(model.scan_layers) is a batch of independent matrices. Matrices of one shape (in the wide
orientation: o and down are transposed to q's and up's) are orthogonalised together as one batch,
as nanochat's distributed Muon groups its parameters: d20's 80 attention and 40 MLP matrices are
two batches. Under FSDP / data / tensor parallelism each batch is zero-padded to a multiple of
the device count and split over the devices (`sharding.map_matrices`), each device
orthogonalising whole matrices of its share (a zero matrix stays zero) and, over a data axis
(weights replicated), the results all-gathered once; an unstacked model gets the same split,
where otherwise every device would gather and orthogonalise every matrix. These are the
optimizer's collectives, apart from the gradients' reduction (hlo_cost.collective_role). The
update equals the one-device update either way (tests/test_muon.py).

Embedding, unembedding and norm scales get AdamW (optim.b1 / b2 / eps, group LRs as in
lmtiny.training.optim). One schedule (optim.schedule) multiplies both; Muon's LR is optim.lr, unscaled
by width. Why not `optax.contrib.muon`: its momentum is a constant (nanochat warms it up), it
bias-corrects the momentum (nanochat does not), and its AdamW half has a single learning rate.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lmtiny.model.transformer import path_names
from lmtiny.parallel import sharding
from lmtiny.training import param_groups

NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Parameter name -> (dimensions of one matrix, whether its last dimension is the output: o and
# down map heads/hidden units back to the model width).
_MATRICES = {"q": (3, False), "k": (3, False), "v": (3, False), "o": (3, True),
             "up": (2, False), "gate": (2, False), "down": (2, True), "ve_gate": (2, False)}


class MuonState(NamedTuple):
  count: jax.Array  # updates applied so far (drives the momentum warmup)
  momentum: Any     # one buffer per matrix, shaped and sharded like it


def newton_schulz(g_BxMxN: jax.Array, steps: int, dtype=jnp.bfloat16) -> jax.Array:
  """Approximate orthogonalisation of each [M, N] matrix in a batch (quintic Newton-Schulz)."""
  a, b, c = NS_COEFFS
  x = g_BxMxN.astype(dtype)
  tall = x.shape[-2] > x.shape[-1]
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(-2, -1), keepdims=True))
  x = (x / (norm + 1e-7).astype(dtype)).astype(dtype)
  for _ in range(steps):
    gram = x @ jnp.swapaxes(x, -1, -2)
    x = a * x + (b * gram + c * gram @ gram) @ x
  return jnp.swapaxes(x, -1, -2) if tall else x


def _name(path) -> str:
  return path_names(path)[-1]


def matrix_axes(path, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """(batch axes, fan-in axes, fan-out axes) of a block weight with `ndim` dimensions: the axes
  `matrix_view` flattens into [batch, fan_in, fan_out]."""
  dims, out_last = _MATRICES.get(_name(path), (2, False))
  first = ndim - dims
  split = ndim - 1 if out_last else first + 1
  return tuple(range(first)), tuple(range(first, split)), tuple(range(split, ndim))


def matrix_view(path, shape) -> tuple[tuple[int, int, int], float]:
  """([batch, fan_in, fan_out] the weight is orthogonalised as, Muon's shape LR factor)."""
  batch, fan_in, fan_out = (math.prod(shape[a] for a in axes) for axes in matrix_axes(path, len(shape)))
  return (batch, fan_in, fan_out), max(1.0, fan_out / fan_in) ** 0.5


def orthogonalise_by_shape(tree, orthogonalise: Callable[[jax.Array], jax.Array], dtype,
                           shape_factor: bool = True, rescale: Callable[[jax.Array], jax.Array] | None = None) -> Any:
  """`orthogonalise` (a batch of wide [B, M <= N] matrices in `dtype` -> the same) of every matrix
  in `tree`, then `rescale` (a float32 scale of each matrix) if given, times its shape LR factor
  unless `shape_factor` is False; one batch per matrix shape, each batch split over the devices
  (zero-padded to a multiple of them). `rescale` runs on the gathered batch, so the devices
  exchange `orthogonalise`'s results in `dtype`, not in float32."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  views = [matrix_view(path, g.shape) for path, g in leaves]
  groups: dict[tuple[int, int], list[int]] = {}
  for i, ((_, fan_in, fan_out), _) in enumerate(views):
    groups.setdefault((min(fan_in, fan_out), max(fan_in, fan_out)), []).append(i)
  out = [None] * len(leaves)
  for members in groups.values():
    # Weights are laid out [batch..., fan-in dims..., fan-out dims...]: a reshape is the view. Cast
    # first: Newton-Schulz starts from the `dtype` copy anyway, and the split moves half the bytes.
    mats = [leaves[i][1].reshape(views[i][0]).astype(dtype) for i in members]
    mats = [jnp.swapaxes(x, 1, 2) if x.shape[1] > x.shape[2] else x for x in mats]  # all wide
    batch = jnp.concatenate(mats) if len(mats) > 1 else mats[0]
    pad = -batch.shape[0] % sharding.matrix_devices()
    if pad:
      batch = jnp.concatenate([batch, jnp.zeros((pad, *batch.shape[1:]), batch.dtype)])
    ortho = sharding.map_matrices(orthogonalise, batch)
    ortho = rescale(ortho) if rescale is not None else ortho
    start = 0
    for i in members:
      (count, fan_in, fan_out), factor = views[i]
      factor = factor if shape_factor else 1.0
      part = ortho[start:start + count]
      start += count
      part = jnp.swapaxes(part, 1, 2) if fan_in > fan_out else part
      g = leaves[i][1]
      out[i] = (factor * part.astype(jnp.float32).reshape(g.shape)).astype(g.dtype)
  return jax.tree_util.tree_unflatten(treedef, out)


def momentum_schedule(o) -> optax.Schedule:
  start, end, warmup = o.muon_momentum_start, o.muon_momentum, o.muon_momentum_warmup
  return lambda count: start + (end - start) * jnp.minimum(count / max(warmup, 1), 1.0) if warmup else end


def scale_by_muon(o) -> optax.GradientTransformation:
  """Orthogonalised Nesterov momentum with nanochat's shape scaling (no learning rate yet)."""
  momentum_at = momentum_schedule(o)
  ns_dtype = jnp.dtype(o.muon_ns_dtype)

  def init(params):
    return MuonState(count=jnp.zeros((), jnp.int32), momentum=jax.tree.map(jnp.zeros_like, params))

  def update(grads, state, params=None):
    del params
    m = jnp.asarray(momentum_at(state.count), jnp.float32)
    buffers = jax.tree.map(lambda buf, g: m * buf + (1 - m) * g, state.momentum, grads)

    nesterov = jax.tree.map(lambda g, buf: (1 - m) * g + m * buf, grads, buffers)
    updates = orthogonalise_by_shape(nesterov, lambda x: newton_schulz(x, o.muon_ns_steps, ns_dtype), ns_dtype)
    return updates, MuonState(count=state.count + 1, momentum=buffers)

  return optax.GradientTransformation(init, update)


def is_muon_param(path, p) -> bool:
  """Block matrices (attention q/k/v/o, MLP up/gate/down, the value-embedding gate ve_gate;
  stacked or not); not norm scales."""
  return _name(path) in _MATRICES and p.ndim >= 2 and param_groups.group_of(path) == "matrix"


def make_muon_optimizer(o, d_model: int, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Global-norm clip, then Muon on block matrices and AdamW on the rest, one LR schedule."""
  multipliers = param_groups.group_lr_multipliers(o, d_model)
  muon = optax.chain(scale_by_muon(o), optax.add_decayed_weights(o.weight_decay, mask=param_groups.decay_mask),
                     optax.scale_by_learning_rate(schedule))
  adam = optax.chain(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
                     optax.add_decayed_weights(o.weight_decay, mask=param_groups.decay_mask),
                     optax.scale_by_learning_rate(schedule), param_groups.scale_by_group(multipliers))

  def labels(params):
    return jax.tree_util.tree_map_with_path(lambda path, p: "muon" if is_muon_param(path, p) else "adam", params)

  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  return optax.chain(*parts, optax.multi_transform({"muon": muon, "adam": adam}, labels))
