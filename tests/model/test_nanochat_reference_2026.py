"""The PyTorch reference of nanochat's current GPT (tests/nanochat_reference_2026.py) checked on its
own: nanochat's window rule, the January reference reproduced with every new part inert, each new
part changing the logits, the sliding-window mask by brute force, and the weight mapping's layouts."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import nanochat_reference as january  # noqa: E402  (needs torch)
import nanochat_reference_2026 as ref  # noqa: E402

D, N_HEAD, HEAD_DIM, FFN = 32, 2, 16, 128


@pytest.fixture(autouse=True)
def _one_thread():
  torch.set_num_threads(1)


def _randn(gen, *shape, std=1.0):
  return torch.randn(*shape, generator=gen) * std


def _january_weights(n_layer, n_kv_head, vocab, seed=0):
  """nanochat-named weights of the January model, large enough that every block matters."""
  gen = torch.Generator().manual_seed(seed)
  w = {"transformer.wte.weight": _randn(gen, vocab, D), "lm_head.weight": _randn(gen, vocab, D, std=0.5)}
  for i in range(n_layer):
    p = f"transformer.h.{i}."
    w[p + "attn.c_q.weight"] = _randn(gen, N_HEAD * HEAD_DIM, D, std=0.3)
    w[p + "attn.c_k.weight"] = _randn(gen, n_kv_head * HEAD_DIM, D, std=0.3)
    w[p + "attn.c_v.weight"] = _randn(gen, n_kv_head * HEAD_DIM, D, std=0.3)
    w[p + "attn.c_proj.weight"] = _randn(gen, D, N_HEAD * HEAD_DIM, std=0.1)
    w[p + "mlp.c_fc.weight"] = _randn(gen, FFN, D, std=0.2)
    w[p + "mlp.c_proj.weight"] = _randn(gen, D, FFN, std=0.05)
  return w


def _parts_on(w, n_kv_head, seed=1):
  """Every newer parameter of `w` set to a value far from inert."""
  gen = torch.Generator().manual_seed(seed)
  n_layer, vp = ref.count_layers(w), w["transformer.wte.weight"].shape[0]
  w = ref.with_neutral_extras(w, n_kv_head=n_kv_head)
  w.update(resid_lambdas=1 + _randn(gen, n_layer, std=0.2), x0_lambdas=_randn(gen, n_layer, std=0.3),
           smear_lambda=torch.tensor([0.8]), backout_lambda=torch.tensor([0.4]))
  w["smear_gate.weight"] = _randn(gen, 1, ref.SMEAR_CHANNELS)
  for i in range(n_layer):
    if ref.has_value_embed(i, n_layer):
      w[f"value_embeds.{i}.weight"] = _randn(gen, vp, n_kv_head * HEAD_DIM)
      w[f"transformer.h.{i}.attn.ve_gate.weight"] = _randn(gen, n_kv_head, ref.VE_GATE_CHANNELS)
  return w


def _tokens(t, vocab, seed=0, batch=2):
  return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(seed))


def _forward(w, idx, n_kv_head, **kw):
  kw = {"sequence_len": idx.shape[1], "vocab_size": w["lm_head.weight"].shape[0], **kw}
  return ref.forward(w, idx, n_head=N_HEAD, n_kv_head=n_kv_head, **kw)


def test_window_sizes_follow_nanochats_rule():
  # a quarter of the context, rounded up, then up to a multiple of 128: 2048 -> 512 (nanochat's
  # comment still says 768, from before a825e63 changed the divisor from 3 to 4)
  assert ref.window_sizes(12, "SSSL", 2048) == [512, 512, 512, 2048] * 3
  assert ref.window_sizes(5, "SL", 1024) == [256, 1024, 256, 1024, 1024]  # tiled, last always long
  assert ref.window_sizes(3, "s", 1024) == [256, 256, 1024]
  assert ref.window_sizes(4, "L", 512) == [512] * 4
  assert ref.window_sizes(1, "S", 2048) == [2048]
  shorts = {n: ref.window_sizes(2, "S", n)[0] for n in (64, 512, 513, 1000, 2560, 4096)}
  assert shorts == {64: 128, 512: 128, 513: 256, 1000: 256, 2560: 640, 4096: 1024}
  for bad in ("", "SXL"):
    with pytest.raises(ValueError):
      ref.window_sizes(4, bad, 2048)


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_inert_new_parts_reproduce_the_january_reference(n_kv_head):
  w = _january_weights(3, n_kv_head, vocab=64)
  idx = _tokens(40, 64)
  old = january.forward(w, idx, n_head=N_HEAD, n_kv_head=n_kv_head)
  new = _forward(ref.with_neutral_extras(w, n_kv_head=n_kv_head), idx, n_kv_head, window_pattern="L",
                 rope_base=10000.0, qk_scale=1.0)
  assert old.abs().max() > 5  # far from zero, softcap active
  assert torch.equal(old, new)


def _changed(a, b):
  return float((a - b).abs().max())


def test_each_new_part_changes_the_logits():
  n_kv, vocab, t = 1, 64, 160  # t > 129: a short window (128 at sequence_len 512) cuts
  base = ref.with_neutral_extras(_january_weights(4, n_kv, vocab), n_kv_head=n_kv)
  on = _parts_on(base, n_kv)
  idx = _tokens(t, vocab)
  plain = dict(window_pattern="L", sequence_len=512, rope_base=10000.0, qk_scale=1.0)
  logits = _forward(base, idx, n_kv, **plain)
  variants = {name: (dict(base, **{k: on[k] for k in keys}), {}) for name, keys in {
      "resid_lambdas": ["resid_lambdas"], "x0_lambdas": ["x0_lambdas"],
      "smear": ["smear_lambda", "smear_gate.weight"], "backout": ["backout_lambda"],
      "value_embeds": ["value_embeds.1.weight", "value_embeds.3.weight"]}.items()}
  variants.update(qk_scale=(base, {"qk_scale": 1.2}), rope_base=(base, {"rope_base": 100000.0}),
                  windows=(base, {"window_pattern": "SSSL"}))
  for name, (w, knobs) in variants.items():
    assert _changed(logits, _forward(w, idx, n_kv, **{**plain, **knobs})) > 1e-2, name
  # the gate of the value embeddings, on top of the tables
  with_tables = dict(base, **{k: on[k] for k in ("value_embeds.1.weight", "value_embeds.3.weight")})
  with_gates = dict(with_tables, **{k: on[k] for k in on if k.endswith("ve_gate.weight")})
  assert _changed(_forward(with_tables, idx, n_kv, **plain), _forward(with_gates, idx, n_kv, **plain)) > 1e-2
  assert torch.isfinite(_forward(on, idx, n_kv)).all()


def test_backout_needs_a_layer_after_the_middle():
  """Backout keeps the residual after layer L // 2; with 2 layers that is the last one, and the
  final norm undoes the scaling (1 - lambda) x: backout is inert below 3 layers."""
  w = ref.with_neutral_extras(_january_weights(2, 2, 64), n_kv_head=2)
  idx = _tokens(24, 64)
  a = _forward(w, idx, 2)
  b = _forward(dict(w, backout_lambda=torch.tensor([0.4])), idx, 2)
  torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def test_padded_vocab_rows_are_cropped():
  vocab, vp = 50, 64
  w = _parts_on(ref.with_neutral_extras(_january_weights(3, 2, vp), n_kv_head=2), 2)
  idx = _tokens(20, vocab)
  logits = _forward(w, idx, 2, vocab_size=vocab)
  assert logits.shape == (2, 20, vocab) and logits.dtype == torch.float32
  padding = dict(w)
  padding["lm_head.weight"] = w["lm_head.weight"].clone()
  padding["lm_head.weight"][vocab:] = 100.0  # rows past the vocab never reach the logits
  assert torch.equal(logits, _forward(padding, idx, 2, vocab_size=vocab))


def _loop_attention(q, k, v, window):
  """Query by query, key by key: softmax over keys i - window .. i."""
  b, t, h, dh = q.shape
  rep = h // k.shape[2]
  out = torch.zeros_like(q)
  for i in range(t):
    keys = list(range(max(0, i - window), i + 1))
    for head in range(h):
      scores = torch.stack([(q[:, i, head] * k[:, j, head // rep]).sum(-1) for j in keys], -1) / dh ** 0.5
      probs = torch.softmax(scores, -1)
      out[:, i, head] = sum(probs[:, n, None] * v[:, j, head // rep] for n, j in enumerate(keys))
  return out


@pytest.mark.parametrize("window", [0, 3, 7, 40])
def test_window_mask_against_a_loop(window):
  gen = torch.Generator().manual_seed(window)
  q, k, v = _randn(gen, 2, 12, 4, 8), _randn(gen, 2, 12, 2, 8), _randn(gen, 2, 12, 2, 8)
  torch.testing.assert_close(ref.attention(q, k, v, window), _loop_attention(q, k, v, window), atol=1e-5, rtol=0)


@pytest.mark.parametrize("changed_at", [10, 60, 150])
def test_short_window_sees_exactly_its_keys(changed_at):
  """A 2-layer model by nanochat's rule (windows 128, 512) with the last layer's outputs zeroed and
  no smear: changing token j changes exactly positions j .. j + 128."""
  t, vocab = 200, 64
  w = _parts_on(ref.with_neutral_extras(_january_weights(2, 1, vocab), n_kv_head=1), 1)
  w["smear_lambda"] = torch.zeros(1)
  for name in ("attn.c_proj.weight", "mlp.c_proj.weight"):
    w[f"transformer.h.1.{name}"] = torch.zeros_like(w[f"transformer.h.1.{name}"])
  assert ref.window_sizes(2, "S", 512) == [128, 512]
  idx = _tokens(t, vocab, batch=1)
  other = idx.clone()
  other[0, changed_at] = (idx[0, changed_at] + 1) % vocab
  a, b = (_forward(w, x, 1, window_pattern="S", sequence_len=512)[0] for x in (idx, other))
  moved = [i for i in range(t) if not torch.equal(a[i], b[i])]
  assert moved == list(range(changed_at, min(t, changed_at + 129)))


def test_window_override_makes_the_last_layer_short():
  t, vocab = 30, 64
  w = ref.with_neutral_extras(_january_weights(1, 2, vocab), n_kv_head=2)
  idx = _tokens(t, vocab, batch=1)
  other = idx.clone()
  other[0, 5] = (idx[0, 5] + 1) % vocab
  a, b = (_forward(w, x, 2, windows=[4])[0] for x in (idx, other))
  assert [i for i in range(t) if not torch.equal(a[i], b[i])] == [5, 6, 7, 8, 9]


def _lmtiny_params(n_layer, n_kv_head, vp, seed=0):
  """A nested dict in lmtiny's layouts, each entry distinct random numbers."""
  rng = np.random.default_rng(seed)
  f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
  layers = {}
  for i in range(n_layer):
    attn = {"q": f(D, N_HEAD, HEAD_DIM), "k": f(D, n_kv_head, HEAD_DIM), "v": f(D, n_kv_head, HEAD_DIM),
            "o": f(N_HEAD, HEAD_DIM, D)}
    if ref.has_value_embed(i, n_layer):
      attn.update(value_embed=f(vp, n_kv_head, HEAD_DIM), ve_gate=f(ref.VE_GATE_CHANNELS, n_kv_head))
    layers[i] = {"attn": attn, "mlp": {"up": f(D, FFN), "down": f(FFN, D)}}
  return {"embed": f(vp, D), "lm_head": f(D, vp), "layers": layers, "resid_lambdas": f(n_layer),
          "x0_lambdas": f(n_layer), "smear_lambda": f(1), "backout_lambda": f(1), "smear_gate": f(24, 1)}


