"""Batched, sharded log-likelihood of continuations: the engine under the CORE-style tasks.

A row is a token sequence whose last `n_cont` tokens are the continuation being scored. Rows are
sorted by length, cut into batches of a fixed number of rows (a multiple of the data-parallel
size, so the batch splits over the mesh's data axis), right-padded to a power-of-two length
(few compiled shapes) and run through the model once. Per row the program returns the summed
cross-entropy of the continuation tokens (its negative log-likelihood), their count, and whether
greedy decoding would have produced every one of them (LAMBADA-style exact match).
Rows longer than the model's context lose tokens from the left (the continuation is kept).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from lmtiny.model.sampling import bucket
from lmtiny.parallel import sharding, xla_options


@dataclasses.dataclass(frozen=True)
class Row:
  ids: tuple[int, ...]
  n_cont: int


@dataclasses.dataclass(frozen=True)
class RowScore:
  loss_sum: float      # -log p(continuation | prefix), nats
  tokens: int          # continuation tokens scored
  greedy_match: bool   # argmax at every continuation position equals the continuation


def _score_batch(graphdef, params, inputs_BxT, targets_BxT, mask_BxT):
  model = nnx.merge(graphdef, params)
  b, t = inputs_BxT.shape
  positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  logits_BxTxV = model(inputs_BxT, positions_BxT, jnp.ones((b, t), jnp.int32))
  losses_BxT = sharding.vocab_parallel_cross_entropy(logits_BxTxV, targets_BxT)
  hit_BxT = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
  mask_BxT = mask_BxT.astype(bool)
  return (jnp.sum(jnp.where(mask_BxT, losses_BxT, 0.0), axis=-1), jnp.sum(mask_BxT, axis=-1),
          jnp.all(hit_BxT | ~mask_BxT, axis=-1))


_score_jit = xla_options.jit(_score_batch, static_argnums=0)


def fit_row(ids: Sequence[int], n_cont: int, max_len: int) -> Row:
  """Keeps the last max_len + 1 tokens (inputs and targets are max_len each)."""
  if not 0 < n_cont < len(ids):
    raise ValueError(f"a row needs 1..{len(ids) - 1} continuation tokens, got {n_cont}")
  n_cont = min(n_cont, max_len)
  return Row(tuple(ids[-(max_len + 1):]), n_cont)


class Scorer:
  """Scores rows with `model` on `mesh` (parameters placed as they are: one device or sharded).
  On several processes every one calls `score` with the same rows and gets every score back."""

  def __init__(self, model, mesh, *, rows_per_batch: int = 32):
    self.graphdef, self.params = nnx.split(model)
    self.mesh = mesh
    self.max_len = model.cfg.max_seq_len
    dp = sharding.data_parallel_size(mesh)
    self.rows_per_batch = max(dp, -(-rows_per_batch // dp) * dp)
    self._mine = sharding.process_rows(mesh, self.rows_per_batch)  # the rows this process feeds

  def score(self, rows: Sequence[Row]) -> list[RowScore]:
    out: list[RowScore | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
    n = self.rows_per_batch
    for start in range(0, len(order), n):
      chunk = order[start:start + n]
      t = min(self.max_len, bucket(max(len(rows[i].ids) for i in chunk) - 1))
      inputs, targets, mask = (np.zeros((n, t), np.int32) for _ in range(3))
      for r, i in enumerate(chunk):
        ids, k = rows[i].ids, rows[i].n_cont
        length = len(ids) - 1
        inputs[r, :length], targets[r, :length] = ids[:-1], ids[1:]
        mask[r, length - k:length] = 1
      mine = self._mine  # every process feeds its rows and gets them all back
      with jax.set_mesh(self.mesh):
        batch = sharding.global_batch_from_local(dict(inputs=inputs[mine], targets=targets[mine], mask=mask[mine]),
                                                 self.mesh)
        scored = _score_jit(self.graphdef, self.params, batch["inputs"], batch["targets"], batch["mask"])
        loss, count, match = (multihost_utils.process_allgather(scored, tiled=True) if jax.process_count() > 1
                              else jax.device_get(scored))
      for r, i in enumerate(chunk):
        out[i] = RowScore(float(loss[r]), int(count[r]), bool(match[r]))
    return out
