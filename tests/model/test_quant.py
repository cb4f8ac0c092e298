"""Weight-only quantization against a NumPy reference: the dequantized weights equal a per-group
NumPy quantizer's, the quantized model computes exactly the float model with those weights
substituted (logits and greedy sampling through the KV-cache sampler), int4 packing round trips,
the parameter bytes are what the format says, and bad requests are one-line errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_fixtures import apply_jitted, forward
from lmtiny import generate
from lmtiny.config import base_config
from lmtiny.corpus.embedded import iter_embedded_documents
from lmtiny.interop.convert import write_run
from lmtiny.model.quant import (pack_int4, param_bytes, quantize_model, QuantizedWeight, QuantizeError,
                                unpack_int4)
from lmtiny.model.sampling import Sampler, SamplingParams
from lmtiny.model.transformer import cast_params, Transformer
from lmtiny.tokenizer import train_tokenizer

CONTRACT = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1, "lm_head": 1}


def _model(**kw):
  c = base_config().model
  c.update(vocab_size=256, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, activation="swiglu",
           max_seq_len=64, dtype="float32", **kw)
  return Transformer(c, nnx.Rngs(0))


def _logits(model, tokens):
  return np.asarray(forward(model, tokens))


_dequantize = jax.jit(lambda w: w.astype(jnp.float32))  # as inside the model's jit


def _reference(w, n_contract, bits, group):
  """Symmetric quantize-dequantize in NumPy (float32, the scales' dtype, so ties round alike),
  written independently of lmtiny.model.quant:
  the first `n_contract` axes are the inputs (grouped), the rest output channels."""
  shape = w.shape
  c = int(np.prod(shape[:n_contract]))
  w2 = np.asarray(w, np.float32).reshape(c, -1)
  g = group or c
  qmax = 127 if bits == 8 else 7
  out = np.empty(w2.shape, np.float64)
  for start in range(0, c, g):
    block = w2[start:start + g]
    scale = np.abs(block).max(axis=0) / qmax
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    out[start:start + g] = np.clip(np.round(block / scale), -qmax, qmax).astype(np.float64) * scale
  return out.reshape(shape), (out - w2.astype(np.float64)).reshape(shape)


def _dequantized_float_model(model, bits, group):
  """The float model with every quantized weight replaced by the NumPy reference's dequantization."""
  graphdef, state = nnx.split(model)
  flat = []
  for path, var in nnx.to_flat_state(state):
    name = path[-1]
    w = np.asarray(var.get_value())
    if name in CONTRACT or (name == "embed" and model.cfg.tie_embeddings):
      if name == "embed":  # contracts over D: quantize embed.T
        w = _reference(w.T, 1, bits, group)[0].T
      elif model.cfg.scan_layers and path[0] == "layers":
        w = np.stack([_reference(x, CONTRACT[name], bits, group)[0] for x in w])
      else:
        w = _reference(w, CONTRACT[name], bits, group)[0]
      var = var.replace(jnp.asarray(w, jnp.float32))
    flat.append((path, var))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def test_int4_packing_round_trips():
  q = np.random.default_rng(0).integers(-8, 8, size=(3, 8, 5)).astype(np.int8)
  packed = pack_int4(q)
  assert packed.dtype == np.uint8 and packed.shape == (3, 4, 5)
  assert (np.asarray(unpack_int4(jnp.asarray(packed))) == q).all()


@pytest.mark.parametrize("mode,group", [("int8", None), ("int8", 16), ("int4", None), ("int4", 32)])
def test_weights_match_the_numpy_quantizer_and_its_error_bound(mode, group):
  model = _model(tie_embeddings=True)
  quant = quantize_model(model, mode, group)
  bits = 8 if mode == "int8" else 4
  g = (0 if mode == "int8" else 64) if group is None else group
  pairs = [(model.layers[1].attn.o, quant.layers[1].attn.o, 2), (model.layers[0].mlp.down, quant.layers[0].mlp.down, 1),
           (model.layers[0].attn.k, quant.layers[0].attn.k, 1)]
  for float_param, q_param, n in pairs:
    w = np.asarray(float_param[...])
    got = np.asarray(_dequantize(q_param[...]))
    want, err = _reference(w, n, bits, g)
    assert isinstance(q_param[...], QuantizedWeight)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert 0 < np.abs(err).max() <= np.abs(w).max() / (127 if bits == 8 else 7) / 2 * 1.0001
  emb_T = np.asarray(_dequantize(quant.embed[...].T))  # tied: the unembedding contracts over D
  np.testing.assert_allclose(emb_T, _reference(np.asarray(model.embed[...]).T, 1, bits, g)[0], rtol=1e-6, atol=1e-7)


@pytest.mark.slow(seconds=7)
@pytest.mark.parametrize("mode,kw", [("int8", dict()), ("int4", dict(tie_embeddings=True)),
                                     ("int4", dict(scan_layers=True))], ids=["int8", "int4_tied", "int4_scanned"])
def test_quantized_model_is_the_float_model_with_dequantized_weights(mode, kw):
  model = _model(**kw)
  quant = quantize_model(model, mode)
  bits, group = (8, 0) if mode == "int8" else (4, 64)
  ref = _dequantized_float_model(model, bits, group)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 16)))
  got, want, orig = (_logits(m, tokens) for m in (quant, ref, model))
  np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
  assert np.abs(got - orig).max() > 1e-4  # quantization did change something
  if not kw.get("tie_embeddings"):
    return  # the sampler's compiles are the slow part: one case goes through it
  prompt = [[1, 2, 3, 4], [5, 6, 7]]
  greedy = SamplingParams(0.0)
  assert Sampler(quant).generate(prompt, max_new_tokens=8, sampling=greedy).tokens == \
      Sampler(ref).generate(prompt, max_new_tokens=8, sampling=greedy).tokens


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_compute_dtype_cast_leaves_quantized_weights_whole(mode):
  # The train/eval step (eval's bpb) and the sampler cast weight matrices to the compute dtype
  # first: a quantized weight must pass through whole (int4's packed nibbles cast to float broke
  # its unpacking) and dequantize where it is used.
  quant = quantize_model(_model(), mode)
  graphdef, state = nnx.split(quant)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 16)))
  want = _logits(quant, tokens)
  for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 5e-2)):
    cast = cast_params(state, dtype)
    got = np.asarray(apply_jitted(graphdef, cast, tokens), np.float32)
    np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max())


