"""Memory-efficient cross-entropy straight from hidden states: never a [tokens, V] float32 array.

`linear_cross_entropy(x_NxD, w_DxV, targets_N)` is `logsumexp(x @ w) - (x @ w)[target]` per
token, computed over chunks of `chunk` tokens with a custom VJP:
  - forward: for each chunk, logits_CxV = x_c @ w in the compute dtype with float32
    accumulation, optional softcap, then the row max (under a softcap, the cap itself), sum of
    exps and target logit; only the per-token logsumexp (N floats) is kept for the backward;
  - backward: each chunk's logits are recomputed, dlogits = dce * (softmax - onehot)
    + dlse * softmax (times the softcap's derivative), cast to the compute dtype, and
    dx_c = dlogits @ w^T, dw += x_c^T @ dlogits (float32 accumulator), so the two backward GEMMs
    run in the compute dtype (bf16 on accelerators) instead of float32.
Peak memory is one chunk of logits (chunk x V float32) instead of all of them, twice. When the
whole input is one chunk, the forward keeps its logits for the backward instead of recomputing
them (same memory bound, one GEMM fewer): small CPU runs lose nothing.

The function returns (cross_entropy_N, logsumexp_N), both float32; z-loss (PaLM: z * lse^2)
is the caller's `z * lse**2`, and differentiates through the lse output.

Vocab parallelism: with `axis_name` the function runs inside `shard_map` on one vocab slice
(`w` holds columns vocab_start.. of the full matrix, `vocab_start` = slice index x slice width):
max, sum of exps and target logit are finished with pmax/psum over that axis, and the backward
is the exact transpose of that forward under `shard_map(check_vma=False)` (how lmtiny.parallel.sharding
runs it): the cotangents of the psummed outputs are psummed, and each device returns its partial
dx (its vocab slice's share) and dw (its rows' share), which shard_map's transpose sums over the
mesh axes the input is not split on (dx over the vocab axis, dw over the batch axes).
Which axes and specs to use is lmtiny.parallel.sharding's business; this module knows no mesh.

The weight comes in as stored (float32 under mixed precision) and the GEMMs run on a copy in x's
dtype, made inside the custom VJP so that dw leaves in float32: a bf16 cotangent of a cast would
round every device's partial dw to bf16 and be reduced across devices in bf16 (per-token
gradients of ~1e-4 summed over a million tokens lose most of their bits that way). With
`gather_axes` the weight is this device's FSDP slice of rows: the forward all-gathers the compute
copy (half the bytes of gathering float32) and the backward reduce-scatters dw in float32.

`fp8=True` (model.fp8_lm_head, nanochat's --fp8 with its lm_head) runs the XLA kernels' GEMMs on
fp8 operands as lmtiny.kernels.fp8 does: the weight (this device's vocab slice, after any gather)
quantized to e4m3 once, each chunk's x to e4m3 and its dlogits to e5m2 by the chunk's own amax
(tensorwise when the tokens are one chunk; finer otherwise), each GEMM rescaled by its operands'
inverse scales before anything sums it across chunks or devices. The Pallas kernels have no fp8 path.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lmtiny.kernels import fp8 as fp8_lib
from lmtiny.kernels import pallas_cross_entropy

Array = jax.Array

# How the fused loss runs: "xla" (chunks, logits through HBM), "mosaic" (lmtiny.kernels.
# pallas_cross_entropy on TPU, logits on chip) or "interpret" (the same kernels interpreted on CPU).
FUSED_IMPLS = ("xla", "mosaic", "interpret")


def _chunk_logits(x_CxD, w_DxV, softcap: float):
  """Logits [C, V] float32 of one chunk; `w_DxV` is the compute weight (`_compute_weight`): an
  array, or (fp8 values, inverse scale), whose GEMM quantizes the chunk by its own amax."""
  if isinstance(w_DxV, tuple):
    logits_CxV, _ = fp8_lib.forward_gemm(x_CxD, w_DxV, jnp.float32)
  else:
    logits_CxV = jnp.dot(x_CxD, w_DxV, preferred_element_type=jnp.float32)
  if softcap > 0:
    logits_CxV = softcap * jnp.tanh(logits_CxV / softcap)
  return logits_CxV


def _reduce(fn, x, axis_name):
  return x if axis_name is None else fn(x, axis_name)


# Softcaps up to this bound the logits well enough to stand in for their row max: exp(l - c) for
# l in [-c, c] stays a normal float32 (>= e^-80), so every term keeps float32's relative precision.
MAX_BOUNDING_SOFTCAP = 40.0


def _chunk_stats(logits_CxV, targets_C, vocab_start, axis_name, softcap: float = 0.0):
  """(logsumexp_C, target_logit_C) of one chunk's (local slice of) logits. Softcapped logits lie
  in [-c, c], so c shifts the exponentials in place of the row max: one pass over the logits
  instead of two (and, over a vocab axis, no pmax)."""
  v_local = logits_CxV.shape[-1]
  if 0 < softcap <= MAX_BOUNDING_SOFTCAP:
    top_C = jnp.full(logits_CxV.shape[:1], softcap, jnp.float32)
  else:
    top_C = _reduce(jax.lax.pmax, jnp.max(logits_CxV, axis=-1), axis_name)
  sum_exp_C = _reduce(jax.lax.psum, jnp.sum(jnp.exp(logits_CxV - top_C[:, None]), axis=-1), axis_name)
  local_C = targets_C - vocab_start
  in_slice_C = (local_C >= 0) & (local_C < v_local)
  picked_C = jnp.take_along_axis(logits_CxV, jnp.clip(local_C, 0, v_local - 1)[:, None], axis=-1)[:, 0]
  target_C = _reduce(jax.lax.psum, jnp.where(in_slice_C, picked_C, 0.0), axis_name)
  return jnp.log(sum_exp_C) + top_C, target_C


def _compute_weight(w_DxV, dtype, gather_axes, fp8: bool = False):
  """The weight as the GEMMs use it: cast to the compute dtype, then whole along D (gathered over
  `gather_axes` when each device holds a slice of the rows); with `fp8`, quantized to e4m3 by its
  (vocab slice's) amax, as (values, inverse scale)."""
  w_DxV = w_DxV.astype(dtype)
  w_DxV = w_DxV if gather_axes is None else jax.lax.all_gather(w_DxV, gather_axes, axis=0, tiled=True)
  return fp8_lib.quantize(w_DxV, fp8_lib.FORWARD_DTYPE) if fp8 else w_DxV


def _weight_shape(w_DxV):
  return (w_DxV[0] if isinstance(w_DxV, tuple) else w_DxV).shape


def _weight_grad(dw_DxV, like_0, gather_axes):
  """The float32 dw [D, V] of this device's tokens as the gradient of its weight input: summed
  over `gather_axes` onto its slice of rows in float32, then cast to the stored dtype (`like_0`,
  an empty array of it)."""
  if gather_axes is not None:
    dw_DxV = jax.lax.psum_scatter(dw_DxV, gather_axes, scatter_dimension=0, tiled=True)
  return dw_DxV.astype(like_0.dtype)


def _chunked(x_NxD, targets_N, chunk: int):
  """[N, D] -> [n, C, D] (zero-padded to a whole number of chunks) and targets alike."""
  n = x_NxD.shape[0]
  chunk = max(1, min(chunk, n))
  num = -(-n // chunk)
  pad = num * chunk - n
  if pad:
    x_NxD = jnp.pad(x_NxD, ((0, pad), (0, 0)))
    targets_N = jnp.pad(targets_N, (0, pad))
  return x_NxD.reshape(num, chunk, -1), targets_N.reshape(num, chunk), pad


def _forward(x_NxD, w_DxV, targets_N, vocab_start, softcap, chunk, axis_name):
  x_nxCxD, t_nxC, _ = _chunked(x_NxD, targets_N, chunk)
  if x_nxCxD.shape[0] == 1:
    logits_CxV = _chunk_logits(x_nxCxD[0], w_DxV, softcap)
    lse_C, target_C = _chunk_stats(logits_CxV, t_nxC[0], vocab_start, axis_name, softcap)
    lse_nxC, target_nxC, saved = lse_C[None], target_C[None], logits_CxV
  else:
    def body(_, xs):
      x_CxD, t_C = xs
      return None, _chunk_stats(_chunk_logits(x_CxD, w_DxV, softcap), t_C, vocab_start, axis_name, softcap)

    _, (lse_nxC, target_nxC) = jax.lax.scan(body, None, (x_nxCxD, t_nxC))
    saved = None
  n = x_NxD.shape[0]
  lse_N = lse_nxC.reshape(-1)[:n]
  return lse_N - target_nxC.reshape(-1)[:n], lse_N, saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def linear_cross_entropy(x_NxD: Array, w_DxV: Array, targets_N: Array, vocab_start: Array,
                         softcap: float = 0.0, chunk: int = 4096, axis_name: str | None = None,
                         gather_axes=None, fp8: bool = False):
  """(cross_entropy_N, logsumexp_N) in float32 of logits x @ w (see the module docstring)."""
  w_DxV = _compute_weight(w_DxV, x_NxD.dtype, gather_axes, fp8)
  ce_N, lse_N, _ = _forward(x_NxD, w_DxV, targets_N, vocab_start, softcap, chunk, axis_name)
  return ce_N, lse_N


def _fwd(x_NxD, w_DxV, targets_N, vocab_start, softcap, chunk, axis_name, gather_axes, fp8):
  like_0 = jnp.zeros((0,), w_DxV.dtype)
  w_DxV = _compute_weight(w_DxV, x_NxD.dtype, gather_axes, fp8)
  ce_N, lse_N, saved = _forward(x_NxD, w_DxV, targets_N, vocab_start, softcap, chunk, axis_name)
  return (ce_N, lse_N), (x_NxD, w_DxV, like_0, targets_N, vocab_start, lse_N, saved)


def _dlogits(logits_CxV, targets_C, vocab_start, dce_C, dlse_C, lse_C, softcap: float, dtype):
  """d(objective)/d(logits) of one chunk, given d/dce and d/dlse per token, in `dtype`:
  (dce + dlse) * softmax - dce * onehot (times the softcap's derivative)."""
  probs_CxV = jnp.exp(logits_CxV - lse_C[:, None])
  onehot_CxV = (targets_C - vocab_start)[:, None] == jnp.arange(logits_CxV.shape[-1])[None, :]
  dlogits_CxV = (dce_C + dlse_C)[:, None] * probs_CxV - jnp.where(onehot_CxV, dce_C[:, None], 0.0)
  if softcap > 0:  # d(c tanh(l / c)) / dl = 1 - tanh^2, from the capped logits themselves: written
    # as (capped / c)^2, XLA simplifies it to tanh(l / c)^2 and writes tanh beside the capped logits
    dlogits_CxV = dlogits_CxV * (1.0 - jnp.square(logits_CxV) * (1.0 / softcap**2))
  return dlogits_CxV.astype(dtype)


def _dlogits_dtype(w_DxV):
  """dlogits in the compute dtype, or float32 for an fp8 GEMM (quantized from it, not from bf16)."""
  return jnp.float32 if isinstance(w_DxV, tuple) else w_DxV.dtype


def _input_grads(x_CxD, w_DxV, dlogits_CxV):
  """(dx [C, D] in x's dtype, dw [D, V] float32) of one chunk: the two backward GEMMs, in the
  compute dtype with float32 accumulation; for an fp8 weight, on fp8 operands (dlogits in e5m2 by
  the chunk's amax, x requantized as the forward did)."""
  if isinstance(w_DxV, tuple):
    x_q = fp8_lib.quantize(x_CxD, fp8_lib.FORWARD_DTYPE)
    return fp8_lib.gradient_gemms(dlogits_CxV, x_q, w_DxV, x_CxD.dtype, jnp.float32)
  dx_CxD = jnp.dot(dlogits_CxV, w_DxV.T, preferred_element_type=jnp.float32)
  dw_DxV = jnp.dot(x_CxD.T.astype(w_DxV.dtype), dlogits_CxV, preferred_element_type=jnp.float32)
  return dx_CxD.astype(x_CxD.dtype), dw_DxV


def _bwd(softcap, chunk, axis_name, gather_axes, fp8, residuals, cotangents):
  del fp8  # the saved weight says it
  x_NxD, w_DxV, like_0, targets_N, vocab_start, lse_N, saved = residuals
  # The forward psums ce and lse over the vocab axis; its transpose psums their cotangents.
  dce_N, dlse_N = (_reduce(jax.lax.psum, ct.astype(jnp.float32), axis_name) for ct in cotangents)
  n = x_NxD.shape[0]
  x_nxCxD, t_nxC, pad = _chunked(x_NxD, targets_N, chunk)
  per_token = jnp.stack([dce_N, dlse_N, lse_N], axis=-1)
  per_token_nxCx3 = jnp.pad(per_token, ((0, pad), (0, 0))).reshape(*t_nxC.shape, 3)

  def chunk_grads(x_CxD, t_C, g_Cx3, logits_CxV):
    if logits_CxV is None:
      logits_CxV = _chunk_logits(x_CxD, w_DxV, softcap)
    dlogits_CxV = _dlogits(logits_CxV, t_C, vocab_start, g_Cx3[:, 0], g_Cx3[:, 1], g_Cx3[:, 2], softcap,
                           _dlogits_dtype(w_DxV))
    return _input_grads(x_CxD, w_DxV, dlogits_CxV)

  if saved is not None:
    dx_CxD, dw_DxV = chunk_grads(x_nxCxD[0], t_nxC[0], per_token_nxCx3[0], saved)
    dx_nxCxD = dx_CxD[None]
  else:
    def body(dw_acc, xs):
      dx_CxD, dw_DxV = chunk_grads(*xs, None)
      return dw_acc + dw_DxV, dx_CxD

    dw_DxV, dx_nxCxD = jax.lax.scan(body, jnp.zeros(_weight_shape(w_DxV), jnp.float32),
                                    (x_nxCxD, t_nxC, per_token_nxCx3))
  dx_NxD = dx_nxCxD.reshape(-1, x_NxD.shape[1])[:n]
  return dx_NxD, _weight_grad(dw_DxV, like_0, gather_axes), None, None


linear_cross_entropy.defvjp(_fwd, _bwd)


# ---------------------------------------------------------------------------------------------
# Fused: the gradient formed in the forward pass (three GEMMs instead of four).


def _fused_forward(x_NxD, w_DxV, targets_N, ce_weights_N, z_weights_N, vocab_start, softcap, chunk, axis_name):
  """One pass over the chunks: logits, their statistics and, since the per-token weights of the
  objective are inputs, d(objective)/d(logits) and from it dx and dw, while the chunk's logits
  are at hand. Returns (ce_N, lse_N, dx_NxD, dw_DxV float32)."""
  n = x_NxD.shape[0]
  x_nxCxD, t_nxC, pad = _chunked(x_NxD, targets_N, chunk)
  weights_nxCx2 = jnp.pad(jnp.stack([ce_weights_N, z_weights_N], -1).astype(jnp.float32),
                          ((0, pad), (0, 0))).reshape(*t_nxC.shape, 2)

  def body(dw_acc, xs):
    x_CxD, t_C, w_Cx2 = xs
    logits_CxV = _chunk_logits(x_CxD, w_DxV, softcap)
    lse_C, target_C = _chunk_stats(logits_CxV, t_C, vocab_start, axis_name, softcap)
    dlse_C = 2.0 * w_Cx2[:, 1] * lse_C  # d(z * lse^2) / d lse
    dlogits_CxV = _dlogits(logits_CxV, t_C, vocab_start, w_Cx2[:, 0], dlse_C, lse_C, softcap, _dlogits_dtype(w_DxV))
    dx_CxD, dw_DxV = _input_grads(x_CxD, w_DxV, dlogits_CxV)
    return dw_acc + dw_DxV, (lse_C - target_C, lse_C, dx_CxD)

  dw_DxV, (ce_nxC, lse_nxC, dx_nxCxD) = jax.lax.scan(
      body, jnp.zeros(_weight_shape(w_DxV), jnp.float32), (x_nxCxD, t_nxC, weights_nxCx2))
  return ce_nxC.reshape(-1)[:n], lse_nxC.reshape(-1)[:n], dx_nxCxD.reshape(-1, x_NxD.shape[1])[:n], dw_DxV


def _objective(ce_N, lse_N, ce_weights_N, z_weights_N):
  return (jnp.sum(ce_weights_N.astype(jnp.float32) * ce_N)
          + jnp.sum(z_weights_N.astype(jnp.float32) * jnp.square(lse_N)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11))
def _fused(x_NxD, w_DxV, targets_N, ce_weights_N, z_weights_N, vocab_start, softcap, chunk, axis_name, gather_axes,
           impl, fp8):
  # Not differentiated: the forward GEMM alone.
  w_DxV = _compute_weight(w_DxV, x_NxD.dtype, gather_axes, fp8)
  ce_N, lse_N, _ = _forward(x_NxD, w_DxV, targets_N, vocab_start, softcap, chunk, axis_name)
  return _objective(ce_N, lse_N, ce_weights_N, z_weights_N), ce_N, lse_N


def _fused_fwd(x_NxD, w_DxV, targets_N, ce_weights_N, z_weights_N, vocab_start, softcap, chunk, axis_name,
               gather_axes, impl, fp8):
  like_0 = jnp.zeros((0,), w_DxV.dtype)
  inputs = (x_NxD, _compute_weight(w_DxV, x_NxD.dtype, gather_axes, fp8), targets_N, ce_weights_N, z_weights_N,
            vocab_start, softcap)
  if impl == "xla":
    ce_N, lse_N, dx_NxD, dw_DxV = _fused_forward(*inputs, chunk, axis_name)
  else:
    ce_N, lse_N, dx_NxD, dw_DxV = pallas_cross_entropy.fused_forward(*inputs, axis_name, impl == "interpret")
  objective = _objective(ce_N, lse_N, ce_weights_N, z_weights_N)
  return (objective, ce_N, lse_N), (dx_NxD, _weight_grad(dw_DxV, like_0, gather_axes))


def _fused_bwd(softcap, chunk, axis_name, gather_axes, impl, fp8, residuals, cotangents):
  dx_NxD, dw_DxV = residuals
  # Only the objective is differentiable (the wrapper stops ce and lse). Like ce and lse in the
  # unfused loss, it is the same on every vocab slice, and its cotangent is psummed.
  g = _reduce(jax.lax.psum, cotangents[0].astype(jnp.float32), axis_name)
  return (dx_NxD * g.astype(dx_NxD.dtype), dw_DxV * g.astype(dw_DxV.dtype), None, None, None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_linear_cross_entropy(x_NxD: Array, w_DxV: Array, targets_N: Array, ce_weights_N: Array,
                               z_weights_N: Array, vocab_start: Array, softcap: float = 0.0, chunk: int = 4096,
                               axis_name: str | None = None, gather_axes=None, impl: str = "xla", fp8: bool = False):
  """(objective, cross_entropy_N, logsumexp_N) of logits x @ w, where
  objective = sum(ce_weights * ce) + sum(z_weights * lse^2) (a loss sum with per-token weights
  plus z-loss): the training loss, in three GEMMs per chunk instead of `linear_cross_entropy`'s
  four. The per-token weights are inputs, so d(objective)/d(logits) is known while each chunk's
  logits are: dx and dw are formed in the forward pass (logits, dx, dw), never recomputing the
  logits, and the backward only scales them by the objective's cotangent. Only the objective
  has a gradient (ce and lse come back stopped, for metrics); the weights get none. Evaluated
  without a gradient it runs the forward GEMM alone. `impl` (FUSED_IMPLS): "xla" forms it in
  chunks of `chunk` tokens; "mosaic"/"interpret" in Pallas kernels that keep the logits on chip."""
  if impl not in FUSED_IMPLS:
    raise ValueError(f"impl={impl!r}: must be one of {FUSED_IMPLS}")
  if fp8 and impl != "xla":
    raise ValueError(f"fp8: the Pallas loss kernels (impl={impl!r}) run the lm_head in the compute dtype; use impl='xla'")
  objective, ce_N, lse_N = _fused(x_NxD, w_DxV, targets_N, ce_weights_N, z_weights_N, vocab_start, softcap, chunk,
                                  axis_name, gather_axes, impl, fp8)
  return objective, jax.lax.stop_gradient(ce_N), jax.lax.stop_gradient(lse_N)
