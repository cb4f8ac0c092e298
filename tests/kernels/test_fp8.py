"""lmtiny.kernels.fp8 against an independent NumPy reference: quantization by ml_dtypes' fp8 types,
float64 GEMMs on the dequantized operands, forward and both backward GEMMs; its distance from the
float32 matmul; zeros, tiny and huge magnitudes; jit and bfloat16; the StableHLO handed to an
H100 (every dot on the fp8 tensors themselves, the form XLA:GPU runs as an fp8 GEMM).

XLA:CPU runs those dots in float32 on fp8 values (exact products) and scales by powers of two,
so the numerics here are those of the GPU's fp8 GEMM up to float32 summation order."""
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from lm_fixtures import dot_types
from lmtiny.kernels import fp8

M, K, N = 48, 256, 160
E4M3, E5M2 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((M, K)).astype(np.float32)
  w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
  cot = rng.standard_normal((M, N)).astype(np.float32)
  return x, w, cot


def _ref_quantize(t, fp8_dtype):
  """(fp8 tensor, float32 inverse scale), the recipe in NumPy and ml_dtypes: the scale is the
  largest power of two at most the format's max over the largest magnitude."""
  fp8_max = np.float32(ml_dtypes.finfo(fp8_dtype).max)
  t = np.asarray(t, np.float32)
  ratio = fp8_max / np.maximum(np.abs(t).max(), np.float32(1e-12))
  scale = np.float32(2.0 ** np.floor(np.log2(np.float64(ratio))))
  return np.clip(t * scale, -fp8_max, fp8_max).astype(fp8_dtype), np.float32(1) / scale


def _ref_gemm(a_fp8, a_inv, b_fp8, b_inv):
  return (a_fp8.astype(np.float64) @ b_fp8.astype(np.float64)) * (np.float64(a_inv) * np.float64(b_inv))


def _reference(x, w, cot):
  """(out, dx, dw) of the fp8 recipe in float64 given the output cotangent."""
  xq, x_inv = _ref_quantize(x, E4M3)
  wq, w_inv = _ref_quantize(w, E4M3)
  gq, g_inv = _ref_quantize(cot, E5M2)
  return _ref_gemm(xq, x_inv, wq, w_inv), _ref_gemm(gq, g_inv, wq.T, w_inv), _ref_gemm(xq.T, x_inv, gq, g_inv)


def _fp8_with_grads(x, w, cot, fn=fp8.fp8_matmul):
  """(out, dx, dw) of fn, the gradients of sum(out * cot) (so cot is the output cotangent)."""
  out, vjp = jax.vjp(fn, jnp.asarray(x), jnp.asarray(w))
  return (out, *vjp(jnp.asarray(cot, out.dtype)))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _assert_close(actual, expected, rtol):
  """Elementwise within rtol of the largest magnitude (a GEMM's rounding scales with it)."""
  expected = np.asarray(expected, np.float64)
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2])
def test_quantize_matches_ml_dtypes_bit_for_bit(fp8_dtype):
  x, _, _ = _inputs()
  q, inv = fp8.quantize(jnp.asarray(x), fp8_dtype)
  q_ref, inv_ref = _ref_quantize(x, fp8_dtype)
  assert q.dtype == fp8_dtype and inv.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(q).view(np.uint8), q_ref.view(np.uint8))
  assert np.float32(inv) == inv_ref
  top = ml_dtypes.finfo(fp8_dtype).max  # the top binade is used
  assert top / 2 <= np.abs(np.asarray(q, np.float32)).max() <= top


def test_forward_and_gradients_match_the_numpy_reference():
  x, w, cot = _inputs()
  out, dx, dw = _fp8_with_grads(x, w, cot)
  ref_out, ref_dx, ref_dw = _reference(x, w, cot)
  assert (out.dtype, dx.dtype, dw.dtype) == (jnp.float32,) * 3
  for actual, expected in ((out, ref_out), (dx, ref_dx), (dw, ref_dw)):
    _assert_close(actual, expected, 2e-6)  # float32 summation of exact fp8 products


def test_fp8_is_a_few_percent_from_the_float32_matmul_and_not_equal_to_it():
  """Measured here: forward 3.7% (e4m3 x e4m3), dx 5.7% and dw 5.9% (e5m2 gradient) relative
  Frobenius error against the float64 matmul of the unquantized operands."""
  x, w, cot = _inputs()
  out, dx, dw = _fp8_with_grads(x, w, cot)
  x64, w64, c64 = (a.astype(np.float64) for a in (x, w, cot))
  errors = _rel(out, x64 @ w64), _rel(dx, c64 @ w64.T), _rel(dw, x64.T @ c64)
  assert 0.02 < errors[0] < 0.05, errors
  assert 0.03 < errors[1] < 0.08 and 0.03 < errors[2] < 0.08, errors


