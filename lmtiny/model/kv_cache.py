"""The KV cache and the model's forward pass against it (what sampling prefills and decodes with).

Layout. The cache holds keys and values for every layer in two arrays of static shape
[L, B, S, K, Dh] (K = kv heads, so GQA caches only those). Prompts of different lengths are
*right-padded* and carry their own lengths: row b holds its prompt at positions 0..len_b-1, its
pad slots are overwritten by the tokens it generates, and its queries see only keys at positions
<= their own (the causal mask with a per-row offset), so a row never sees another row's padding
or its own. Each row therefore computes exactly what it would alone, with its true positions.

The forward pass reuses the model's own submodules (norms, project_qkv, project_out, mlp,
embed_tokens, unembed), so there is one set of weights and one implementation of the math.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lmtiny import config as config_lib
from lmtiny.model.attention import attention
from lmtiny.model.transformer import compute_dtype, mix_layer_input
from lmtiny.parallel.sharding import constrain

Array = jax.Array


class KVCache(NamedTuple):
  k: Array  # [L, B, S, K, Dh]
  v: Array
  last_token: Array  # [B] int32: each row's newest token (model.smear mixes it into the next one)


def init_cache(m, batch: int, length: int) -> KVCache:
  """A full-length cache for every layer; a sliding-window layer masks the keys outside its
  window rather than keeping a ring of them (the cache is sized for the longest layer anyway)."""
  shape = (m.num_layers, batch, length, config_lib.num_kv_heads(m), config_lib.head_dim(m))
  zeros = constrain(jnp.zeros(shape, compute_dtype(m)), ("layers", "batch", "seq", "act_kv_heads", None))
  return KVCache(zeros, zeros, jnp.zeros((batch,), jnp.int32))



# ---------------------------------------------------------------------------------------------
# Forward pass against the cache.


def _write_rows(cache_LxBxSxKxDh: Array, layer, new_BxTxKxDh: Array, starts_B: Array) -> Array:
  """Writes row b's T new entries at positions starts_B[b].. of one layer (one scatter, in place
  inside the decode loop)."""
  b, t = new_BxTxKxDh.shape[:2]
  positions_BxT = starts_B[:, None] + jnp.arange(t)[None, :]
  return cache_LxBxSxKxDh.at[layer, jnp.arange(b)[:, None], positions_BxT].set(
      new_BxTxKxDh.astype(cache_LxBxSxKxDh.dtype))


def _layer(block, x_BxTxD, rope_BxT, layer, cache: KVCache, starts_B, tokens_BxT):
  """One Block (same math as model.Block) that also writes its keys/values into the cache."""
  b, t = x_BxTxD.shape[:2]
  q, k, v = block.attn.project_qkv(block.attn_norm(x_BxTxD), rope_BxT,
                                   block.attn.value_rows(tokens_BxT, x_BxTxD.dtype))
  cache = cache._replace(k=_write_rows(cache.k, layer, k, starts_B), v=_write_rows(cache.v, layer, v, starts_B))
  s = cache.k.shape[2]
  # Query i of row b sits at position starts_B[b] + i and sees cache slots 0..that position
  # (the last `window` + 1 of them on a sliding-window layer).
  out_BxTxHxDh = attention(q, cache.k[layer], cache.v[layer], q_segment_ids=jnp.ones((b, t), jnp.int32),
                           kv_segment_ids=jnp.ones((b, s), jnp.int32), q_offset=starts_B, impl="xla",
                           **block.attn.window_kwargs())
  x_BxTxD = x_BxTxD + block.attn.project_out(out_BxTxHxDh)
  return x_BxTxD + block.mlp(block.mlp_norm(x_BxTxD)), cache


def extend(model, tokens_BxT: Array, starts_B: Array, cache: KVCache, last_B: Array | None = None):
  """Runs T new tokens per row (row b's at positions starts_B[b]...) through the model, writing
  their keys/values into the cache. Returns (logits, cache): logits [B, T, V] for every new token,
  or [B, V] for the token at index last_B[b] of each row when last_B is given."""
  b, t = tokens_BxT.shape
  positions_BxT = starts_B[:, None].astype(jnp.int32) + jnp.arange(t, dtype=jnp.int32)
  x_BxTxD = model.embed_tokens(tokens_BxT)
  if model.smear_gate is not None:
    x_BxTxD = model.smear(x_BxTxD, positions_BxT, model.embed_tokens(cache.last_token[:, None]))
  rope_BxT = model.rope_tables(positions_BxT)
  newest_B = (jnp.full((b,), t - 1, jnp.int32) if last_B is None else last_B.astype(jnp.int32))
  cache = cache._replace(last_token=jnp.take_along_axis(tokens_BxT, newest_B[:, None], axis=1)[:, 0].astype(jnp.int32))
  if model.cfg.scan_layers:
    graphdef, stacked = nnx.split(model.layers)

    def body(carry, inputs):
      x, c = carry
      block_state, layer = inputs
      return _layer(nnx.merge(graphdef, block_state), x, rope_BxT, layer, c, starts_B, tokens_BxT), None

    layers = jnp.arange(model.cfg.num_layers)
    (x_BxTxD, cache), _ = jax.lax.scan(body, (x_BxTxD, cache), (stacked, layers))
  else:
    def run_layer(layer, block, x, scalars):
      nonlocal cache
      x, cache = _layer(block, mix_layer_input(x, scalars), rope_BxT, layer, cache, starts_B, tokens_BxT)
      return x

    x_BxTxD = model.run_layers(x_BxTxD, run_layer)
  if last_B is None:
    return model.unembed(x_BxTxD), cache
  x_Bx1xD = jnp.take_along_axis(x_BxTxD, last_B[:, None, None].astype(jnp.int32), axis=1)
  return model.unembed(x_Bx1xD)[:, 0], cache
