"""The fused loss with its logits kept on chip: Pallas kernels for TPU (Mosaic).

`fused_forward` has the contract of lmtiny.kernels.cross_entropy's XLA fused pass: given the
objective's per-token weights, it returns the per-token statistics and the objective's dx and
dw. The XLA form writes each chunk's float32 logits to HBM and reads them back about three times
(14-18 bytes per logit). Here no logit leaves VMEM: each is recomputed where it is needed, tile by
tile, at the price of two more GEMMs (five instead of three). On TPU, whose HBM feeds fewer bytes
per FLOP than a GPU's, that pays at lmtiny's sizes: on a v6e (918 TFLOP/s, 1.6 TB/s) the two
extra GEMMs cost 4D/918e12 s per logit against 9-11 ps of HBM traffic saved, so the five GEMMs
win while D < ~2,000-2,600 (d20's D is 1,280); on a v5e (197 TFLOP/s, 0.82 TB/s) while
D < ~850-1,100. The memory it saves (the float32 logits chunks) it saves everywhere.

Three kernels over tiles of tokens x vocab columns (`_tiles`), each a grid whose
last axis is a sequential reduction (its accumulator in VMEM scratch):
  1. statistics, grid (token tiles, vocab tiles): the row max, sum of exps and target logit of
     this device's vocab columns (1 GEMM); lse is finished outside, across vocab shards;
  2. dx, grid (token tiles, vocab tiles): logits again, d(objective)/d(logits), dx += dlogits @ w^T
     (2 GEMMs);
  3. dw, grid (vocab tiles, token tiles): logits again, dlogits, dw += x^T @ dlogits (2 GEMMs).
Tokens and vocab are zero-padded to whole tiles: padded tokens have zero weights and no target,
padded vocab columns are masked out of the softmax.

On CPU the same kernels run in Pallas's interpreter (`interpret=True`): that is how the tests
check them against the XLA loss, values and gradients. The grid's sequential reduction axes are
TPU semantics; GPU grids run in parallel, so GPU uses the XLA fused loss.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Array = jax.Array

# Tiles: 512 x 512, halved (the wider first) until TILE_BUDGET >= tokens x vocab x D. The budget is
# what fits the smallest VMEM (v4's 16 MiB) as compiled here by XLA:TPU for every generation:
# D = 512 runs 512 x 512, D = 768-1280 512 x 256, D = 1664-2048 256 x 256 (512 x 512 at D = 1280
# overflows v4's VMEM, 512 x 256 at D = 2048 v5e's).
MAX_TILE = 512
TILE_BUDGET = 512 * 256 * 1280

# The kernels' names in a compiled program (lmtiny.training.lowering counts them).
STATS, DX, DW = KERNEL_NAMES = ("loss_stats", "loss_dx", "loss_dw")


def _tiles(n: int, v: int, d: int) -> tuple[int, int]:
  """(token tile, vocab tile) for n tokens, v vocab columns and width d; a tile never exceeds the
  size it covers, rounded up to 16 rows (bf16 packs 16 per sublane tile) or 128 lanes."""
  tm, tv = MAX_TILE, MAX_TILE
  while tm * tv * d > TILE_BUDGET and max(tm, tv) > 128:
    if tv >= tm:
      tv //= 2
    else:
      tm //= 2
  return min(tm, -(-n // 16) * 16), min(tv, -(-v // 128) * 128)


def _pad_to(a: Array, size: int, axis: int, value=0) -> Array:
  pad = size - a.shape[axis]
  if pad == 0:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, pad)
  return jnp.pad(a, widths, constant_values=value)


def _tile_logits(x_ref, w_ref, j, v_local: int, softcap: float):
  """(float32 logits [tm, tv] of this tile, their vocab columns, the mask of real columns or None)."""
  logits = jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)
  if softcap > 0:
    logits = softcap * jnp.tanh(logits / softcap)
  tv = logits.shape[1]
  cols = j * tv + jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  real = None if v_local % tv == 0 else cols < v_local
  return logits, cols, real


def _tile_dlogits(x_ref, w_ref, t_ref, dce_ref, dsum_ref, lse_ref, j, v_local: int, softcap: float):
  """d(objective)/d(logits) of one tile in w's dtype: dsum * softmax - dce * onehot (times the
  softcap's derivative), dsum = dce + dlse per token."""
  logits, cols, real = _tile_logits(x_ref, w_ref, j, v_local, softcap)
  probs = jnp.exp(logits - lse_ref[...])
  if real is not None:
    probs = jnp.where(real, probs, 0.0)
  dlogits = dsum_ref[...] * probs - jnp.where(cols == t_ref[...], dce_ref[...], 0.0)
  if softcap > 0:
    dlogits = dlogits * (1.0 - jnp.square(logits / softcap))
  return dlogits.astype(w_ref.dtype)


def _stats_kernel(x_ref, w_ref, t_ref, max_ref, sum_ref, target_ref, max_acc, sum_acc, target_acc, *,
                  v_local, softcap):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _():
    max_acc[...] = jnp.full(max_acc.shape, -jnp.inf, jnp.float32)
    sum_acc[...] = jnp.zeros(sum_acc.shape, jnp.float32)
    target_acc[...] = jnp.zeros(target_acc.shape, jnp.float32)

  logits, cols, real = _tile_logits(x_ref, w_ref, j, v_local, softcap)
  if real is not None:
    logits = jnp.where(real, logits, -jnp.inf)
  new_max = jnp.maximum(max_acc[...], jnp.max(logits, axis=1, keepdims=True))
  sum_acc[...] = (sum_acc[...] * jnp.exp(max_acc[...] - new_max)
                  + jnp.sum(jnp.exp(logits - new_max), axis=1, keepdims=True))
  max_acc[...] = new_max
  target_acc[...] += jnp.sum(jnp.where(cols == t_ref[...], logits, 0.0), axis=1, keepdims=True)

  @pl.when(j == pl.num_programs(1) - 1)
  def _():
    max_ref[...], sum_ref[...], target_ref[...] = max_acc[...], sum_acc[...], target_acc[...]


