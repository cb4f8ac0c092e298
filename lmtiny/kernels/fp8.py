"""fp8 matmuls with tensorwise dynamic scaling, the recipe nanochat trains with on H100s.

`fp8_matmul(x_MxK, w_KxN)` is `x @ w` with all three GEMMs of a linear layer run on fp8 operands,
as a `jax.custom_vjp`:
  - forward: x and w are each quantized to float8_e4m3fn (3 mantissa bits, range +-448) with one
    scale per tensor, the largest power of two <= 448 / max|t| (max|t| floored at AMAX_FLOOR, so
    an all-zero tensor quantizes to zeros instead of NaN), so the largest magnitude lands in
    [224, 448], by a saturating cast: t * scale clipped to +-448 (a float32 -> e4m3fn convert past
    the range gives NaN: e4m3fn has no infinity). The dot takes the fp8 operands themselves, with
    float32 accumulation and a result in x's dtype, then times the two inverse scales (exact:
    powers of two).
  - backward: the output gradient g is quantized to float8_e5m2 (2 mantissa bits, range +-57344:
    gradients need range more than precision) with its own scale; dx = g @ w^T and dw = x^T @ g
    reuse the fp8 x and w saved by the forward (no second quantization, and the saved
    activation is 1 byte an element), scaled the same way. dx comes back in x's dtype, dw in
    w's (from the float32 accumulator).
Scales are dynamic (computed from the tensor in the same step, no amax history), one per tensor
on one device, and one per device block of it under a mesh (below). nanochat's (torchao's
tensorwise) scale is 448 / max|t| itself; a power of two at most that gives up less than one of the
~18 binades e4m3 spans, at the bottom of its range, rounds every value to the same relative precision,
and makes scaling the GEMM's result back exact (below).

Under a mesh: each device scales its own block of every operand. `fp8_matmul_shard` is one
device's part inside `shard_map` (lmtiny.parallel.sharding.sharded_fp8_matmul decides the blocks):
x is its rows (and, in a row-parallel layer, its slice of K), w its tensor-parallel block (the
FSDP split all-gathered first, in x's dtype, and dw reduce-scattered back in w's dtype). A block
scale is exact wherever it factors out of the device's own partial product, and it always does
here: each device's GEMM sees one scale per operand, and it dequantizes its partial product
before any cross-device sum (the row-parallel output's psum, the sums of dx over `tensor` and of
dw over the batch axes). So no collective sits between an operand and its GEMM: a global amax
was a blocking scalar all-reduce (max) per operand (x, w, the gradient) per linear per
micro-step, which XLA combined into 16 all-reduces in the micro-step loop of a 2-layer model on
fsdp=8 and 25 on data=2 x tensor=4 (tests/parallel/test_fp8_sharding.py counts none). A pure
data-parallel step (lmtiny.parallel.sharding.sum_over_batch_shards) already scaled each device's
rows by their own amax, so every mesh now follows one rule. Why not delayed scaling (an amax
history from earlier steps, Transformer Engine's and MaxText's recipe)? It needs non-trainable
per-linear state carried through the model, the checkpoints, evaluation and export, its amax
observations still have to be taken per device to keep their reduction out of the loop, and it
scales with stale amaxes (a spike saturates for a step); per-block dynamic scales need none of
that and stay nanochat's tensorwise recipe on one device. The price: the rounding depends on the
mesh, so a sharded run matches one device's fp8 within fp8's rounding, not bit for bit.

Under rematerialisation the output is what a block keeps, by its checkpoint name FP8_OUT, in x's
dtype, the bytes the bf16 path keeps.

Where XLA fuses it (XLA:GPU, Hopper or Ada): a dot of fp8 operands with a bf16 (or float32)
result times a scalar becomes one fp8 GEMM that takes the scale and writes that dtype, through
cuBLASLt (custom call `__cublas$lt$matmul$f8`, the fp8 operands transposed into the layout its
kernels take) or through a Triton GEMM fusion on the fp8 operands, whichever the autotuner picks.
The operands must reach the dot as fp8: a dot of operands dequantized in bf16 (convert(fp8) times
the scale, this module's second form) kept its fp8 rounding only where cuBLASLt took it. Where
Triton did, XLA:GPU's simplify-fp-conversions (excess precision is allowed by default) folded the
f32 -> fp8 -> bf16 round trip into one convert, and the step ran bf16 GEMMs on unrounded
operands: compiled for an H100 (jax 0.11.2), d12_2026's fp8 step held no fp8 tensor and peaked at
23.40 GiB against bf16's 17.31 (an H100 measured 24.16 and 17.56, and 0.90x bf16's tokens/s).
Given the fp8 tensors it peaks at 18.00 GiB, its 2-layer cut holds 80 Triton dots on fp8
operands, and with Triton GEMMs off 12 layers hold 420 cuBLASLt fp8 calls. The first form, a
float32 result times the scales, had left a separate convert to bf16 of every output (1,152
converts, 171 ms of d12_2026's 1.78 s step on an H100). The precision of the dot chooses its
accumulation: DEFAULT (the forward here) lets cuBLASLt accumulate fast in its lower-precision
mode, HIGHEST (the two backward GEMMs) keeps a split float32 accumulator, the same choice as
nanochat. cuBLASLt needs one e4m3 operand at least: the backward's e5m2 x e4m3 pairs qualify.
The quantizations themselves (an abs-max reduction, a multiply, a clamp, a convert) are ordinary
XLA fusions around the GEMM, local to each device under a mesh.

On CPU: XLA:CPU widens the fp8 operands and runs the dot in float32. Every product of two fp8
values is exact in float32, so the numerics are those of the fp8 GEMM up to the float32 summation
order, and they can be checked there. XLA:TPU compiles the same step for v5e, v5p and v6e.

`fp8_eligible(k, n)` is nanochat's rule for which linear layers run in fp8: both dimensions
divisible by 16 (the fp8 GEMM's alignment) and the smaller one at least 128 (below that the
quantization costs more than the faster GEMM saves). The loss's lm_head GEMMs follow this recipe
in lmtiny.kernels.cross_entropy (model.fp8_lm_head, on with model.matmul_dtype=fp8 as in nanochat).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array

FORWARD_DTYPE = jnp.float8_e4m3fn   # activations and weights: precision
GRADIENT_DTYPE = jnp.float8_e5m2    # output gradients: range
AMAX_FLOOR = 1e-12                  # as nanochat: keeps the scale finite and the inverse scales' product > 0
FAST_ACCUMULATION = jax.lax.Precision.DEFAULT
FULL_ACCUMULATION = jax.lax.Precision.HIGHEST
FP8_OUT = "fp8_matmul_out"          # the checkpoint name of fp8_matmul's output
AMAX_SCOPE = "fp8_amax"             # the named scope of the abs-max reductions (op names in HLO)


def fp8_eligible(k: int, n: int) -> bool:
  """Whether a [k, n] weight's GEMMs run in fp8: both dims divisible by 16, the smaller >= 128."""
  return k % 16 == 0 and n % 16 == 0 and min(k, n) >= 128


