"""Causal, document-masked attention behind one function with selectable backends.

A query at index i may attend a key at index j when j <= i + offset and both carry the same
segment id (packed rows hold several documents; segment 0 is padding and attends only to
itself). Backends:
  xla   - plain einsum + float32 softmax; runs anywhere, the reference.
  cudnn - jax.nn.dot_product_attention(implementation="cudnn"), fused flash attention on
          NVIDIA GPUs (bf16/fp16 only).
  auto  - cudnn on GPU when the dtype allows, else xla.
A TPU splash-attention kernel would be one more branch here: it runs under shard_map over the
batch and head axes with the segment ids passed as its SegmentIds.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def attention_mask(q_segment_ids_BxT: Array, kv_segment_ids_BxS: Array, q_offset: Array | int = 0) -> Array:
  """Boolean [B, 1, T, S]: causal (key index <= query index + q_offset) and same segment."""
  t, s = q_segment_ids_BxT.shape[1], kv_segment_ids_BxS.shape[1]
  q_index_BxT = jnp.arange(t)[None, :] + jnp.reshape(q_offset, (-1, 1))
  causal_BxTxS = jnp.arange(s)[None, None, :] <= q_index_BxT[:, :, None]
  same_doc_BxTxS = q_segment_ids_BxT[:, :, None] == kv_segment_ids_BxS[:, None, :]
  return (causal_BxTxS & same_doc_BxTxS)[:, None, :, :]


def xla_attention(q_BxTxHxDh: Array, k_BxSxKxDh: Array, v_BxSxKxDh: Array, mask_Bx1xTxS: Array) -> Array:
  b, t, h, dh = q_BxTxHxDh.shape
  k = k_BxSxKxDh.shape[2]
  q_BxTxKxGxDh = q_BxTxHxDh.reshape(b, t, k, h // k, dh)
  scores_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxDh, k_BxSxKxDh,
                                preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(dh))
  scores_BxKxGxTxS = jnp.where(mask_Bx1xTxS[:, :, None], scores_BxKxGxTxS, jnp.finfo(jnp.float32).min)
  probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxDh.dtype)
  out_BxTxKxGxDh = jnp.einsum("bkgts,bskd->btkgd", probs_BxKxGxTxS, v_BxSxKxDh)
  return out_BxTxKxGxDh.reshape(b, t, h, dh)


def resolve_impl(impl: str, dtype) -> str:
  if impl == "auto":
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and dtype in (jnp.bfloat16, jnp.float16) else "xla"
  return impl


def attention(q_BxTxHxDh: Array, k_BxSxKxDh: Array, v_BxSxKxDh: Array, *, q_segment_ids: Array,
              kv_segment_ids: Array, q_offset: Array | int = 0, impl: str = "auto") -> Array:
  """Multi-head / grouped-query attention; K kv heads serve H // K query heads each."""
  mask_Bx1xTxS = attention_mask(q_segment_ids, kv_segment_ids, q_offset)
  impl = resolve_impl(impl, q_BxTxHxDh.dtype)
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask=mask_Bx1xTxS,
                                        implementation="cudnn")
  return xla_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1xTxS)
