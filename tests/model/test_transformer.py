"""lmtiny.model against an independent float64 NumPy forward pass, plus masking, layouts and init.

Parameters come from the model itself (nnx.state(model, nnx.Param)); norm scales and the
embedding are re-drawn at random so a scale of ones or a tiny embedding cannot hide a bug.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmtiny import config as config_lib
from lmtiny.model import transformer as model_lib
import reference_numpy as ref
from lm_fixtures import forward, load_config_module

VOCAB = 61
T = 12


def _cfg(**overrides):
  m = config_lib.base_config().model
  m.update(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=4, max_seq_len=64, mlp_ratio=2.0,
           init="xavier", dtype="float32", attention="xla")
  m.update(overrides)
  config_lib.validate_model(m)
  return m


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _set_params(model, pure):
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), pure))
  nnx.update(model, state)


def _random_model(m, seed=0):
  """The model with every parameter drawn here (no init kernels to compile, nothing left at 0 or 1).

  Matrices ~ N(0, 1/fan_in), embedding ~ N(0, 1), norm scales ~ 1 + 0.3 N(0, 1).
  """
  model = nnx.eval_shape(lambda: model_lib.Transformer(m, nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  fan_in = dict(o=config_lib.head_dim(m) * m.num_heads, down=config_lib.mlp_dim(m))

  def draw(path, x):
    names = [getattr(k, "key", k) for k in path]
    if "scale" in names:
      return 1.0 + 0.3 * rng.standard_normal(x.shape)
    if names[-1] == "embed":
      return rng.standard_normal(x.shape)
    return rng.standard_normal(x.shape) / math.sqrt(fan_in.get(names[-1], m.d_model))

  _set_params(model, jax.tree_util.tree_map_with_path(draw, _params(model)))
  return model


def _batch(seed=0, vocab=VOCAB):
  """Row 0: one document. Row 1: packed - three documents (positions restart) and padding."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (2, T)).astype(np.int32)
  segments = np.array([[1] * T, [1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 0]], np.int32)
  positions = np.array([list(range(T)), [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 0]], np.int32)
  return tokens, positions, segments


def _assert_logits_close(got, want, rtol=1e-4):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


# ---------------------------------------------------------------------------------------------
# The reference itself: RoPE is rotation by complex multiplication, and only relative.


def test_reference_rope_is_complex_rotation_of_half_pairs():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((5, 3, 8))
  pos = np.array([0, 1, 2, 7, 100])
  got = ref.rotary(x, pos, 10000.0)
  z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * pos[:, None, None] * 10000.0 ** (-np.arange(4) / 4))
  np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), atol=1e-12)
  q, k = rng.standard_normal((1, 1, 8)), rng.standard_normal((1, 1, 8))
  dot = lambda p, r: float((ref.rotary(q, np.array([p]), 500.0) * ref.rotary(k, np.array([r]), 500.0)).sum())
  assert dot(9, 4) == pytest.approx(dot(5, 0), abs=1e-12)


def test_model_rope_matches_reference():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 3, 16)).astype(np.float32)
  pos = rng.integers(0, 500, (2, 6))
  got = model_lib.rope(jnp.asarray(x), jnp.asarray(pos), 10000.0, table_len=500)
  want = np.stack([ref.rotary(x[b].astype(np.float64), pos[b], 10000.0) for b in range(2)])
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_rope_tables_give_nan_past_their_length_not_a_clamped_angle():
  cos, sin = model_lib.rope_tables(jnp.asarray([[0, 7, 8]]), head_dim=4, theta=10000.0, table_len=8)
  assert cos.shape == sin.shape == (1, 3, 1, 2)
  assert np.isfinite(np.asarray(cos[0, :2])).all() and np.isnan(np.asarray(cos[0, 2])).all()
  np.testing.assert_allclose(np.asarray(sin[0, 1, 0]), np.sin(7 * 10000.0 ** -(np.arange(2) / 2)), rtol=1e-6)