def _dx_kernel(x_ref, w_ref, t_ref, dce_ref, dsum_ref, lse_ref, dx_ref, dx_acc, *, v_local, softcap):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _():
    dx_acc[...] = jnp.zeros(dx_acc.shape, jnp.float32)

  dlogits = _tile_dlogits(x_ref, w_ref, t_ref, dce_ref, dsum_ref, lse_ref, j, v_local, softcap)
  # dlogits [tm, tv] . w [D, tv] over tv
  dx_acc[...] += jax.lax.dot_general(dlogits, w_ref[...], (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(1) - 1)
  def _():
    dx_ref[...] = dx_acc[...].astype(dx_ref.dtype)


def _dw_kernel(x_ref, w_ref, t_ref, dce_ref, dsum_ref, lse_ref, dw_ref, dw_acc, *, v_local, softcap):
  j, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def _():
    dw_acc[...] = jnp.zeros(dw_acc.shape, jnp.float32)

  dlogits = _tile_dlogits(x_ref, w_ref, t_ref, dce_ref, dsum_ref, lse_ref, j, v_local, softcap)
  # x [tm, D] . dlogits [tm, tv] over tm
  dw_acc[...] += jax.lax.dot_general(x_ref[...], dlogits, (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)

  @pl.when(i == pl.num_programs(1) - 1)
  def _():
    dw_ref[...] = dw_acc[...]


def _grid_transposed(spec):
  """The same block of the same array for a grid whose two axes are swapped."""
  return pl.BlockSpec(spec.block_shape, lambda j, i: spec.index_map(i, j))


def _call(name, kernel, grid, in_specs, out_specs, out_shape, scratch, interpret: bool):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for shape in scratch],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret, name=name)


def fused_forward(x_NxD: Array, w_DxV: Array, targets_N: Array, ce_weights_N: Array, z_weights_N: Array,
                  vocab_start, softcap: float, axis_name, interpret: bool):
  """(ce_N, lse_N, dx_NxD in x's dtype, dw_DxV float32) of logits x @ w, the gradients those of
  sum(ce_weights * ce) + sum(z_weights * lse^2). `w` is this device's vocab columns (from
  `vocab_start`) in the compute dtype, whole along D; with `axis_name` the statistics are
  finished across the vocab shards (pmax, psum) and dx is this shard's part."""
  n, d = x_NxD.shape
  v_local = w_DxV.shape[1]
  tm, tv = _tiles(n, v_local, d)
  n_pad, v_pad = -(-n // tm) * tm, -(-v_local // tv) * tv
  x = _pad_to(x_NxD, n_pad, 0)
  w = _pad_to(w_DxV, v_pad, 1)
  # -1 is no column: for a target on another vocab shard (which must not meet a padded column of
  # this one) and for padded tokens, whose zero weights also keep them out of dx and dw.
  local_N = (targets_N - vocab_start).astype(jnp.int32)
  local_N = jnp.where((local_N >= 0) & (local_N < v_local), local_N, -1)
  t_Nx1 = _pad_to(local_N, n_pad, 0, -1)[:, None]
  grid = (n_pad // tm, v_pad // tv)
  rows_i = pl.BlockSpec((tm, 1), lambda i, j: (i, 0))
  x_i = pl.BlockSpec((tm, d), lambda i, j: (i, 0))
  w_j = pl.BlockSpec((d, tv), lambda i, j: (0, j))
  per_token = jax.ShapeDtypeStruct((n_pad, 1), jnp.float32)
  options = dict(v_local=v_local, softcap=softcap)

  top, sum_exp, target = _call(
      STATS, functools.partial(_stats_kernel, **options), grid, [x_i, w_j, rows_i], [rows_i] * 3, [per_token] * 3,
      [(tm, 1)] * 3, interpret)(x, w, t_Nx1)
  if axis_name is not None:  # finish across the vocab shards
    all_top = jax.lax.pmax(top, axis_name)
    sum_exp = jax.lax.psum(sum_exp * jnp.exp(top - all_top), axis_name)
    top, target = all_top, jax.lax.psum(target, axis_name)
  lse = jnp.log(sum_exp) + top
  dce = _pad_to(ce_weights_N.astype(jnp.float32), n_pad, 0)[:, None]
  dsum = dce + 2.0 * _pad_to(z_weights_N.astype(jnp.float32), n_pad, 0)[:, None] * lse  # dce + d(z lse^2)/d lse
  grad_inputs = (x, w, t_Nx1, dce, dsum, lse)

  grad_specs = [x_i, w_j] + [rows_i] * 4
  dx = _call(DX, functools.partial(_dx_kernel, **options), grid, grad_specs, x_i,
             jax.ShapeDtypeStruct((n_pad, d), x_NxD.dtype), [(tm, d)], interpret)(*grad_inputs)
  # dw's grid runs the token tiles innermost (its accumulator is one vocab tile's [D, tv])
  dw = _call(DW, functools.partial(_dw_kernel, **options), grid[::-1], [_grid_transposed(s) for s in grad_specs],
             _grid_transposed(w_j), jax.ShapeDtypeStruct((d, v_pad), jnp.float32), [(d, tv)],
             interpret)(*grad_inputs)
  lse_N = lse[:n, 0]
  return lse_N - target[:n, 0], lse_N, dx[:n], dw[:, :v_local]
