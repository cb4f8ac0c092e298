"""KV-cache sampling: cached logits equal the full forward pass, filters, greedy, seeds, batching,
stopping, streaming text, and sampling from parameters sharded over a mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmtiny import config as config_lib
from lmtiny.model import kv_cache, sampling, transformer as model_lib
from lmtiny.model.sampling import SamplingError, SamplingParams
from lmtiny.parallel import sharding

VOCAB = 128
GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0, top_k=20, top_p=0.9)


def _cfg(**overrides):
  m = config_lib.base_config().model
  m.update(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=4, max_seq_len=32, mlp_ratio=2.0,
           init="xavier", dtype="float32", attention="xla")
  m.update(overrides)
  return m


def _model(seed=0, **overrides):
  """Parameters drawn with NumPy (no init kernels to compile): matrices ~ N(0, 1/fan_in), the
  embedding ~ N(0, 1) so that logits spread out (greedy choices are not near-ties), norm
  scales ~ 1 + 0.3 N(0, 1)."""
  model = nnx.eval_shape(lambda: model_lib.Transformer(_cfg(**overrides), nnx.Rngs(0)))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    names = [str(getattr(k, "key", k)) for k in path]
    if "scale" in names:
      value = 1.0 + 0.3 * rng.standard_normal(x.shape)
    elif names[-1] == "embed":
      value = rng.standard_normal(x.shape)
    else:
      # q/k/v [D, N, Dh], o [H, Dh, D], MLP and lm_head [in, out]; scanned layers add a leading L.
      if names[-1] in ("q", "k", "v"):
        fan_in = x.shape[-3]
      elif names[-1] == "o":
        fan_in = x.shape[-3] * x.shape[-2]
      else:
        fan_in = x.shape[-2]
      value = rng.standard_normal(x.shape) / np.sqrt(fan_in)
    return jnp.asarray(value, jnp.float32)

  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
  nnx.update(model, state)
  return model


@pytest.fixture(scope="module")
def model():
  return _model(num_kv_heads=2, qk_norm=True)


# ---------------------------------------------------------------------------------------------
# The cache against the full forward pass.


def _teacher_forced(model, tokens_BxT, prefill_lengths_B):
  """Logits [B, T, V] from the cache path: each row prefills its first n_b tokens in one block
  (right-padded), then feeds the rest one token per step at its own position."""
  b, t = tokens_BxT.shape
  cache = kv_cache.init_cache(model.cfg, b, t)
  block_BxP = jnp.where(jnp.arange(t)[None] < prefill_lengths_B[:, None], tokens_BxT, 0)
  prefill_BxTxV, cache = kv_cache.extend(model, block_BxP, jnp.zeros((b,), jnp.int32), cache)
  rows = jnp.arange(b)

  def step(cache, i):  # row b feeds its token at position n_b + i (clamped at the end)
    pos_B = jnp.minimum(prefill_lengths_B + i, t - 1)
    logits_BxV, cache = kv_cache.extend(model, tokens_BxT[rows, pos_B][:, None], pos_B, cache,
                                        last_B=jnp.zeros((b,), jnp.int32))
    return cache, (pos_B, logits_BxV)

  _, (pos_NxB, logits_NxBxV) = jax.lax.scan(step, cache, jnp.arange(t))
  out_BxTxV = prefill_BxTxV  # prefill rows are right for positions < n_b
  return out_BxTxV.at[rows[None, :], pos_NxB].set(logits_NxBxV)


@pytest.mark.parametrize("overrides", [
    dict(),                                                     # MHA, untied
    dict(num_kv_heads=1, tie_embeddings=True),                  # MQA, tied
    dict(num_kv_heads=2, qk_norm=True, scan_layers=True, activation="swiglu", logit_softcap=10.0),
], ids=["mha-untied", "mqa-tied", "gqa-untied-qknorm-scan-swiglu-softcap"])
def test_cached_logits_equal_full_forward_at_every_position(overrides):
  model = _model(seed=1, **overrides)
  tokens = np.random.default_rng(0).integers(0, VOCAB, (3, 24)).astype(np.int32)
  graphdef, params = nnx.split(model)

  @jax.jit
  def both(params, tokens_BxT, prefill_lengths_B):
    model = nnx.merge(graphdef, params)
    return model(tokens_BxT), _teacher_forced(model, tokens_BxT, prefill_lengths_B)

  full, cached = map(np.asarray, both(params, tokens, np.array([1, 7, 16], np.int32)))
  np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-4 * np.abs(full).max())


def test_cache_shape_holds_only_kv_heads(model):
  cache = kv_cache.init_cache(model.cfg, 3, 32)
  assert cache.k.shape == cache.v.shape == (2, 3, 32, 2, 8)  # [L, B, S, K=2 kv heads, Dh]


# ---------------------------------------------------------------------------------------------
# Filters and the sampler.


def test_top_k_keeps_exactly_k_largest():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((4, 50)).astype(np.float32)
  logits[1, :30] = 2.0  # ties at the boundary still give exactly k
  logits[1, 30:] = np.minimum(logits[1, 30:], 1.0)
  for k in (1, 5, 17, 49):
    kept = np.isfinite(np.asarray(sampling.filter_logits(jnp.asarray(logits), top_k=k)))
    assert (kept.sum(-1) == k).all()
    for row in (0, 2, 3):
      assert set(np.flatnonzero(kept[row])) == set(np.argsort(-logits[row])[:k])
    assert k > 30 or (logits[1][kept[1]] == 2.0).all()
  np.testing.assert_array_equal(sampling.filter_logits(jnp.asarray(logits), top_k=0), logits)
  np.testing.assert_array_equal(sampling.filter_logits(jnp.asarray(logits), top_k=50), logits)


def _smallest_nucleus(probs, p):
  order = np.argsort(-probs)
  m = int(np.searchsorted(np.cumsum(probs[order]), p)) + 1  # first prefix with mass >= p
  return set(order[:m])


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p_keeps_smallest_set_with_mass_at_least_p(p):
  rng = np.random.default_rng(1)
  logits = (2.0 * rng.standard_normal((6, 40))).astype(np.float64)
  out = np.asarray(sampling.filter_logits(jnp.asarray(logits, jnp.float32), top_p=p))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  for row in range(6):
    kept = set(np.flatnonzero(np.isfinite(out[row])))
    assert kept == _smallest_nucleus(probs[row], p)
    assert probs[row][list(kept)].sum() >= p - 1e-6
    np.testing.assert_array_equal(out[row][list(kept)], np.float32(logits[row][list(kept)]))


def test_top_k_then_top_p_on_the_renormalised_survivors():
  rng = np.random.default_rng(2)
  logits = rng.standard_normal((3, 30))
  out = np.asarray(sampling.filter_logits(jnp.asarray(logits, jnp.float32), top_k=8, top_p=0.6))
  for row in range(3):
    top8 = np.argsort(-logits[row])[:8]
    probs = np.zeros(30)
    probs[top8] = np.exp(logits[row][top8]) / np.exp(logits[row][top8]).sum()
    assert set(np.flatnonzero(np.isfinite(out[row]))) == _smallest_nucleus(probs, 0.6)


def test_greedy_is_argmax_and_draws_follow_the_tempered_softmax():
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.standard_normal((5, 11)), jnp.float32)
  keys = jax.random.split(jax.random.key(0), 5)
  pos = jnp.arange(5)
  np.testing.assert_array_equal(sampling.sample_next(logits, keys, pos, GREEDY), np.argmax(logits, -1))
  # top_k=1 is greedy whatever the temperature.
  np.testing.assert_array_equal(sampling.sample_next(logits, keys, pos, SamplingParams(2.0, 1, 1.0)),
                                np.argmax(logits, -1))
  # Frequencies over many independent draws match softmax(logits / T).
  n, temperature = 20000, 0.7
  row = jnp.array([1.0, 0.5, 0.0, -1.0], jnp.float32)
  draws = sampling.sample_next(jnp.tile(row, (n, 1)), jax.random.split(jax.random.key(7), n),
                               jnp.zeros((n,), jnp.int32), SamplingParams(temperature, 0, 1.0))
  freq = np.bincount(np.asarray(draws), minlength=4) / n
  want = np.asarray(jax.nn.softmax(row / temperature))
  np.testing.assert_allclose(freq, want, atol=0.015)


def _reference_filter(logits_BxV, top_k, top_p):
  """The filter as it was with static settings (a sort of exactly k): the semantics to keep."""
  b, v = logits_BxV.shape
  k = top_k if 0 < top_k < v else v
  if k == v and top_p >= 1:
    return logits_BxV
  vals_BxC, idx_BxC = jax.lax.top_k(logits_BxV, k)
  if top_p < 1:
    probs_BxC = jax.nn.softmax(vals_BxC.astype(jnp.float32), axis=-1)
    mass_before_BxC = jnp.cumsum(probs_BxC, axis=-1) - probs_BxC
    vals_BxC = jnp.where(mass_before_BxC < top_p, vals_BxC, -jnp.inf)
  return jnp.full_like(logits_BxV, -jnp.inf).at[jnp.arange(b)[:, None], idx_BxC].set(vals_BxC)


def _reference_sample(logits_BxV, keys_B, positions_B, s):
  if s.temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = _reference_filter(logits_BxV.astype(jnp.float32) / s.temperature, s.top_k, s.top_p)
  keys_B = jax.vmap(jax.random.fold_in)(keys_B, positions_B)
  return jax.vmap(jax.random.categorical)(keys_B, logits_BxV).astype(jnp.int32)


# Every filter branch on a 3,000-token vocabulary: none, the 64 cap, the 1,024 cap, the full sort.
RUNTIME_SETTINGS = [SamplingParams(t, k, p) for t, k, p in (
    (0.0, 50, 0.9), (1.0, 0, 1.0), (0.7, 1, 1.0), (1.3, 5, 0.9), (1.0, 64, 0.5), (0.8, 65, 1.0),
    (1.0, 500, 0.95), (1.1, 1024, 0.3), (1.0, 1025, 0.9), (0.9, 2999, 1.0), (1.0, 3000, 0.8),
    (1.0, 5000, 1.0), (0.6, 0, 0.7))]


@pytest.mark.slow(seconds=7)
def test_runtime_settings_sample_what_static_settings_did():
  rng = np.random.default_rng(4)
  logits = jnp.asarray(3.0 * rng.standard_normal((6, 3000)), jnp.float32)
  logits = logits.at[2, :40].set(5.0)  # ties across the top-k boundary
  keys = jax.random.split(jax.random.key(1), 6)
  pos = jnp.arange(6) + 3
  new_filter = jax.jit(sampling.filter_logits)
  new_sample = jax.jit(sampling.sample_next)
  for s in RUNTIME_SETTINGS:
    if s.temperature > 0:
      want = _reference_filter(logits / s.temperature, s.top_k, s.top_p)
      np.testing.assert_array_equal(new_filter(logits / s.temperature, s.top_k, s.top_p), want, err_msg=str(s))
    for seed in range(3):
      keys_B = jax.vmap(jax.random.fold_in, (0, None))(keys, seed)
      np.testing.assert_array_equal(new_sample(logits, keys_B, pos, s.arrays()),
                                    _reference_sample(logits, keys_B, pos, s), err_msg=str(s))


def _count_lowerings():
  """A list that grows by one each time jax lowers a program (a cache miss: a new compile)."""
  events = []

  def listener(event, duration_secs, **kwargs):
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      events.append(event)
  return events, listener


def test_new_temperature_top_k_top_p_values_do_not_recompile(model):
  sampler = sampling.Sampler(model)
  first = sampler.generate(PROMPTS, max_new_tokens=6, sampling=SAMPLED, seed=2)  # compiles
  events, listener = _count_lowerings()
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for s in [SamplingParams(t, k, p) for t, k, p in (
        (0.5, 10, 1.0), (1.3, 0, 1.0), (0.0, 50, 1.0), (0.9, 100, 0.9), (0.7, 5, 0.5), (1.0, 2000, 1.0),
        (2.0, 1, 1.0), (1.0, 20, 0.9))]:
      sampler.generate(PROMPTS, max_new_tokens=6, sampling=s, seed=2)
    again = sampler.generate(PROMPTS, max_new_tokens=6, sampling=SAMPLED, seed=2)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert events == []
  assert again.tokens == first.tokens


def test_sampling_params_reject_bad_values():
  with pytest.raises(SamplingError, match="top_p"):
    SamplingParams(top_p=0.0)
  with pytest.raises(SamplingError, match="top_p"):
    SamplingParams(top_p=1.2)
  with pytest.raises(SamplingError, match="temperature"):
    SamplingParams(temperature=-1.0)
  with pytest.raises(SamplingError, match="top_k"):
    SamplingParams(top_k=-3)


# ---------------------------------------------------------------------------------------------
# Generation.

PROMPTS = [[5, 9, 2, 33, 1], [7, 7, 40, 3, 12, 60, 2, 2, 8], [90]]
NEW = 20


def _reference_greedy(forward, prompt, n):
  """Greedy by re-running the full forward pass over the whole sequence for every token."""
  ids = list(prompt)
  for _ in range(n):
    padded = np.zeros((1, 32), np.int32)  # causal: the padding after the sequence changes nothing
    padded[0, :len(ids)] = ids
    ids.append(int(np.argmax(np.asarray(forward(jnp.asarray(padded)))[0, len(ids) - 1])))
  return ids[len(prompt):]


def test_greedy_batch_equals_full_forward_argmax(model):
  gen = sampling.Sampler(model).generate(PROMPTS, max_new_tokens=NEW, sampling=GREEDY)
  assert gen.finish_reasons == ["length"] * 3
  forward = jax.jit(lambda toks: model(toks))
  for prompt, tokens in zip(PROMPTS, gen.tokens):
    assert tokens == _reference_greedy(forward, prompt, NEW)
  assert gen.prefill_tokens == sum(map(len, PROMPTS)) and gen.decode_tokens == 3 * (NEW - 1)


def test_batch_of_different_lengths_equals_one_by_one(model):
  sampler = sampling.Sampler(model)
  batch = sampler.generate(PROMPTS, max_new_tokens=NEW, sampling=SAMPLED, seed=3)
  for row, prompt in enumerate(PROMPTS):
    alone = sampler.generate([prompt], max_new_tokens=NEW, sampling=SAMPLED, seed=3, rows=[row])
    assert alone.tokens[0] == batch.tokens[row]
  assert len({tuple(t) for t in batch.tokens}) == 3


def test_same_seed_same_tokens_other_seed_other_tokens(model):
  sampler = sampling.Sampler(model)
  a = sampler.generate(PROMPTS, max_new_tokens=NEW, sampling=SAMPLED, seed=11)
  b = sampler.generate(PROMPTS, max_new_tokens=NEW, sampling=SAMPLED, seed=11)
  c = sampler.generate(PROMPTS, max_new_tokens=NEW, sampling=SAMPLED, seed=12)
  assert a.tokens == b.tokens
  assert a.tokens != c.tokens


def test_stops_at_stop_token_and_at_the_context_end(model):
  sampler = sampling.Sampler(model)
  free = sampler.generate(PROMPTS, max_new_tokens=NEW, sampling=GREEDY)
  stop = free.tokens[1][4]  # the 5th token row 1 generates
  gen = sampler.generate(PROMPTS, max_new_tokens=NEW, sampling=GREEDY, stop_ids=[stop])
  first = free.tokens[1].index(stop)
  assert gen.tokens[1] == free.tokens[1][:first] and gen.finish_reasons[1] == "stop_token"
  for row in (0, 2):  # other rows run on, or stop at their own first `stop`
    want = free.tokens[row][:free.tokens[row].index(stop)] if stop in free.tokens[row] else free.tokens[row]
    assert gen.tokens[row] == want
  # A prompt near the end of the 32-token context gets only the room that is left.
  long_prompt = list(np.arange(28) + 3)
  gen = sampler.generate([PROMPTS[0], long_prompt, PROMPTS[2]], max_new_tokens=NEW, sampling=GREEDY)
  assert len(gen.tokens[1]) == 4 and gen.finish_reasons[1] == "length"
  assert [gen.tokens[0], gen.tokens[2]] == [free.tokens[0], free.tokens[2]]  # other rows undisturbed
  # The host callback stops a row (stop strings use it).
  seen = []

  def on_tokens(row, ids):
    if row == 0:
      seen.extend(ids)
    return row == 0 and len(seen) >= 3

  gen = sampler.generate(PROMPTS, max_new_tokens=NEW, sampling=GREEDY, on_tokens=on_tokens)
  assert gen.finish_reasons == ["stopped", "length", "length"]
  assert gen.tokens[0] == free.tokens[0][:len(seen)] and len(seen) < NEW and gen.tokens[1:] == free.tokens[1:]


def test_a_chunk_longer_than_the_context_decodes_at_most_the_context(model):
  huge = sampling.Sampler(model, chunk=10**9)  # the token buffer would be [B, 1e9] unclamped
  assert huge.chunk == model.cfg.max_seq_len
  want = sampling.Sampler(model).generate(PROMPTS, max_new_tokens=NEW, sampling=GREEDY).tokens
  assert huge.generate(PROMPTS, max_new_tokens=NEW, sampling=GREEDY).tokens == want


def test_bad_prompts_are_rejected(model):
  sampler = sampling.Sampler(model)
  with pytest.raises(SamplingError, match="prompt 1: empty"):
    sampler.generate([[1], []], max_new_tokens=4)
  with pytest.raises(SamplingError, match="32 tokens.*context is 32"):
    sampler.generate([[1] * 32], max_new_tokens=4)
  with pytest.raises(SamplingError, match="max_new_tokens"):
    sampler.generate([[1]], max_new_tokens=0)


def test_sharded_parameters_sample_the_same_text(model):
  """The trainer samples with parameters sharded over its mesh: same tokens as on one device."""
  want = sampling.Sampler(model).generate(PROMPTS, max_new_tokens=NEW, sampling=SAMPLED, seed=5).tokens
  mesh = sharding.make_mesh(_mesh_cfg(data=2, tensor=4))
  params = nnx.state(model, nnx.Param)
  sharded = jax.device_put(params, sharding.tree_shardings(params, mesh))
  graphdef = nnx.graphdef(model)
  with jax.set_mesh(mesh):
    got = sampling.Sampler(nnx.merge(graphdef, sharded)).generate(PROMPTS, max_new_tokens=NEW, sampling=SAMPLED,
                                                                  seed=5).tokens
  assert got == want


def _mesh_cfg(**sizes):
  cfg = config_lib.base_config().mesh
  cfg.update(fsdp=1, **sizes)
  return cfg


# ---------------------------------------------------------------------------------------------
# Text.


class CharTokenizer:
  """id = code point; 0xFFFD stands for an incomplete character. BOS = 1."""
  bos_id = 1

  def encode(self, text):
    return [ord(c) for c in text]

  def decode(self, ids):
    return "".join(chr(i) for i in ids if i != 1)


def test_text_stream_cuts_at_stop_strings_across_chunks():
  tok = CharTokenizer()
  stream = sampling.TextStream(tok, ["STOP", "\n\n"])
  pieces = [stream.add(tok.encode(chunk)) for chunk in ["Hello S", "T", "a", "rt ST", "OP more"]]
  assert pieces == ["Hello ", "", "STa", "rt ", ""]
  assert stream.stopped and stream.text == "Hello STart " and stream.finish() == ""
  stream = sampling.TextStream(tok, ["STOP"])
  assert stream.add(tok.encode("ab\ufffd")) == "ab"  # an incomplete character waits
  assert stream.add(tok.encode("c")) == "\ufffdc"
  assert stream.add(tok.encode("ST")) == "" and stream.finish() == "ST" and not stream.stopped


def test_sample_text_is_bos_plus_prompt_decoded(model):
  tok = CharTokenizer()
  prompts = ["ab", "", "hello"]
  kw = dict(temperature=SAMPLED.temperature, top_k=SAMPLED.top_k, top_p=SAMPLED.top_p)
  texts = sampling.sample_text(model, tok, prompts, max_new_tokens=12, seed=4, **kw)
  gen = sampling.Sampler(model).generate([[1] + tok.encode(p) for p in prompts], max_new_tokens=12,
                                         sampling=SAMPLED, seed=4, stop_ids=[1])
  assert texts == [tok.decode(t) for t in gen.tokens]
  assert texts == sampling.sample_text(model, tok, prompts, max_new_tokens=12, seed=4, **kw)