def test_dense_equals_einsum_over_every_row_and_weight_axis():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 5, 3, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 4, 6)), jnp.float32)
  np.testing.assert_allclose(np.asarray(model_lib.dense(x, w, in_dims=2)),
                             np.einsum("bthk,hkd->btd", np.asarray(x, np.float64), np.asarray(w, np.float64)), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Forward pass against the float64 reference.

CASES = {
    "relu2": dict(activation="relu2"),
    "gelu": dict(activation="gelu"),
    "silu": dict(activation="silu"),
    "swiglu": dict(activation="swiglu"),
    "gqa": dict(num_kv_heads=2, activation="swiglu"),
    "mqa": dict(num_kv_heads=1),
    "qk_norm": dict(qk_norm=True),
    "qk_norm_no_scale": dict(qk_norm=True, norm_scale=False, num_kv_heads=2),
    "no_norm_scale": dict(norm_scale=False),
    "tied": dict(tie_embeddings=True),
    "softcap": dict(tie_embeddings=True, logit_softcap=4.0),
    "head_dim_64": dict(d_model=128, num_heads=2, num_layers=1),
    "head_dim_128": dict(d_model=64, num_heads=2, head_dim=128, num_kv_heads=1, num_layers=1),
    "nanochat_like": dict(activation="relu2", norm_scale=False, qk_norm=True, logit_softcap=15.0,
                          head_dim=16, num_heads=2, rope_theta=500.0, mlp_ratio=4.0, num_layers=3,
                          tie_embeddings=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_float64_reference(name):
  m = _cfg(**CASES[name])
  model = _random_model(m)
  tokens, positions, segments = _batch()
  got = forward(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments))
  assert got.dtype == jnp.float32 and got.shape == (2, T, VOCAB)
  want = ref.forward(_params(model), m, tokens, positions, segments)
  _assert_logits_close(got, want)
  if m.logit_softcap:
    assert np.abs(want).max() > 0.5 * m.logit_softcap  # the cap is in its nonlinear range


def test_default_positions_and_segments_are_one_causal_document():
  m = _cfg(activation="swiglu", qk_norm=True, num_kv_heads=2)
  model = _random_model(m)
  tokens, _, _ = _batch(3)
  got = forward(model, jnp.asarray(tokens))
  _assert_logits_close(got, ref.forward(_params(model), m, tokens))


def test_reference_test_can_fail_on_a_wrong_parameter():
  """Sanity check of the harness: a perturbed query weight is visible in the logits."""
  m = _cfg()
  model = _random_model(m)
  tokens, positions, segments = _batch()
  params = ref.to_numpy64(_params(model))
  params["layers"][1]["attn"]["q"][0, 0, 0] += 0.5
  got = forward(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments))
  with pytest.raises(AssertionError):
    _assert_logits_close(got, ref.forward(params, m, tokens, positions, segments))


# ---------------------------------------------------------------------------------------------
# Causality and document masking.


def test_future_token_does_not_change_earlier_logits():
  m = _cfg(num_kv_heads=2, qk_norm=True)
  model = _random_model(m)
  tokens, _, _ = _batch()
  changed = tokens.copy()
  changed[:, 7] = (changed[:, 7] + 1) % VOCAB
  a, b = np.asarray(forward(model, jnp.asarray(tokens))), np.asarray(forward(model, jnp.asarray(changed)))
  np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
  assert np.abs(a[:, 7:] - b[:, 7:]).max(axis=(0, 2)).min() > 1e-3  # every later position sees it


def test_document_masking_isolates_documents():
  m = _cfg(num_kv_heads=2, qk_norm=True)
  model = _random_model(m)
  tokens, positions, segments = _batch()
  run = lambda tok, *rest: np.asarray(forward(model, *map(jnp.asarray, (tok,) + rest)))
  packed = run(tokens, positions, segments)[1]
  doc1, doc2, doc3 = slice(0, 4), slice(4, 9), slice(9, 11)

  changed = tokens.copy()
  changed[1, 2] = (changed[1, 2] + 1) % VOCAB  # a token of document 1
  packed_changed = run(changed, positions, segments)[1]
  np.testing.assert_allclose(packed_changed[doc2], packed[doc2], rtol=0, atol=1e-6)
  np.testing.assert_allclose(packed_changed[9:], packed[9:], rtol=0, atol=1e-6)
  assert np.abs(packed_changed[3] - packed[3]).max() > 1e-3  # later tokens of document 1 see it

  # Each document run alone (at the start of a row, positions from 0, one segment) gives the
  # same logits as inside the pack. What follows it in that row is unseen (causality).
  for doc in (doc1, doc2, doc3):
    n = doc.stop - doc.start
    alone = np.roll(tokens, -doc.start, axis=1)
    np.testing.assert_allclose(run(alone)[1, :n], packed[doc], rtol=1e-5, atol=1e-5)
  assert np.abs(run(tokens)[1, doc2] - packed[doc2]).max() > 1e-3  # unmasked, it would differ


def test_positions_matter_only_relatively():
  """RoPE: shifting every position of a document by the same amount leaves its logits alone."""
  m = _cfg(qk_norm=True)
  model = _random_model(m)
  tokens, _, _ = _batch()
  pos = np.broadcast_to(np.arange(T), (2, T))
  a = np.asarray(forward(model, jnp.asarray(tokens), jnp.asarray(pos)))
  b = np.asarray(forward(model, jnp.asarray(tokens), jnp.asarray(pos + 37)))
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  c = np.asarray(forward(model, jnp.asarray(tokens), jnp.asarray(pos * 2)))
  assert np.abs(a - c).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Layouts: scan over stacked layers and rematerialisation equal the plain loop.


def _stack_layers(pure):
  layers = [pure["layers"][i] for i in sorted(pure["layers"])]
  return dict(pure, layers=jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers))


