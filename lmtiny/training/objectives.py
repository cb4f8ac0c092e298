"""What a train step minimises, written out.

Every objective here is a weighted next-token cross-entropy: from a batch it gives per-token
weights w [B, T] and the count N that normalises them, and the step minimises

    loss = sum_t w_t * CE_t / N          CE_t = -log pi(target_t | tokens before t)

(plus z-loss on the tokens with w_t != 0), summed over micro-batches before the one division, so
accumulation never changes the update. The model's fused loss takes w per token, so no [B, T, V]
logits are kept for either objective.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from lmtiny.data.pipeline import BATCH_KEYS as TOKEN_KEYS  # ids, targets, document layout, loss_mask


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  batch_keys: tuple[str, ...]  # what a batch for it holds (each sharded like the tokens)
  token_weights: Callable[[dict], tuple[jax.Array, jax.Array]]  # batch -> (w [B, T], N)


def cross_entropy_weights(batch: dict) -> tuple[jax.Array, jax.Array]:
  """Pretraining and SFT: the mean cross-entropy over the targets loss_mask keeps (1 on the
  document or the assistant's tokens, 0 on padding and prompts)."""
  mask = batch["loss_mask"].astype(jnp.float32)
  return mask, jnp.sum(mask != 0).astype(jnp.float32)


def policy_gradient_weights(batch: dict) -> tuple[jax.Array, jax.Array]:
  """REINFORCE on sampled replies: ascend sum_t A_t log pi(a_t) over the sampled tokens a_t, i.e.
  minimise sum_t A_t * CE_t, where `advantages` A_t is 0 off the sampled tokens (prompts, forced
  tool output, padding). Normalised by the tokens that carry an advantage, so a batch whose
  groups are half uniform (A = 0) is not scaled down by them."""
  advantages = batch["advantages"].astype(jnp.float32)
  return advantages, jnp.sum(advantages != 0).astype(jnp.float32)


CROSS_ENTROPY = Objective("cross_entropy", TOKEN_KEYS, cross_entropy_weights)
POLICY_GRADIENT = Objective("policy_gradient", (*TOKEN_KEYS, "advantages"), policy_gradient_weights)