@pytest.mark.parametrize("which", ["x", "w", "cot"])
def test_an_all_zero_operand_gives_zeros_and_finite_gradients(which):
  x, w, cot = _inputs()
  x, w, cot = (np.zeros_like(a) if name == which else a for name, a in (("x", x), ("w", w), ("cot", cot)))
  out, dx, dw = _fp8_with_grads(x, w, cot)
  for actual, expected in zip((out, dx, dw), _reference(x, w, cot)):
    assert np.isfinite(np.asarray(actual)).all()
    _assert_close(actual, expected, 2e-6)
  if which == "x":
    assert not np.asarray(out).any() and not np.asarray(dw).any()


@pytest.mark.parametrize("factor", [2.0 ** -40, 2.0 ** 40])
def test_scaling_an_operand_by_a_power_of_two_scales_the_result_exactly(factor):
  """Tensorwise scaling makes the recipe blind to an operand's magnitude: the same fp8 values,
  an inverse scale `factor` times larger. 2^-40 x (~1e-12) and 2^40 x (~1e12) included."""
  x, w, cot = _inputs()
  base = _fp8_with_grads(x, w, cot)
  scaled = _fp8_with_grads(x * np.float32(factor), w, cot)
  for a, b, f in zip(scaled, base, (factor, 1.0, factor)):
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b) * np.float32(f))


def test_magnitudes_at_the_edges_stay_finite_and_follow_the_reference():
  """Huge activations (1e30), weights near the float32 minimum normal, and a tensor whose largest
  value is under the amax floor (1e-20: nanochat's 1e-12 floor leaves it 4.5e-6 at most after
  scaling, under e4m3's smallest subnormal, so it quantizes to zero rather than to NaN)."""
  x, w, cot = _inputs()
  for x_, w_ in ((x * np.float32(1e30), w * np.float32(1e-30)), (x, w * np.float32(1e-37)), (x * np.float32(1e-20), w)):
    out, dx, dw = _fp8_with_grads(x_, w_, cot)
    for actual, expected in zip((out, dx, dw), _reference(x_, w_, cot)):
      assert np.isfinite(np.asarray(actual)).all()
      _assert_close(actual, expected, 2e-6)
  assert not np.asarray(_fp8_with_grads(x * np.float32(1e-20), w, cot)[0]).any()


@pytest.mark.slow(seconds=3)  # measured on 2 cores: out of the inner loop
def test_the_largest_magnitude_lands_in_the_formats_top_binade_and_dequantizes_exactly():
  """A power-of-two scale puts max|t| in [max / 2, max] of the format (exact powers of two and
  their neighbours included), so it never rounds past the format's max, and every fp8 value times
  the inverse scale is exact in bf16 (so scaling the GEMM's bf16 result rounds nothing more)."""
  amaxes = np.concatenate([np.random.default_rng(1).uniform(1e-3, 1e3, 2000),
                           [0.5, 1.0, 2.0 ** 20, 448.0, 448.0 * (1 + 2 ** -23), 448.0 * (1 - 2 ** -24)]])
  for fp8_dtype in (fp8.FORWARD_DTYPE, fp8.GRADIENT_DTYPE):
    top = float(jnp.finfo(fp8_dtype).max)
    for amax in amaxes.astype(np.float32):
      q, inv = fp8.quantize(jnp.asarray([[amax, -amax / 3]], jnp.float32), fp8_dtype)
      largest = float(np.asarray(q, np.float32)[0, 0])
      assert top / 2 <= largest <= top and np.log2(float(inv)).is_integer(), (fp8_dtype, amax, largest)
      dequantized = q.astype(jnp.bfloat16) * inv.astype(jnp.bfloat16)
      np.testing.assert_array_equal(np.asarray(dequantized, np.float64),
                                    np.asarray(q, np.float64) * np.float64(inv))


def test_jit_gives_the_eager_result():
  x, w, cot = _inputs()
  eager = _fp8_with_grads(x, w, cot)
  jitted = jax.jit(lambda x, w, c: _fp8_with_grads(x, w, c))(x, w, cot)
  for a, b in zip(jitted, eager):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6 * np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("w_dtype", [jnp.bfloat16, jnp.float32])
def test_bfloat16_inputs_give_bfloat16_outputs_within_bf16_rounding_of_the_reference(w_dtype):
  x, w, cot = _inputs()
  xb, wb, cb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, w_dtype), jnp.asarray(cot, jnp.bfloat16)
  out, dx, dw = jax.jit(lambda x, w, c: _fp8_with_grads(x, w, c))(xb, wb, cb)
  assert (out.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, w_dtype)
  as32 = lambda a: np.asarray(a, np.float32)  # noqa: E731  (the reference quantizes what the kernel saw)
  ref_out, ref_dx, ref_dw = _reference(as32(xb), as32(wb), as32(cb))
  _assert_close(out, ref_out, 2 ** -8)
  _assert_close(dx, ref_dx, 2 ** -8)
  _assert_close(dw, ref_dw, 2 ** -8 if w_dtype == jnp.bfloat16 else 2e-6)


