"""lmtiny.attention: the mask's semantics, the XLA backend against NumPy, backend selection."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtiny import attention as attn_lib


def _numpy_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, allowed_BxTxS):
  """Direct float64 softmax attention; query head h reads kv head h // (H / K)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh))
  b, t, h, dh = q.shape
  group = h // k.shape[2]
  out = np.zeros_like(q)
  for i in range(b):
    for head in range(h):
      scores = q[i, :, head] @ k[i, :, head // group].T / math.sqrt(dh)
      scores = np.where(allowed_BxTxS[i], scores, -np.inf)
      p = np.exp(scores - scores.max(-1, keepdims=True))
      out[i, :, head] = (p / p.sum(-1, keepdims=True)) @ v[i, :, head // group]
  return out


def _qkv(b, t, s, h, k, dh, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((b, t, h, dh)).astype(np.float32),
          rng.standard_normal((b, s, k, dh)).astype(np.float32),
          rng.standard_normal((b, s, k, dh)).astype(np.float32))


def _expected_mask(q_seg, kv_seg, offsets):
  """Written out element by element: key j visible to query i iff j <= i + offset, same segment."""
  b, t, s = len(q_seg), len(q_seg[0]), len(kv_seg[0])
  out = np.zeros((b, 1, t, s), bool)
  for n in range(b):
    for i in range(t):
      for j in range(s):
        out[n, 0, i, j] = j <= i + offsets[n] and q_seg[n][i] == kv_seg[n][j]
  return out


# ---------------------------------------------------------------------------------------------
# attention_mask.


def test_mask_is_causal_for_one_segment():
  mask = np.asarray(attn_lib.attention_mask(jnp.ones((1, 5), jnp.int32), jnp.ones((1, 5), jnp.int32)))
  assert mask.shape == (1, 1, 5, 5) and mask.dtype == bool
  np.testing.assert_array_equal(mask[0, 0], np.tril(np.ones((5, 5), bool)))


def test_mask_keeps_documents_and_padding_apart():
  seg = [[1, 1, 2, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3]]
  mask = np.asarray(attn_lib.attention_mask(jnp.asarray(seg), jnp.asarray(seg)))
  np.testing.assert_array_equal(mask, _expected_mask(seg, seg, [0, 0]))
  assert not mask[0, 0, 2, :2].any()        # document 2 does not see document 1
  assert mask[0, 0, 6, 5] and mask[0, 0, 6, 6] and not mask[0, 0, 6, :5].any()  # padding: itself only
  assert mask[:, 0].any(-1).all()           # no query row is empty


@pytest.mark.parametrize("offset", [3, np.array([0, 4])])
def test_mask_q_offset_shifts_queries_along_the_keys(offset):
  """Decoding: T new queries sit at key positions offset .. offset + T - 1 of the cache."""
  q_seg = np.ones((2, 2), np.int32)
  kv_seg = np.array([[1, 1, 1, 1, 1, 1, 1], [2, 1, 1, 1, 1, 1, 1]], np.int32)
  mask = np.asarray(attn_lib.attention_mask(jnp.asarray(q_seg), jnp.asarray(kv_seg), jnp.asarray(offset)))
  offsets = np.broadcast_to(offset, (2,))
  np.testing.assert_array_equal(mask, _expected_mask(q_seg, kv_seg, offsets))
  # Query 0 of row 0 sees exactly keys 0..offset.
  assert mask[0, 0, 0].sum() == offsets[0] + 1


# ---------------------------------------------------------------------------------------------
# xla_attention and the attention() entry point.


@pytest.mark.parametrize("h,k", [(4, 4), (4, 2), (4, 1)])
def test_xla_attention_matches_numpy_with_a_random_mask(h, k):
  q, kk, v = _qkv(2, 5, 7, h, k, 8, seed=h * 10 + k)
  rng = np.random.default_rng(1)
  allowed = rng.random((2, 5, 7)) < 0.5
  allowed[:, :, 0] = True  # every query sees at least one key
  got = attn_lib.xla_attention(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(v), jnp.asarray(allowed[:, None]))
  np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, kk, v, allowed), rtol=1e-5, atol=1e-5)


def test_attention_gqa_uses_kv_head_of_its_group():
  """Query heads 0,1 read kv head 0 and heads 2,3 read kv head 1 (not interleaved)."""
  q, k, v = _qkv(1, 3, 3, 4, 2, 4)
  v[:, :, 0], v[:, :, 1] = 1.0, -1.0
  seg = jnp.ones((1, 3), jnp.int32)
  out = np.asarray(attn_lib.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_segment_ids=seg,
                                      kv_segment_ids=seg, impl="xla"))
  np.testing.assert_allclose(out[0, :, :2], 1.0, atol=1e-6)
  np.testing.assert_allclose(out[0, :, 2:], -1.0, atol=1e-6)


def test_attention_with_segments_and_offset_matches_numpy():
  b, t, s = 2, 3, 8
  q, k, v = _qkv(b, t, s, 4, 2, 16, seed=3)
  kv_seg = np.array([[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
  q_seg = np.array([[2, 2, 2], [1, 1, 1]], np.int32)
  offsets = np.array([4, 2])
  got = attn_lib.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_segment_ids=jnp.asarray(q_seg),
                           kv_segment_ids=jnp.asarray(kv_seg), q_offset=jnp.asarray(offsets), impl="auto")
  allowed = _expected_mask(q_seg, kv_seg, offsets)[:, 0]
  np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v, allowed), rtol=1e-5, atol=1e-5)


def test_attention_bfloat16_inputs_stay_close():
  q, k, v = _qkv(1, 6, 6, 2, 1, 8, seed=4)
  seg = jnp.ones((1, 6), jnp.int32)
  got = attn_lib.attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), q_segment_ids=seg,
                           kv_segment_ids=seg, impl="xla")
  assert got.dtype == jnp.bfloat16
  want = _numpy_attention(q, k, v, np.tril(np.ones((1, 6, 6), bool)))
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.05)


# ---------------------------------------------------------------------------------------------
# Backend selection.


def test_resolve_impl_picks_xla_on_cpu():
  assert jax.default_backend() == "cpu"
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    assert attn_lib.resolve_impl("auto", dtype) == "xla"
  assert attn_lib.resolve_impl("xla", jnp.bfloat16) == "xla"
  assert attn_lib.resolve_impl("cudnn", jnp.bfloat16) == "cudnn"


def test_resolve_impl_picks_cudnn_on_gpu_only_for_half_precision(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert attn_lib.resolve_impl("auto", jnp.dtype(jnp.bfloat16)) == "cudnn"
  assert attn_lib.resolve_impl("auto", jnp.dtype(jnp.float16)) == "cudnn"
  assert attn_lib.resolve_impl("auto", jnp.dtype(jnp.float32)) == "xla"