def test_lmtiny_mapping_layouts():
  params = _lmtiny_params(3, 1, 64)
  w = ref.lmtiny_to_nanochat(params)
  layer0, attn0 = params["layers"][0], params["layers"][0]["attn"]
  half = HEAD_DIM // 2
  q = w["transformer.h.0.attn.c_q.weight"].numpy()  # row h * Dh + e is head h, channel e
  np.testing.assert_array_equal(q[1 * HEAD_DIM + 2], attn0["q"][:, 1, 2])
  np.testing.assert_array_equal(q[1 * HEAD_DIM + half + 2], -attn0["q"][:, 1, half + 2])  # RoPE sign
  np.testing.assert_array_equal(w["transformer.h.0.attn.c_k.weight"].numpy()[half], -attn0["k"][:, 0, half])
  np.testing.assert_array_equal(w["transformer.h.0.attn.c_v.weight"].numpy()[half], attn0["v"][:, 0, half])
  np.testing.assert_array_equal(w["transformer.h.0.attn.c_proj.weight"].numpy()[:, HEAD_DIM + 3], attn0["o"][1, 3])
  np.testing.assert_array_equal(w["transformer.h.0.mlp.c_fc.weight"].numpy(), layer0["mlp"]["up"].T)
  np.testing.assert_array_equal(w["transformer.h.0.mlp.c_proj.weight"].numpy(), layer0["mlp"]["down"].T)
  np.testing.assert_array_equal(w["value_embeds.0.weight"].numpy(), attn0["value_embed"].reshape(64, HEAD_DIM))
  np.testing.assert_array_equal(w["transformer.h.2.attn.ve_gate.weight"].numpy(), params["layers"][2]["attn"]["ve_gate"].T)
  np.testing.assert_array_equal(w["smear_gate.weight"].numpy(), params["smear_gate"].T)
  np.testing.assert_array_equal(w["lm_head.weight"].numpy(), params["lm_head"].T)
  shapes = {k: tuple(v.shape) for k, v in w.items() if not k.startswith("transformer.h.1.")}
  assert {k: s for k, s in shapes.items() if "value_embeds" in k or "ve_gate" in k} == {
      "value_embeds.0.weight": (64, HEAD_DIM), "value_embeds.2.weight": (64, HEAD_DIM),
      "transformer.h.0.attn.ve_gate.weight": (1, 12), "transformer.h.2.attn.ve_gate.weight": (1, 12)}
  assert (shapes["resid_lambdas"], shapes["smear_lambda"], shapes["backout_lambda"]) == ((3,), (1,), (1,))
  assert all(v.dtype == torch.float32 for v in w.values())
  assert torch.isfinite(_forward(w, _tokens(16, 64), 1)).all()