def _loss_and_grads(model, tokens):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p):
    logits = nnx.merge(graphdef, p, rest)(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean(), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  return np.asarray(logits), nnx.to_pure_dict(grads)


@pytest.mark.slow(seconds=4)
def test_scan_and_remat_match_plain_loop_in_value_and_gradient():
  """The same seed gives different parameters in the two layouts (one key per layer from a
  split, versus a running stream), so the plain model's parameters are stacked explicitly."""
  base = dict(num_kv_heads=2, qk_norm=True, activation="swiglu")
  plain = _random_model(_cfg(**base))
  tokens = jnp.asarray(_batch()[0])
  want_logits, want_grads = _loss_and_grads(plain, tokens)
  for scan, remat in [(False, "full"), (True, "dots")]:
    model = _random_model(_cfg(**base, scan_layers=scan, remat=remat), seed=5)
    _set_params(model, _stack_layers(_params(plain)) if scan else _params(plain))
    logits, grads = _loss_and_grads(model, tokens)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6),
                 grads, _stack_layers(want_grads) if scan else want_grads)
  assert np.abs(want_grads["layers"][0]["attn"]["q"]).max() > 1e-4


def test_remat_policies_give_the_same_loss_and_gradients():
  """One layer (what a policy saves is per block), packed rows, GQA: every policy equals no remat
  (full and dots are covered with the scan layout above; dots_no_batch is minimal's old name)."""
  tokens, positions, segments = (jnp.asarray(x) for x in _batch(4))
  params = _params(_random_model(_cfg(num_layers=1, num_kv_heads=2), seed=6))

  def value_and_grads(remat):
    model = nnx.eval_shape(lambda: model_lib.Transformer(_cfg(num_layers=1, num_kv_heads=2, remat=remat), nnx.Rngs(0)))
    graphdef, abstract, rest = nnx.split(model, nnx.Param, ...)
    nnx.replace_by_pure_dict(abstract, jax.tree.map(jnp.asarray, params))
    loss = lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p, rest)(tokens, positions, segments)))
    value, grads = jax.jit(jax.value_and_grad(loss))(abstract)
    return float(value), nnx.to_pure_dict(grads)

  want_value, want_grads = value_and_grads("none")
  assert np.abs(want_grads["layers"][0]["attn"]["k"]).max() > 1e-3
  for remat in ("save_attn_out", "save_qkv", "minimal"):
    value, grads = value_and_grads(remat)
    assert abs(value - want_value) <= 1e-5 * abs(want_value), remat
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6),
                 grads, want_grads)