def quantize(t: Array, fp8_dtype) -> tuple[Array, Array]:
  """(t in fp8_dtype scaled by the largest power of two that keeps its largest magnitude within the
  format's max, the float32 inverse scale that turns it back): tensorwise dynamic scaling with a
  saturating cast."""
  fp8_max = float(jnp.finfo(fp8_dtype).max)
  with jax.named_scope(AMAX_SCOPE):
    # In t's own dtype: a max of magnitudes is exact in any float format, and the reduction then
    # reads t (2 bytes an element in bf16), not a float32 copy of it (4).
    amax = jnp.maximum(jnp.max(jnp.abs(t)).astype(jnp.float32), jnp.float32(AMAX_FLOOR))
  # The largest power of two <= fp8_max / amax: exact in bf16, so the GEMM's result scales back exactly.
  _, exponent = jnp.frexp(jnp.float32(fp8_max) / amax)
  scale = jnp.ldexp(jnp.float32(1.0), exponent - 1)
  t_fp8 = jnp.clip(t.astype(jnp.float32) * scale, -fp8_max, fp8_max).astype(fp8_dtype)
  return t_fp8, 1.0 / scale


def _scaled_dot(a_fp8, a_inv, b_fp8, b_inv, contracting, precision, out_dtype):
  """dot(a, b) of the fp8 operands themselves, float32 accumulation, the result in out_dtype and then
  times the two inverse scales (exact: a power of two): XLA:GPU makes it one fp8 GEMM that takes the
  scales and writes out_dtype, through cuBLASLt or Triton (module doc)."""
  out = jax.lax.dot_general(a_fp8, b_fp8, (contracting, ((), ())), precision=precision,
                            preferred_element_type=out_dtype)
  return out * (a_inv * b_inv).astype(out_dtype)