def test_parameter_bytes_follow_the_format():
  model = _model()  # untied: the embedding lookup stays float32
  m = model.cfg
  full = param_bytes(model)
  d, h, k, dh, f, v, L = 64, 4, 2, 16, int(round(4.0 * 64)), 256, 2
  matrices = {"q": (d, h * dh), "k": (d, k * dh), "v": (d, k * dh), "o": (h * dh, d), "gate": (d, f), "up": (d, f),
              "down": (f, d)}
  floats = full - 4 * (L * sum(a * b for a, b in matrices.values()) + d * v)
  for mode, group, per_value in (("int8", 0, 1.0), ("int4", 64, 0.5), ("int4", 32, 0.5)):
    want = floats
    for a, b in list(matrices.values()) * L + [(d, v)]:
      want += per_value * a * b + 4 * (a // (group or a)) * b
    assert param_bytes(quantize_model(model, mode, group)) == want, (mode, group)
  assert m.tie_embeddings is False


def test_bad_requests_are_user_errors():
  model = _model()
  with pytest.raises(QuantizeError, match="--quantize=int3"):
    quantize_model(model, "int3")
  with pytest.raises(QuantizeError, match="--group-size=48: must divide the 64 input rows"):
    quantize_model(model, "int4", 48)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("qrun")
  tok = train_tokenizer(iter_embedded_documents(60_000), 512, str(root / "tok"))
  cfg = base_config()
  cfg.model.update(vocab_size=512, num_layers=1, d_model=64, num_heads=2, activation="relu2", max_seq_len=64)
  write_run(str(root / "run"), cfg, nnx.state(Transformer(cfg.model, nnx.Rngs(0)), nnx.Param), tok)
  return str(root / "run")


def test_generate_cli_quantizes(run_dir, capsys):
  assert generate.main(["--workdir", run_dir, "--prompt", "def", "--max-new-tokens", "4", "--quantize", "int4",
                        "--group-size", "32"]) == 0
  assert "quantized int4: parameters" in capsys.readouterr().err
  assert generate.main(["--workdir", run_dir, "--prompt", "def", "--quantize", "int4", "--group-size", "48"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --group-size=48") and err.count("\n") == 1
