"""lmtiny.model.attention with a sliding window (`window=w`: query i sees keys i - w .. i only).

Every backend against a float64 NumPy reference written out here: the mask, the block-skipping
XLA self-attention (values and gradients, packed documents, GQA), the KV-cache decode path (a
masked full-length cache, per-row offsets), splash in Pallas interpret mode, and the arguments
cuDNN gets (traced and lowered for an H100; it cannot run on this CPU-only install)."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from lmtiny.model import attention as attn_lib
from lmtiny.training import lowering


def _allowed(q_seg, kv_seg, offsets, window):
  """Key j visible to query i iff i + off - w <= j <= i + off (w = 0: no lower bound) and same segment."""
  q_seg, kv_seg = np.asarray(q_seg), np.asarray(kv_seg)
  b, t, s = q_seg.shape[0], q_seg.shape[1], kv_seg.shape[1]
  out = np.zeros((b, t, s), bool)
  for n in range(b):
    for i in range(t):
      pos = i + int(np.broadcast_to(offsets, (b,))[n])
      for j in range(s):
        out[n, i, j] = j <= pos and (window == 0 or j >= pos - window) and q_seg[n, i] == kv_seg[n, j]
  return out


def _reference(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, allowed_BxTxS):
  """Float64 softmax attention under a boolean mask; query head h reads kv head h // (H / K)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
  scores = np.where(allowed_BxTxS[:, None], scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  return np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), v)


def _qkv(b, t, s, h, k, dh, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((b, t, h, dh)).astype(np.float32),
          rng.standard_normal((b, s, k, dh)).astype(np.float32),
          rng.standard_normal((b, s, k, dh)).astype(np.float32))