def test_lowered_for_cuda_every_gemm_takes_the_fp8_tensors_themselves():
  """What an H100 is handed (StableHLO): the forward dot on e4m3 x e4m3 with fast accumulation
  (DEFAULT), dx on e5m2 x e4m3 and dw on e4m3 x e5m2 with full accumulation (HIGHEST), each
  operand the fp8 tensor itself (no convert between the quantization and the dot) and each result
  in its final dtype (x's for out and dx, the float32 weight's for dw), scaled after the dot.
  The form before it, operands dequantized in bf16 (convert(fp8) * scale), lost its fp8 rounding
  on XLA:GPU wherever Triton took the GEMM: its simplify-fp-conversions pass folds the
  f32 -> fp8 -> bf16 round trip into one f32 -> bf16 convert (excess precision is allowed), so
  d12_2026's "fp8" step compiled for an H100 (jax 0.11.2) held no fp8 tensor, ran bf16 GEMMs
  and peaked at 23.40 GiB against bf16's 17.31 (an H100 measured 24.16 against 17.56). Given the
  fp8 tensors, Triton and cuBLASLt both run fp8 GEMMs (80 Triton dots on fp8 operands in 2 layers;
  420 cuBLASLt fp8 calls in 12 with Triton off) and the step peaks at 18.00 GiB."""
  x, w, cot = _inputs()

  def loss(x, w, c):
    return jnp.sum(fp8.fp8_matmul(x, w).astype(jnp.float32) * c)

  args = (jnp.asarray(x, jnp.bfloat16), jnp.asarray(w), jnp.asarray(cot))
  text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert sorted(dot_types(text)) == sorted([
      (f"{M}x{K}xf8E4M3FN", f"{K}x{N}xf8E4M3FN", f"{M}x{N}xbf16", "DEFAULT"),
      (f"{M}x{N}xf8E5M2", f"{K}x{N}xf8E4M3FN", f"{M}x{K}xbf16", "HIGHEST"),
      (f"{M}x{K}xf8E4M3FN", f"{M}x{N}xf8E5M2", f"{K}x{N}xf32", "HIGHEST")])
  assert text.count("stablehlo.dot_general") == 3
  assert not re.search(r"stablehlo\.convert %\w+ : \(tensor<[\dx]+xf8\w+>\)", text)  # no fp8 is widened


def test_each_amax_reads_its_operand_in_the_operands_own_dtype():
  """The abs-max of a bf16 activation or gradient reduces the bf16 tensor (exact: a max of
  magnitudes rounds nothing), not a float32 copy of it, which doubled the bytes those reductions
  read (d12_2026 in fp8: 2.0 MB per token in reductions before, 1.5 MB after; `lmtiny.bench
  --lower-for cuda`). The float32 master weight's is float32."""
  def loss(x, w, c):
    return jnp.sum(fp8.fp8_matmul(x, w).astype(jnp.float32) * c)

  args = (jnp.zeros((M, K), jnp.bfloat16), jnp.zeros((K, N), jnp.float32), jnp.zeros((M, N), jnp.bfloat16))
  text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  maxima = re.findall(r"stablehlo\.reduce\(.*applies stablehlo\.maximum .*: \(tensor<([^>]+)>", text)
  assert sorted(maxima) == sorted([f"{M}x{K}xbf16", f"{K}x{N}xf32", f"{M}x{N}xbf16"])


def test_matmul_rejects_operands_that_are_not_one_2d_gemm():
  with pytest.raises(ValueError, match=r"fp8_matmul: x \[M, K\] @ w \[K, N\] expected"):
    fp8.fp8_matmul(jnp.zeros((2, 3, 4)), jnp.zeros((4, 5)))
  with pytest.raises(ValueError, match="fp8_matmul"):
    fp8.fp8_matmul(jnp.zeros((2, 4)), jnp.zeros((3, 5)))


@pytest.mark.parametrize("k, n, eligible", [
    (768, 3072, True), (768, 768, True), (128, 128, True), (1536, 50304, True),   # d12 MLP/attention, lm_head
    (112, 768, False), (768, 64, False),                                          # under 128
    (776, 768, False), (768, 136 + 4, False), (1000, 1000, False)])               # not a multiple of 16
def test_fp8_eligible_is_nanochats_filter(k, n, eligible):
  assert fp8.fp8_eligible(k, n) is eligible
