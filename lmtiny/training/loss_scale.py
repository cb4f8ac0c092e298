"""Dynamic loss scaling for float16 training (model.dtype = "float16", for GPUs without bf16).

float16 has 5 exponent bits: small gradients underflow to zero unless the loss is scaled up
before the backward pass. The train step multiplies the summed loss by S / N (N: the batch's
token slots, a constant, so that the per-token seed of the backward pass is S / N as for a mean
loss) and divides the gradients by the same factor in float32. Then:

  all gradients finite:  apply the update; after `optim.loss_scale_period` finite steps in a
                         row the scale doubles.
  any inf / nan:         skip the update (parameters and optimizer state unchanged), halve the
                         scale, reset the counter, count the skipped step.

The state lives in the train state under "loss_scale" (so it is checkpointed and resumes
exactly); runs in other dtypes have no such entry and skip none of this.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def enabled(m) -> bool:
  return m.dtype == "float16"


def init_state(o) -> dict:
  return {"scale": jnp.asarray(o.loss_scale_init, jnp.float32), "good_steps": jnp.zeros((), jnp.int32),
          "skipped_steps": jnp.zeros((), jnp.int32)}


def loss_factor(ls_state: dict | None, token_slots: int) -> jax.Array:
  """What the summed loss is multiplied by before the backward pass (1 without scaling)."""
  if ls_state is None:
    return jnp.float32(1.0)
  return ls_state["scale"] / token_slots


def all_finite(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def next_state(ls_state: dict, finite: jax.Array, period: int) -> dict:
  good = jnp.where(finite, ls_state["good_steps"] + 1, 0)
  grow = good >= period
  scale = jnp.where(finite, jnp.where(grow, ls_state["scale"] * 2.0, ls_state["scale"]), ls_state["scale"] / 2.0)
  return {"scale": scale, "good_steps": jnp.where(grow, 0, good).astype(jnp.int32),
          "skipped_steps": ls_state["skipped_steps"] + jnp.where(finite, 0, 1).astype(jnp.int32)}


def apply_if_finite(finite: jax.Array, new_tree, old_tree):
  """`new_tree` where the step's gradients were finite, else `old_tree`, leaf for leaf."""
  return jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_tree, old_tree)