def _packed(b, t, seed=0):
  """Rows of contiguous documents 1..k (some longer than the windows tested, some shorter) and a
  padding tail of zeros on row 0."""
  rng = np.random.default_rng(seed)
  seg = np.sort(rng.integers(1, 5, (b, t)), axis=1).astype(np.int32)
  seg[0, t - t // 8:] = 0
  return seg


# ---------------------------------------------------------------------------------------------
# The mask.


@pytest.mark.parametrize("window", [1, 3])
def test_mask_with_a_window_keeps_w_plus_one_keys(window):
  seg = np.array([[1] * 9, [1, 1, 1, 1, 2, 2, 2, 2, 2]], np.int32)
  mask = np.asarray(attn_lib.attention_mask(jnp.asarray(seg), jnp.asarray(seg), window=window))[:, 0]
  np.testing.assert_array_equal(mask, _allowed(seg, seg, 0, window))
  np.testing.assert_array_equal(mask[0], np.tril(np.ones((9, 9), bool)) & np.triu(np.ones((9, 9), bool), -window))
  assert mask.sum(-1).max() == window + 1
  assert not mask[1, 4, :4].any()  # the window does not reach across a document boundary


def test_mask_window_counts_from_the_absolute_query_position():
  """Decoding: 2 queries at positions off, off + 1 of a 12-key cache see off - w .. off (+1)."""
  offsets = np.array([0, 6])
  mask = np.asarray(attn_lib.attention_mask(jnp.ones((2, 2), jnp.int32), jnp.ones((2, 12), jnp.int32),
                                            jnp.asarray(offsets), window=4))[:, 0]
  np.testing.assert_array_equal(mask, _allowed(np.ones((2, 2)), np.ones((2, 12)), offsets, 4))
  assert np.flatnonzero(mask[1, 0]).tolist() == [2, 3, 4, 5, 6]
  assert np.flatnonzero(mask[1, 1]).tolist() == [3, 4, 5, 6, 7]


def test_window_must_be_a_static_non_negative_int():
  q, k, v = (jnp.asarray(x) for x in _qkv(1, 4, 4, 2, 1, 8))
  with pytest.raises(ValueError, match="window must be >= 0"):
    attn_lib.attention(q, k, v, impl="xla", window=-1)
  with pytest.raises(ValueError, match="static int"):
    jax.jit(lambda w: attn_lib.attention(q, k, v, impl="xla", window=w))(3)
  assert attn_lib.static_window(np.int64(5)) == 5
  with pytest.raises(ValueError, match="window must be >= 0"):
    attn_lib.xla_causal_attention(q, k, v, None, -2)


# ---------------------------------------------------------------------------------------------
# The XLA paths against NumPy.


def test_query_blocks_and_key_starts_skip_only_keys_outside_the_window():
  for t, w in [(256, 1), (256, 7), (256, 64), (256, 100), (2048, 512), (2048, 128), (96, 20), (48, 5)]:
    blocks = attn_lib.xla_query_blocks(t, w)
    rows = t // blocks
    assert t % blocks == 0 and blocks >= attn_lib.xla_query_blocks(t)
    for start, key_start in zip(range(0, t, rows), attn_lib.xla_key_starts(t, w)):
      assert 0 <= key_start <= max(0, start - w) and key_start % attn_lib.KEY_ALIGN == 0
    assert attn_lib.xla_score_fraction(t, w) <= attn_lib.xla_score_fraction(t)
  assert attn_lib.xla_score_fraction(2048) == 10 / 16
  assert attn_lib.xla_query_blocks(2048, 512) == 8 and abs(attn_lib.xla_score_fraction(2048, 512) - 0.328) < 1e-3
  assert attn_lib.xla_key_starts(256, 255) == [0] * 4  # w >= T - 1: plain causal blocks


@pytest.mark.parametrize("t,w,h,k,packed", [
    (256, 1, 4, 2, True), (256, 7, 4, 1, True), (256, 64, 4, 4, False), (256, 100, 6, 2, True), (48, 5, 2, 1, True)])
def test_windowed_xla_self_attention_matches_numpy_and_its_gradients_the_dense_masked_path(t, w, h, k, packed):
  q, kk, v = _qkv(2, t, t, h, k, 16, seed=t + w + h)
  seg = _packed(2, t, seed=w) if packed else np.ones((2, t), np.int32)
  seg_j = jnp.asarray(seg) if packed else None
  allowed = _allowed(seg, seg, 0, w)
  want = _reference(q, kk, v, allowed)
  blockwise = jax.jit(lambda q, k, v: attn_lib.xla_causal_attention(q, k, v, seg_j, w))
  entry = jax.jit(lambda q, k, v: attn_lib.attention(q, k, v, q_segment_ids=seg_j, kv_segment_ids=seg_j,
                                                     impl="xla", window=w))
  dense = jax.jit(lambda q, k, v: attn_lib.xla_attention(q, k, v, jnp.asarray(allowed[:, None])))
  args = [jnp.asarray(x) for x in (q, kk, v)]
  for fn in (blockwise, entry, dense):
    np.testing.assert_allclose(np.asarray(fn(*args)), want, rtol=1e-4, atol=1e-4)
  weights = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)
  grads = [jax.jit(jax.grad(lambda *x, fn=fn: jnp.sum(fn(*x) * weights), argnums=(0, 1, 2)))(*args)
           for fn in (blockwise, dense)]
  for got_g, want_g in zip(*grads):
    np.testing.assert_allclose(np.asarray(got_g), np.asarray(want_g), rtol=1e-4, atol=1e-4)


def test_window_zero_is_the_full_causal_program_and_a_window_changes_the_output():
  """window=0 (and any w >= T - 1, which sees every earlier key) lowers to the very program the
  call without a window lowers to; a real window gives other values."""
  t = 128
  q, k, v = (jnp.asarray(x) for x in _qkv(2, t, t, 4, 2, 16, seed=5))
  seg = jnp.asarray(_packed(2, t))

  def run(**kw):
    return jax.jit(lambda q, k, v: attn_lib.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                                      impl="xla", **kw))

  base = run()
  assert run(window=0).lower(q, k, v).as_text() == base.lower(q, k, v).as_text()
  assert run(window=t - 1).lower(q, k, v).as_text() == base.lower(q, k, v).as_text()
  full = np.asarray(base(q, k, v))
  np.testing.assert_array_equal(np.asarray(run(window=0)(q, k, v)), full)
  np.testing.assert_array_equal(np.asarray(attn_lib.xla_causal_attention(q, k, v, seg, 0)),
                                np.asarray(attn_lib.xla_causal_attention(q, k, v, seg)))
  windowed = np.asarray(run(window=7)(q, k, v))
  assert np.abs(windowed - full).max() > 0.1
  np.testing.assert_allclose(windowed[:, :8], full[:, :8], rtol=1e-5, atol=1e-5)  # the first 8 see no fewer keys