def _fused_forward_kernels(m) -> int:
  """How many splash forward kernels one training step's jaxpr runs (after dead-code
  elimination: value_and_grad keeps the primal forward alive, as a train step does)."""
  from jax._src.interpreters import partial_eval as pe  # pylint: disable=g-import-not-at-top
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: model_lib.Transformer(m, nnx.Rngs(0))), nnx.Param, ...)
  tokens, segments = jnp.zeros((1, 128), jnp.int32), jnp.ones((1, 128), jnp.int32)
  closed = jax.make_jaxpr(jax.value_and_grad(lambda p: nnx.merge(graphdef, p, rest)(tokens, None, segments).sum()))(params)
  live, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))

  def count(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      name = str(eqn.params.get("name_and_src_info") or eqn.params.get("name") or "")
      n += eqn.primitive.name == "pallas_call" and "_fwd_" in name
      n += sum(count(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
    return n

  return count(live)


@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_run_a_fused_attention_forward_once_except_full(scan):
  """The attention output and the kernel's residuals carry a checkpoint name: every policy but
  `full` keeps them, so the backward pass does not rerun the kernel's forward (splash here, in
  interpret mode; cuDNN goes through the same named_residuals wrapper)."""
  import jax.extend  # noqa: F401  pylint: disable=g-import-not-at-top
  counts = {remat: _fused_forward_kernels(_cfg(num_layers=1, num_kv_heads=2, max_seq_len=128, attention="splash",
                                               remat=remat, scan_layers=scan))
            for remat in config_lib.REMAT_POLICIES}
  assert counts == {remat: 2 if remat == "full" else 1 for remat in config_lib.REMAT_POLICIES}


def test_remat_policy_table_matches_config():
  assert set(model_lib.REMAT_POLICIES) | {"none"} == set(config_lib.REMAT_POLICIES)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_layout_matches_reference_directly(remat):
  m = _cfg(num_layers=3, scan_layers=True, remat=remat, tie_embeddings=True)
  model = _random_model(m)
  assert model.layers.attn.q[...].shape == (3, 32, 4, 8)
  assert model.layers.attn.q.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")
  tokens, positions, segments = _batch()
  got = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments))
  _assert_logits_close(got, ref.forward(_params(model), m, tokens, positions, segments))


# ---------------------------------------------------------------------------------------------
# Initialisation.


def _std(x):
  return float(np.std(np.asarray(x, np.float64)))


@pytest.mark.parametrize("init", config_lib.INITS)
def test_every_init_builds_with_its_scale(init):
  layers, d, f = 2, 64, 256
  m = _cfg(init=init, d_model=d, num_layers=layers, mlp_ratio=4.0, vocab_size=256)
  model = model_lib.Transformer(m, nnx.Rngs(0))
  logits = np.asarray(forward(model, jnp.asarray(_batch(vocab=256)[0])))
  assert np.isfinite(logits).all()
  p = _params(model)
  blk = p["layers"][0]
  assert np.all(np.asarray(blk["attn_norm"]["scale"]) == 1.0)
  stds = {k: _std(v) for k, v in dict(embed=p["embed"], lm_head=p["lm_head"], q=blk["attn"]["q"],
                                      o=blk["attn"]["o"], up=blk["mlp"]["up"], down=blk["mlp"]["down"]).items()}
  uniform = lambda fan_in, fan_out: math.sqrt(2.0 / (fan_in + fan_out))  # std of Glorot uniform
  want = {
      "gpt2": dict(embed=0.02, lm_head=0.02, q=0.02, up=0.02,
                   o=0.02 / math.sqrt(2 * layers), down=0.02 / math.sqrt(2 * layers)),
      "xavier": dict(embed=0.02, lm_head=uniform(d, 256), q=uniform(d, d), o=uniform(d, d),
                     up=uniform(d, f), down=uniform(f, d)),
      "kaiming": dict(embed=0.02, lm_head=math.sqrt(2 / d), q=math.sqrt(2 / d), o=math.sqrt(2 / d),
                      up=math.sqrt(2 / d), down=math.sqrt(2 / f)),
      "nanochat": dict(embed=1.0, lm_head=0.001, q=1 / math.sqrt(d), up=1 / math.sqrt(d), o=0.0, down=0.0),
      "nanochat_2026": dict(embed=0.8, lm_head=0.001, q=1 / math.sqrt(d), up=0.4 / math.sqrt(d), o=0.0, down=0.0),
  }[init]
  for name, std in want.items():
    assert stds[name] == pytest.approx(std, rel=0.1, abs=1e-12), name


@pytest.mark.parametrize("init,tied", [("gpt2", False), ("gpt2", True), ("nanochat", False), ("nanochat", True)])
def test_initial_loss_is_log_vocab(init, tied):
  """A fresh model predicts nearly uniformly: loss within 0.1 nats of ln(vocab) on random tokens."""
  vocab = 256
  m = _cfg(vocab_size=vocab, d_model=64, mlp_ratio=4.0, init=init, tie_embeddings=tied)
  model = model_lib.Transformer(m, nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, vocab, (2, T + 1))
  logits = np.asarray(forward(model, jnp.asarray(tokens[:, :-1])), np.float64)
  loss = ref.cross_entropy(logits, tokens[:, 1:])
  assert abs(loss - math.log(vocab)) < 0.1, f"initial loss {loss:.2f}, ln(vocab) = {math.log(vocab):.2f}"


def test_nanochat_init_blocks_start_as_identity():
  m = _cfg(init="nanochat", norm_scale=False, qk_norm=True, logit_softcap=15.0, activation="relu2",
           d_model=64, mlp_ratio=4.0, vocab_size=256)
  model = model_lib.Transformer(m, nnx.Rngs(0))
  p = ref.to_numpy64(_params(model))
  for i in range(2):
    assert not p["layers"][i]["attn"]["o"].any() and not p["layers"][i]["mlp"]["down"].any()
  tokens = _batch(vocab=256)[0]
  got = np.asarray(forward(model, jnp.asarray(tokens)))
  # Every block adds zero, so logits = softcap(RMSNorm(embedding) @ lm_head).
  z = ref.rms_norm(p["embed"][tokens]) @ p["lm_head"]
  np.testing.assert_allclose(got, 15.0 * np.tanh(z / 15.0), rtol=1e-4, atol=1e-6)
  # The zero projections still learn: they get gradient, while what feeds them gets none yet.
  _, grads = _loss_and_grads(model, jnp.asarray(tokens))
  g = grads["layers"][0]
  assert np.abs(g["attn"]["o"]).max() > 0 and np.abs(g["mlp"]["down"]).max() > 0
  assert not np.asarray(g["attn"]["q"]).any() and not np.asarray(g["mlp"]["up"]).any()


# ---------------------------------------------------------------------------------------------
# Compute dtype.


def test_auto_dtype_is_float32_on_cpu():
  assert jax.default_backend() == "cpu"
  assert model_lib.compute_dtype(_cfg(dtype="auto")) == jnp.float32
  assert model_lib.compute_dtype(_cfg(dtype="bfloat16")) == jnp.bfloat16
  tokens = jnp.asarray(_batch()[0])
  a = forward(_random_model(_cfg(dtype="auto")), tokens)
  b = forward(_random_model(_cfg(dtype="float32")), tokens)
  assert a.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_compute_gives_float32_logits_close_to_float32():
  kw = dict(num_kv_heads=2, qk_norm=True, activation="swiglu", tie_embeddings=True)
  m16 = _cfg(dtype="bfloat16", **kw)
  model = _random_model(m16)
  tokens = jnp.asarray(_batch()[0])
  jaxpr = str(jax.make_jaxpr(lambda t: model(t))(tokens))
  assert "bf16[" in jaxpr  # the matmuls really run in bfloat16
  lo = np.asarray(forward(model, tokens))
  m32 = _cfg(dtype="float32", **kw)
  hi = ref.forward(_params(model), m32, np.asarray(tokens))
  assert lo.dtype == np.float32
  err = np.abs(lo - hi).max() / np.abs(hi).max()
  assert 0 < err < 0.03, err


# ---------------------------------------------------------------------------------------------
# The trainer's loss path (hidden states -> chunked cross-entropy) and compute-dtype casts.


@pytest.mark.parametrize("overrides", [dict(), dict(logit_softcap=2.0, loss_chunk_tokens=7, tie_embeddings=True)],
                         ids=["plain", "softcap-chunked-tied"])
def test_token_losses_match_cross_entropy_of_logits(overrides):
  """Loss, logsumexp and gradients of model.token_losses (no [B, T, V] logits, custom VJP) equal
  autodiff through the full logits and a log-softmax (float32, CPU)."""
  m = _cfg(**overrides)
  graphdef, state = nnx.split(_random_model(m, seed=3))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, VOCAB, (3, T + 1)), jnp.int32)
  weights = jnp.asarray(rng.standard_normal((3, T)), jnp.float32)  # arbitrary per-token cotangents

  def reference(st):
    logits = nnx.merge(graphdef, st)(tokens[:, :-1])
    lse = jax.nn.logsumexp(logits, axis=-1)
    ce = lse - jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(ce * weights) + 0.1 * jnp.sum(lse ** 2), (ce, lse)

  def chunked(st):
    ce, lse = nnx.merge(graphdef, st).token_losses(tokens[:, :-1], tokens[:, 1:])
    return jnp.sum(ce * weights) + 0.1 * jnp.sum(lse ** 2), (ce, lse)

  (ref, (ref_ce, ref_lse)), ref_grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(state)
  (got, (ce, lse)), grads = jax.jit(jax.value_and_grad(chunked, has_aux=True))(state)
  np.testing.assert_allclose(ce, ref_ce, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(r))))