def forward_gemm(x_MxK: Array, w_q: tuple[Array, Array], out_dtype) -> tuple[Array, tuple[Array, Array]]:
  """x @ w, x quantized to e4m3 by its own amax, w given quantized (`quantize(w, FORWARD_DTYPE)`):
  (x @ w in out_dtype, x's (fp8 values, inverse scale) for the backward)."""
  x_q = quantize(x_MxK, FORWARD_DTYPE)
  return _scaled_dot(*x_q, *w_q, ((1,), (0,)), FAST_ACCUMULATION, out_dtype), x_q


def gradient_gemms(g_MxN: Array, x_q: tuple[Array, Array], w_q: tuple[Array, Array], dx_dtype,
                   dw_dtype) -> tuple[Array, Array]:
  """(dx, dw) of x @ w from the output's cotangent g (quantized to e5m2 by its own amax) and the
  forward's quantized operands, both GEMMs with the full float32 accumulator."""
  g_q = quantize(g_MxN, GRADIENT_DTYPE)
  dx_MxK = _scaled_dot(*g_q, *w_q, ((1,), (1,)), FULL_ACCUMULATION, dx_dtype)
  dw_KxN = _scaled_dot(*x_q, *g_q, ((0,), (0,)), FULL_ACCUMULATION, dw_dtype)
  return dx_MxK, dw_KxN


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _fp8_matmul(x_MxK, w_KxN, w_dtype, sum_axes, gather_k_axes, gather_n_axes):
  return _forward(x_MxK, w_KxN, w_dtype, sum_axes, gather_k_axes, gather_n_axes)[0]


def _forward(x_MxK, w_KxN, w_dtype, sum_axes, gather_k_axes, gather_n_axes):
  del w_dtype
  if gather_k_axes or gather_n_axes:  # this device's FSDP slice: gathered whole, in x's dtype
    w_KxN = w_KxN.astype(x_MxK.dtype)
    for axes, dim in ((gather_k_axes, 0), (gather_n_axes, 1)):
      if axes:
        w_KxN = jax.lax.all_gather(w_KxN, axes, axis=dim, tiled=True)
  w_q = quantize(w_KxN, FORWARD_DTYPE)
  out_MxN, x_q = forward_gemm(x_MxK, w_q, x_MxK.dtype)
  if sum_axes:  # K is split over these axes: each device's dequantized partial product, summed
    out_MxN = jax.lax.psum(out_MxN, sum_axes)
  return out_MxN, (x_q, w_q)


def _backward(w_dtype, sum_axes, gather_k_axes, gather_n_axes, residuals, g_MxN):
  x_q, w_q = residuals
  if sum_axes:  # shard_map(check_vma=False) hands each device 1/n of a replicated cotangent
    g_MxN = g_MxN * jax.lax.psum(1, sum_axes)
  dx_MxK, dw_KxN = gradient_gemms(g_MxN, x_q, w_q, g_MxN.dtype, w_dtype)
  for axes, dim in ((gather_k_axes, 0), (gather_n_axes, 1)):
    if axes:  # back to this device's slice, summed over the devices that gathered it
      dw_KxN = jax.lax.psum_scatter(dw_KxN, axes, scatter_dimension=dim, tiled=True)
  return dx_MxK, dw_KxN


_fp8_matmul.defvjp(_forward, _backward)


def fp8_matmul(x_MxK: Array, w_KxN: Array) -> Array:
  """x [M, K] @ w [K, N] -> [M, N] in x's dtype, the three GEMMs on fp8 operands (module doc)."""
  if x_MxK.ndim != 2 or w_KxN.ndim != 2 or x_MxK.shape[1] != w_KxN.shape[0]:
    raise ValueError(f"fp8_matmul: x [M, K] @ w [K, N] expected, got {x_MxK.shape} @ {w_KxN.shape}")
  return checkpoint_name(_fp8_matmul(x_MxK, w_KxN, np.dtype(w_KxN.dtype), (), (), ()), FP8_OUT)


def fp8_matmul_shard(x_MxK: Array, w_KxN: Array, *, sum_axes: tuple = (), gather_k_axes: tuple = (),
                     gather_n_axes: tuple = ()) -> Array:
  """One device's part of a sharded `fp8_matmul`, inside `shard_map(check_vma=False)` (module doc,
  "Under a mesh"): x is this device's [M, K] block, w its [K, N] block; the weight is all-gathered
  over `gather_k_axes` / `gather_n_axes` (its FSDP split) first, K is split over `sum_axes`
  (the output is psummed over them). Each operand is scaled by its own block's amax."""
  return _fp8_matmul(x_MxK, w_KxN, np.dtype(w_KxN.dtype), tuple(sum_axes), tuple(gather_k_axes),
                     tuple(gather_n_axes))