# ---------------------------------------------------------------------------------------------
# The KV-cache decode path: a full-length cache, masked to the window.


@pytest.mark.parametrize("t", [1, 3])
def test_decode_with_a_window_matches_numpy_and_the_rows_of_self_attention(t):
  b, s, w = 2, 40, 5
  kv_seg = np.ones((b, s), np.int32)
  kv_seg[1, :20] = 1
  kv_seg[1, 20:] = 2  # row 1 decodes document 2, which began at position 20
  offsets = np.array([30, 21])
  q, k, v = _qkv(b, t, s, 4, 2, 16, seed=t)
  q_seg = np.stack([kv_seg[n, offsets[n]:offsets[n] + t] for n in range(b)])
  got = attn_lib.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_segment_ids=jnp.asarray(q_seg),
                           kv_segment_ids=jnp.asarray(kv_seg), q_offset=jnp.asarray(offsets), impl="xla", window=w)
  np.testing.assert_allclose(np.asarray(got), _reference(q, k, v, _allowed(q_seg, kv_seg, offsets, w)),
                             rtol=1e-5, atol=1e-5)
  # The same queries placed at their positions in a full windowed self-attention give the same rows.
  q_full = np.zeros((b, s, 4, 16), np.float32)
  for n in range(b):
    q_full[n, offsets[n]:offsets[n] + t] = q[n]
  full = np.asarray(attn_lib.attention(jnp.asarray(q_full), jnp.asarray(k), jnp.asarray(v),
                                       q_segment_ids=jnp.asarray(kv_seg), kv_segment_ids=jnp.asarray(kv_seg),
                                       impl="xla", window=w))
  for n in range(b):
    np.testing.assert_allclose(np.asarray(got)[n], full[n, offsets[n]:offsets[n] + t], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Splash (Pallas interpret mode) and the meaning of the fused kernels' window arguments.


def test_splash_local_mask_is_our_window():
  t, w = 64, 9
  got = splash_mask.LocalMask((t, t), window_size=(w, 0), offset=0)[0:t, 0:t]
  np.testing.assert_array_equal(got, _allowed(np.ones((1, t)), np.ones((1, t)), 0, w)[0])


def test_splash_with_a_window_matches_xla_packed_gqa():
  """T=384 has 128-token splash tiles: with w=100 the tile of queries 256.. and keys ..127 lies
  wholly outside the window (skipped), and the others are masked inside."""
  t, w = 384, 100
  assert attn_lib.splash_block(t) == 128
  q, k, v = (jnp.asarray(x) for x in _qkv(2, t, t, 4, 2, 32, seed=11))
  seg = jnp.asarray(_packed(2, t, seed=1))
  weights = jnp.sin(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)

  def value_and_grads(impl):
    def loss(q, k, v):
      out = attn_lib.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl=impl, window=w)
      return jnp.sum(out * weights), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return np.asarray(out), [np.asarray(g) for g in grads]

  out, grads = value_and_grads("splash")
  want_out, want_grads = value_and_grads("xla")
  np.testing.assert_allclose(want_out, _reference(q, k, v, _allowed(seg, seg, 0, w)), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-4)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_jax_nn_local_window_size_means_our_window():
  """What cuDNN is handed is jax.nn's local_window_size=(w, 0) with is_causal: its XLA
  implementation (same documented semantics) against our reference."""
  t, w = 32, 6
  q, k, v = _qkv(2, t, t, 4, 2, 16, seed=2)
  got = jax.nn.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), is_causal=True,
                                     local_window_size=(w, 0), implementation="xla")
  np.testing.assert_allclose(np.asarray(got), _reference(q, k, v, _allowed(np.ones((2, t)), np.ones((2, t)), 0, w)),
                             rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# cuDNN: the arguments its entry points get, and the program lowered for an H100.


def test_cudnn_gets_the_window_unpacked_and_packed(monkeypatch):
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha  # pylint: disable=g-import-not-at-top
  calls = []

  def fake_nn(q, k, v, **kw):
    calls.append(("nn", kw))
    return q

  def fake_packed(q, k, v, **kw):
    calls.append(("packed", kw))
    return q

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake_nn)
  monkeypatch.setattr(cudnn_fmha, "dot_product_attention", fake_packed)
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _qkv(1, 128, 128, 4, 2, 16, seed=3))
  seg = jnp.asarray([[1] * 30 + [2] * 98], jnp.int32)
  for segments, window in [(None, 16), (seg, 16), (None, 0), (seg, 0), (None, 127)]:
    attn_lib.attention(q, k, v, q_segment_ids=segments, kv_segment_ids=segments, impl="cudnn", window=window)
  assert calls[0] == ("nn", dict(is_causal=True, implementation="cudnn", local_window_size=(16, 0)))
  assert calls[1][0] == "packed" and calls[1][1]["sliding_window_length"] == 17
  assert calls[1][1]["mask_type"] == cudnn_fmha.MaskType.PADDING_CAUSAL
  assert calls[2] == ("nn", dict(is_causal=True, implementation="cudnn"))  # window 0: today's call
  assert calls[3][1]["sliding_window_length"] is None
  assert calls[4] == calls[2]  # w >= T - 1 is plain causal