def test_embedding_gradient_is_exact_in_bfloat16():
  """K repeats of one token give exactly K x one token's embedding gradient with bf16 compute:
  the lookup gathers from the float32 table, so its gradient scatter-adds in float32 (a bf16
  table's rows stop growing at 256 unit gradients)."""
  m = _cfg(dtype="bfloat16")
  graphdef, state = nnx.split(nnx.eval_shape(lambda: model_lib.Transformer(m, nnx.Rngs(0))))
  state = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state)

  def embed_grad(k):
    tokens = jnp.full((1, k), 5, jnp.int32)
    loss = lambda st: jnp.sum(nnx.merge(graphdef, st).embed_tokens(tokens).astype(jnp.float32))
    return np.asarray(jax.grad(loss)(state)["embed"][...])

  one, many = embed_grad(1), embed_grad(4096)
  np.testing.assert_array_equal(one[5], np.ones(m.d_model))
  np.testing.assert_array_equal(many[5], 4096 * one[5])
  assert not np.any(np.delete(many, 5, axis=0))


@pytest.mark.slow(seconds=6)
def test_cast_params_casts_matrices_only_and_passes_gradients_to_float32():
  m = _cfg(dtype="bfloat16", qk_norm=True, scan_layers=True)
  model = _random_model(m)
  params = nnx.state(model, nnx.Param)
  cast = model_lib.cast_params(params, jnp.bfloat16)
  dtypes = {"/".join(str(getattr(k, "key", k)) for k in path if getattr(k, "name", None) != "value"): x.dtype
            for path, x in jax.tree_util.tree_flatten_with_path(cast)[0]}
  for name, dtype in dtypes.items():
    matrix = name.split("/")[-1] in ("q", "k", "v", "o", "up", "down", "lm_head")
    assert dtype == (jnp.bfloat16 if matrix else jnp.float32), name
  graphdef = nnx.graphdef(model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, T + 1)), jnp.int32)
  loss = lambda p, cast_first: jnp.mean(nnx.merge(graphdef, model_lib.cast_params(p, jnp.bfloat16) if cast_first
                                                  else p).token_losses(tokens[:, :-1], tokens[:, 1:])[0])
  grads_cast = jax.jit(jax.grad(loss), static_argnums=1)(params, True)   # of a bf16 copy
  grads_plain = jax.jit(jax.grad(loss), static_argnums=1)(params, False)  # the model's own per-use casts
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(grads_plain)[0]]
  for path, g, r in zip(paths, jax.tree.leaves(grads_cast), jax.tree.leaves(grads_plain)):
    assert g.dtype == r.dtype == jnp.float32
    np.testing.assert_allclose(g, r, rtol=0.05, atol=1e-3 * np.abs(r).max())
    name = "/".join(str(getattr(k, "key", k)) for k in path if getattr(k, "name", None) != "value")
    if name.split("/")[-1] in ("q", "k", "v", "o", "up", "down", "lm_head"):
      # Through a cast copy a matrix's gradient is the bf16 GEMM's result; through the per-use
      # casts it leaves the GEMM's float32 accumulator unrounded (what the trainer reduces).
      as_bf16 = lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32)
      np.testing.assert_array_equal(g, as_bf16(g), err_msg=name)
      assert np.mean(np.asarray(r) != as_bf16(r)) > 0.5, name


@pytest.mark.parametrize("name", ["tiny", "tiny_2026"])  # tiny_2026: value embeddings on some layers only
def test_layers_drawn_together_equal_layers_drawn_one_after_another(monkeypatch, name):
  """The layers' parameters, drawn under one vmap per layer shape, are bit for bit those of
  Block(m, rngs, layer) built in turn, and the stream goes on where it would (the lm_head after)."""
  m = load_config_module(name).get_config().model
  def init():  # jitted, as the trainer does (eager draws may round differently)
    return nnx.state(model_lib.Transformer(m, nnx.Rngs(params=3)), nnx.Param)
  together = jax.jit(init)()
  monkeypatch.setattr(model_lib, "_blocks_drawn_together",
                      lambda m, rngs: [model_lib.Block(m, rngs, layer) for layer in range(m.num_layers)])
  in_turn = jax.jit(lambda: init())()  # a new function: jit would reuse init's trace
  assert jax.tree.structure(together) == jax.tree.structure(in_turn)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(together), jax.tree.leaves(in_turn)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