def test_param_groups_cover_nanochats_parameters():
  w = ref.lmtiny_to_nanochat(_lmtiny_params(3, 1, 64))
  groups = ref.param_groups(w)
  assert set(groups) == set(w)
  assert groups["transformer.h.2.attn.ve_gate.weight"] == groups["transformer.h.1.mlp.c_fc.weight"] == "matrix"
  assert [groups[k] for k in ("lm_head.weight", "transformer.wte.weight", "value_embeds.2.weight",
                              "resid_lambdas", "x0_lambdas")] == ["lm_head", "wte", "value_embeds", "resid", "x0"]
  assert {groups[k] for k in ("smear_gate.weight", "smear_lambda", "backout_lambda")} == {"smear"}
  with pytest.raises(KeyError):
    ref.param_groups(["transformer.cos"])


def test_smear_gates_on_the_current_token_and_mixes_the_previous_one():
  gen = torch.Generator().manual_seed(3)
  x = _randn(gen, 2, 6, D)
  gate_w = torch.zeros(1, ref.SMEAR_CHANNELS)
  gate_w[0, 23] = 2.0  # the last channel the gate reads
  out = ref.smear(x, {"smear_lambda": torch.tensor([0.7]), "smear_gate.weight": gate_w})
  assert torch.equal(out[:, 0], x[:, 0])
  expected = x[:, 1:] + 0.7 * torch.sigmoid(2.0 * x[:, 1:, 23:24]) * x[:, :-1]
  torch.testing.assert_close(out[:, 1:], expected, atol=1e-6, rtol=0)
  moved = x.clone()
  moved[..., ref.SMEAR_CHANNELS:] += 1.0  # channels past the gate's: only the mixed-in values move
  gate = (ref.smear(moved, {"smear_lambda": torch.tensor([0.7]), "smear_gate.weight": gate_w}) - moved)[:, 1:, :1]
  torch.testing.assert_close(gate, (out - x)[:, 1:, :1], atol=1e-6, rtol=0)