@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_lowered_for_an_h100_carries_the_sliding_window(packed):
  t, w = 256, 64
  q = jax.ShapeDtypeStruct((2, t, 4, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, t, 2, 64), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, t), jnp.int32)

  def loss(q, k, v, s):
    s = s if packed else None
    out = attn_lib.attention(q, k, v, q_segment_ids=s, kv_segment_ids=s, impl="auto", window=w)
    return jnp.sum(out.astype(jnp.float32))

  with lowering.target("cuda"):
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg).lower(lowering_platforms=("cuda",)).as_text()
  s = lowering.summarize(text, t)
  assert s["cudnn"] == {"forward": 1, "backward": 1} and s["square"] == {}
  assert s["mask_types"] == (["PADDING_CAUSAL"] if packed else ["CAUSAL"])
  assert set(re.findall(r"sliding_window_length\\22: (\d+)", text)) == {str(w + 1)}


def test_a_fused_backend_the_shape_rules_out_falls_back_to_xla_with_the_window_kept():
  """Every backend takes a window, packed rows included, so resolve_impl has no window rule: the
  shape rules stand (splash needs T % 128 == 0; packed cuDNN rows T >= 128), and where they send
  a call to xla, the window goes with it."""
  assert attn_lib.resolve_impl("auto", jnp.bfloat16, platform="gpu", seq_len=2048, packed=True,
                               gpu_capability=(9, 0)) == "cudnn"
  assert attn_lib.resolve_impl("auto", jnp.bfloat16, platform="tpu", seq_len=2048, packed=True) == "splash"
  w = 5
  q, k, v = _qkv(2, 64, 64, 4, 2, 16, seed=4)
  seg = _packed(2, 64)
  for impl, platform, n in (("splash", "tpu", 60), ("cudnn", "gpu", 64)):  # no splash tile; one cuDNN run
    assert attn_lib.resolve_impl(impl, jnp.bfloat16, platform=platform, seq_len=n, packed=True,
                                 gpu_capability=(9, 0)) == "xla"
    got = attn_lib.attention(*(jnp.asarray(x[:, :n]) for x in (q, k, v)), q_segment_ids=jnp.asarray(seg[:, :n]),
                             kv_segment_ids=jnp.asarray(seg[:, :n]), impl=impl, window=w)
    want = _reference(q[:, :n], k[:, :n], v[:, :n], _allowed(seg[:, :n], seg[:, :n], 0, w))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
