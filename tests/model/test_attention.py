"""lmtiny.model.attention: the mask's semantics, the XLA backend against NumPy, backend selection, the
inputs cuDNN gets (packed-sequence runs, q/k/v head sharding), and splash attention in Pallas
interpret mode against the XLA path (values and gradients, also under an 8-device mesh).

cuDNN cannot run on a CPU-only install: tests/training/test_lowering.py lowers it for an H100 (the kernel
calls, mask types and operands it would get) and benchmarks/attention.py checks its values
against xla on a GPU."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtiny import config as config_lib
from lmtiny.model import attention as attn_lib
from lmtiny.parallel import sharding


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


@pytest.mark.parametrize("t,h,k,packed", [(256, 6, 2, True), (128, 4, 4, False), (48, 2, 1, True)])
def test_xla_causal_attention_matches_numpy_and_its_gradients_match_the_masked_reference(t, h, k, packed):
  """The block-skipping self-attention (4 query blocks at T=128/256, 1 at T=48) against float64
  NumPy; its gradients against xla_attention with the dense mask."""
  assert config_lib.attention_query_blocks(t) == (4 if t >= 128 else 1)
  q, kk, v = _qkv(2, t, t, h, k, 16, seed=t + h)
  rng = np.random.default_rng(2)
  seg = np.sort(rng.integers(1, 5, (2, t)), axis=1).astype(np.int32) if packed else np.ones((2, t), np.int32)
  seg_j = jnp.asarray(seg) if packed else None
  got = jax.jit(attn_lib.xla_causal_attention)(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(v), seg_j)
  allowed = _expected_mask(seg, seg, np.zeros(2, int))[:, 0]
  np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, kk, v, allowed), rtol=1e-4, atol=1e-4)
  mask = jnp.asarray(allowed[:, None])
  weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  grads = [jax.jit(jax.grad(lambda *x: jnp.sum(fn(*x) * weights), argnums=(0, 1, 2)))(*map(jnp.asarray, (q, kk, v)))
           for fn in (lambda *x: attn_lib.xla_causal_attention(*x, seg_j), lambda *x: attn_lib.xla_attention(*x, mask))]
  for got_g, want_g in zip(*grads):
    np.testing.assert_allclose(np.asarray(got_g), np.asarray(want_g), rtol=1e-4, atol=1e-4)


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


@pytest.mark.parametrize("platform,dtype,kw,want", [
    ("gpu", jnp.bfloat16, {}, "cudnn"),
    ("gpu", jnp.float16, {}, "cudnn"),
    ("gpu", jnp.float32, {}, "xla"),                                         # cuDNN is half precision only
    ("gpu", jnp.bfloat16, dict(packed=True, gpu_capability=(8, 0)), "xla"),   # packed layout needs sm90+
    ("gpu", jnp.bfloat16, dict(packed=True, gpu_capability=(9, 0)), "cudnn"),
    ("gpu", jnp.bfloat16, dict(packed=False, gpu_capability=(8, 0)), "cudnn"),
    ("gpu", jnp.bfloat16, dict(self_attention=False), "xla"),                # KV-cache decode
    ("tpu", jnp.bfloat16, {}, "splash"),
    ("tpu", jnp.float32, dict(seq_len=2048), "splash"),
    ("tpu", jnp.bfloat16, dict(seq_len=100), "xla"),                         # no 128-multiple tile
    ("tpu", jnp.bfloat16, dict(self_attention=False), "xla"),
    ("cpu", jnp.bfloat16, {}, "xla"),
])
def test_auto_backend_per_platform_dtype_and_shape(platform, dtype, kw, want):
  assert attn_lib.resolve_impl("auto", dtype, platform=platform, **kw) == want


def test_explicit_backend_is_kept_unless_the_shape_rules_it_out():
  assert attn_lib.resolve_impl("splash", jnp.float32, platform="cpu", seq_len=256) == "splash"
  assert attn_lib.resolve_impl("splash", jnp.float32, platform="cpu", seq_len=200) == "xla"
  assert attn_lib.resolve_impl("cudnn", jnp.bfloat16, platform="gpu", self_attention=False) == "xla"
  assert [attn_lib.splash_block(n) for n in (2048, 256, 384, 128, 100)] == [512, 256, 128, 128, None]


def test_decode_and_odd_lengths_fall_back_to_xla_on_cpu():
  """cuDNN cannot even be traced on CPU, and splash needs T % 128 == 0: both calls must take xla."""
  b, t, s = 2, 3, 8
  q, k, v = _qkv(b, t, s, 4, 2, 16, seed=7)
  ones_q, ones_kv = jnp.ones((b, t), jnp.int32), jnp.ones((b, s), jnp.int32)
  offsets = np.array([5, 1])
  got = attn_lib.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_segment_ids=ones_q,
                           kv_segment_ids=ones_kv, q_offset=jnp.asarray(offsets), impl="cudnn")
  allowed = _expected_mask(np.ones((b, t)), np.ones((b, s)), offsets)[:, 0]
  np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v, allowed), rtol=1e-5, atol=1e-5)
  q, k, v = _qkv(1, 12, 12, 2, 1, 8, seed=8)
  got = attn_lib.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl="splash")
  want = _numpy_attention(q, k, v, np.tril(np.ones((1, 12, 12), bool)))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# cuDNN's packed-sequence inputs, derived from segment ids.


def _mask_from_runs(lengths_BxM, starts_BxM1, t):
  """What cuDNN's packed PADDING_CAUSAL layout computes: run j of row b is its own causal
  sequence over tokens starts[b, j] .. starts[b, j] + lengths[b, j] - 1."""
  b = len(lengths_BxM)
  out = np.zeros((b, t, t), bool)
  for n in range(b):
    for j, (start, length) in enumerate(zip(starts_BxM1[n], lengths_BxM[n])):
      if length < 0:
        assert start < 0 and (lengths_BxM[n, j:] < 0).all()  # unused entries only at the end
        break
      for i in range(start, start + length):
        out[n, i, start:i + 1] = True
  return out


def test_segment_runs_layout():
  seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]], jnp.int32)
  lengths, starts = jax.jit(attn_lib.segment_runs, static_argnums=1)(seg, 4)
  assert lengths.dtype == jnp.int32 and starts.dtype == jnp.int32
  np.testing.assert_array_equal(lengths, [[3, 2, 3, -1], [8, -1, -1, -1]])
  np.testing.assert_array_equal(starts, [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1]])
  assert config_lib.cudnn_max_runs(2048) == 32 and config_lib.cudnn_max_runs(32) == 1
  # The packer's cap (data.max_docs_per_row) is the bound when there is one, never above T.
  assert config_lib.cudnn_max_runs(2048, 4) == 4 and config_lib.cudnn_max_runs(64, 2) == 2
  assert config_lib.cudnn_max_runs(100, 500) == 100


def test_short_packed_rows_run_cudnn_only_with_a_bound_from_the_packer():
  resolve = functools.partial(attn_lib.resolve_impl, "cudnn", jnp.bfloat16, platform="gpu", packed=True)
  assert resolve(seq_len=64) == "xla"  # T // 64 = 1 run would drop the document mask
  assert resolve(seq_len=64, max_runs=3) == "cudnn"
  assert resolve(seq_len=64, max_runs=1) == "cudnn"  # one document a row: the causal mask is exact


def test_segment_runs_reproduce_the_document_mask():
  """Rows packed as the data pipeline packs them (documents 1..k, padding 0 at the end)."""
  rng = np.random.default_rng(0)
  t, rows = 64, []
  for _ in range(6):
    cuts = np.sort(rng.choice(np.arange(1, t), size=rng.integers(0, 6), replace=False))
    seg = np.zeros(t, np.int32)
    for doc, (a, b) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, t])):
      seg[a:b] = doc + 1
    seg[t - rng.integers(0, 9):] = 0  # padding tail (possibly empty)
    rows.append(seg)
  seg = np.stack(rows)
  lengths, starts = (np.asarray(x) for x in attn_lib.segment_runs(jnp.asarray(seg), 8))
  assert (lengths[lengths > 0].sum() == t * len(rows))
  np.testing.assert_array_equal(_mask_from_runs(lengths, starts, t),
                                np.asarray(attn_lib.attention_mask(jnp.asarray(seg), jnp.asarray(seg)))[:, 0])


def test_runs_past_the_bound_merge_into_the_last():
  seg = jnp.asarray([[1, 2, 3, 4, 5, 5]], jnp.int32)
  lengths, starts = attn_lib.segment_runs(seg, 3)
  np.testing.assert_array_equal(lengths, [[1, 1, 4]])
  np.testing.assert_array_equal(starts, [[0, 1, 2, -1]])
  mask = _mask_from_runs(np.asarray(lengths), np.asarray(starts), 6)
  assert mask[0, 5, 2:6].all() and not mask[0, 5, :2].any()  # documents 3..5 share one causal run


# ---------------------------------------------------------------------------------------------
# GQA head sharding: q and k/v split their heads alike.


@pytest.mark.parametrize("h,k,tensor,want", [
    (8, 2, 4, 2), (8, 1, 4, 4), (8, 8, 4, 1), (8, 4, 2, 1), (6, 3, 2, 2), (12, 3, 4, 4), (8, 2, 8, 4),
    (6, 2, 4, 1),   # tensor does not divide H: q is replicated too, nothing to repeat
    (8, 2, 1, 1),
])
def test_kv_head_repeats_make_q_and_kv_shard_alike(h, k, tensor, want):
  mesh_shape = {"data": 2, "fsdp": 1, "tensor": tensor}
  r = sharding.kv_head_repeats(h, k, mesh_shape)
  assert r == want
  assert (h // k) % r == 0  # query head i still reads a copy of kv head i // (H / K)
  q_shape, kv_shape = (4, 16, h, 8), (4, 16, k * r, 8)
  q_spec, kv_spec, seg_spec = sharding.attention_specs(q_shape, kv_shape, mesh_shape)
  assert q_spec[2] == kv_spec[2] == ("tensor" if h % tensor == 0 and tensor > 1 else None)
  assert q_spec[0] == kv_spec[0] == seg_spec[0] == "data" and q_spec[1] is None and q_spec[3] is None
  if r > 1:  # without the repeat, q would be split and k/v whole: refused
    with pytest.raises(ValueError, match="shard unlike"):
      sharding.attention_specs(q_shape, (4, 16, k, 8), mesh_shape)


def test_kv_head_repeats_without_a_mesh_is_one():
  assert sharding.kv_head_repeats(8, 1) == 1


# ---------------------------------------------------------------------------------------------
# Splash attention (Pallas interpret mode on CPU) against the XLA path: values and gradients.

SPLASH_T = 128


def _packed_segments(b, t):
  seg = np.ones((b, t), np.int32)
  seg[0, 40:] = 2
  seg[0, 97:] = 0  # padding attends to itself only
  seg[1, 11:] = 2
  seg[1, 12:] = 3
  return jnp.asarray(seg)


def _value_and_grads(impl, q, k, v, seg):
  weights = jnp.sin(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)

  def loss(q, k, v):
    return jnp.sum(attn_lib.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl=impl) * weights)

  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
  return float(value), [np.asarray(g) for g in grads]


def _assert_splash_matches_xla(h, k, seg, mesh=None):
  q, kk, v = (jnp.asarray(x) for x in _qkv(2, SPLASH_T, SPLASH_T, h, k, 32, seed=h + k))
  want_value, want_grads = _value_and_grads("xla", q, kk, v, seg)
  if mesh is None:
    value, grads = _value_and_grads("splash", q, kk, v, seg)
  else:
    with jax.set_mesh(mesh):
      value, grads = _value_and_grads("splash", q, kk, v, seg)
  assert abs(value - want_value) <= 1e-4 * abs(want_value)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  assert all(np.abs(w).max() > 1e-2 for w in want_grads)


def test_splash_matches_xla_packed_gqa():
  _assert_splash_matches_xla(4, 2, _packed_segments(2, SPLASH_T))


def test_splash_matches_xla_causal_without_segments():
  _assert_splash_matches_xla(2, 2, None)


def test_splash_under_an_8_device_mesh_with_kv_heads_repeated():
  """data=2 x tensor=4 with one kv head (MQA): shard_map gets q split over heads and k/v
  repeated to 4 heads split the same way."""
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
  assert sharding.kv_head_repeats(4, 1, dict(mesh.shape)) == 4
  _assert_splash_matches_xla(4, 1, _packed_segments(2, SPLASH_T), mesh)


def test_xla_path_under_a_mesh_with_kv_heads_repeated_matches_numpy():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
  q, k, v = _qkv(2, 6, 6, 8, 2, 8, seed=9)
  seg = np.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 0]], np.int32)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda q, k, v, s: attn_lib.attention(q, k, v, q_segment_ids=s, kv_segment_ids=s, impl="xla"))(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(seg))
  allowed = _expected_mask(seg, seg, [0, 0])[:, 0]
  np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v, allowed), rtol=1e-5, atol=1e-5)


@pytest.mark.slow(seconds=4)
def test_cudnn_by_name_reaches_cudnn_and_auto_falls_back_with_a_warning(monkeypatch):
  """On this CPU-only install cuDNN stops at "cuDNN is not detected": asked for by name the error
  surfaces (so the cuDNN branch, segment runs included, really ran up to the kernel); under auto
  on a "GPU" the step warns and runs xla instead."""
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _qkv(1, 128, 128, 4, 2, 16, seed=11))
  seg = jnp.asarray([[1] * 30 + [2] * 90 + [0] * 8], jnp.int32)  # T=128: two runs allowed, packed path
  for segments in (seg, None):
    with pytest.raises(RuntimeError, match="cuDNN"):
      attn_lib.attention(q, k, v, q_segment_ids=segments, kv_segment_ids=segments, impl="cudnn")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.warns(UserWarning, match="using xla"):
    got = attn_lib.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl="auto")
  monkeypatch.undo()
  want = attn_lib.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl="xla")
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_auto_falls_back_with_a_warning_when_a_newer_jax_lacks_a_private_name(monkeypatch):
  """jax's cuDNN entry point is partly private: a version that renamed it raises AttributeError at
  trace time. Under auto that costs speed (one warning naming it), not the run."""
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _qkv(1, 128, 128, 4, 2, 16, seed=12))

  def renamed(*args):
    raise AttributeError("module 'jax._src.cudnn.fused_attention_stablehlo' has no attribute 'MaskType'")
  monkeypatch.setattr(attn_lib, "_cudnn_attention", renamed)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.warns(UserWarning, match=r"cuDNN attention unavailable \(AttributeError: .*MaskType'\); using xla"):
    got = attn_lib.attention(q, k, v, impl="auto")
  with pytest.raises(AttributeError, match="MaskType"):  # asked for by name: the error surfaces
    attn_lib.attention(q, k, v, impl="cudnn")
  monkeypatch.undo()
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(attn_lib.attention(q, k, v, impl="xla"), np.float32))


def test_packed_rows_shorter_than_two_cudnn_runs_go_to_xla_not_to_an_unmasked_kernel():
  """For T < 128 cuDNN's packed bound (T // 64) is one run per row: packed rows would lose their
  document mask, so they run xla; unpacked rows (plain causal) keep cuDNN."""
  for impl in ("auto", "cudnn"):
    assert attn_lib.resolve_impl(impl, jnp.bfloat16, platform="gpu", seq_len=64, packed=True,
                                 gpu_capability=(9, 0)) == "xla"
    assert attn_lib.resolve_impl(impl, jnp.bfloat16, platform="gpu", seq_len=64, packed=False) == "cudnn"
    assert attn_lib.resolve_impl(impl, jnp.bfloat16, platform="gpu", seq_len=128, packed=True,
                                 gpu_capability=(9, 0)) == "cudnn"
