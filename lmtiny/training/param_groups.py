"""Parameter groups: the token embedding, the unembedding (lm_head) and everything else
("matrices", which also holds the norm scales), with each group's LR multiplier and the weight
decay mask. AdamW (lmtiny.training.optim) and Muon (lmtiny.training.muon) both build on these.

Weight decay applies only to weight matrices, read from each parameter's `logical_axes`
(lmtiny.model.transformer.is_matrix), never to the embedding or unembedding tables; group LRs are
multipliers of the matrix schedule, so one optimizer state and one schedule serve all groups.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lmtiny.model.transformer import is_matrix, path_names


def group_of(path) -> str:
  names = path_names(path)
  if "embed" in names:
    return "embed"
  if "lm_head" in names:
    return "unembed"
  return "matrix"


def group_lr_multipliers(o, d_model: int) -> dict[str, float]:
  width_scale = (768 / d_model) ** 0.5 if o.scale_lr_by_width else 1.0
  return {
      "embed": (o.embed_lr or o.lr) * width_scale / o.lr,
      "unembed": (o.unembed_lr or o.lr) * width_scale / o.lr,
      "matrix": width_scale if o.scale_lr_by_width else 1.0,
  }


def _per_leaf(params, fn):
  return jax.tree_util.tree_map_with_path(fn, params)


def scale_by_group(multipliers: dict[str, float]) -> optax.GradientTransformation:
  """Multiply each parameter's update by its group's LR multiplier (a no-op when all are 1)."""

  def update(updates, state, params=None):
    del params
    return _per_leaf(updates, lambda path, u: u * jnp.asarray(multipliers[group_of(path)], u.dtype)), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def decay_mask(params):
  """True for weight matrices (by logical axes, so stacked [L, D] norm scales are not matrices)
  outside the embedding and unembedding groups; leaves without metadata are never decayed."""

  def mask(path, v):
    axes = v.get_metadata().get("logical_axes") if isinstance(v, nnx.Variable) else None
    flag = is_matrix(axes) and group_of(path) == "matrix"
    return jax.tree.map(lambda _: flag, v) if isinstance(v, nnx.Variable) else flag

  return jax.tree_util.tree_map_with_path(mask, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_groups(params: nnx.State) -> dict[str, str]:
  """'/'-joined parameter path -> group name (for reports and tests)."""
  out = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    out["/".join(path_names(path))] = group_of(path)
  return out
