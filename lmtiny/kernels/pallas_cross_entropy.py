"""The fused loss with its logits kept on chip: Pallas kernels for TPU (Mosaic).

`fused_forward` has the contract of lmtiny.kernels.cross_entropy's XLA fused pass: given the
objective's per-token weights, it returns the per-token statistics and the objective's dx and
dw. The XLA form writes each chunk's float32 logits to HBM and reads them back about three times
(14-18 bytes per logit). Here no logit leaves VMEM: each is recomputed where it is needed, tile by
tile, at the price of two more GEMMs (five instead of three). On TPU, whose HBM feeds fewer bytes
per FLOP than a GPU's, that pays at lmtiny's sizes: on a v6e (918 TFLOP/s, 1.6 TB/s) the two
extra GEMMs cost 4D/918e12 s per logit against 9-11 ps of HBM traffic saved, so the five GEMMs
win while D < ~2,000-2,600 (d20's D is 1,280); on a v5e (197 TFLOP/s, 0.82 TB/s) while
D < ~850-1,100, provided the kernels are compute-bound: their tiles (lmtiny.kernels.loss_tiles)
give each 790-1,900 FLOPs per HBM byte up to d24_2026's width, above a v6e's 574. The memory it
saves (the float32 logits chunks) it saves everywhere.

Three kernels over tiles of tokens x vocab columns, each a grid whose last axis is a sequential
reduction (its accumulator in VMEM):
  1. statistics, grid (token tiles, vocab tiles): the row max, sum of exps and target logit of
     this device's vocab columns (1 GEMM); lse is finished outside, across vocab shards;
  2. dx, grid (token tiles, vocab tiles): logits again, d(objective)/d(logits), dx += dlogits @ w^T
     (2 GEMMs);
  3. dw, grid (vocab tiles, token tiles): logits again, dlogits, dw += x^T @ dlogits (2 GEMMs),
     into its float32 output block, which stays in VMEM while the token tiles run.
Per-token operands (target column, weights, lse) travel packed as lanes of one float32 [N, 128]
array, and the statistics come back the same way. Tokens and vocab are zero-padded to whole
tiles: padded tokens have zero x (logits 0) and zero weights, and padded vocab columns are
masked out of the softmax.

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

from lmtiny.kernels import loss_tiles

Array = jax.Array

# The kernels' names in a compiled program (lmtiny.training.lowering counts them).
STATS, DX, DW = KERNEL_NAMES = loss_tiles.KERNELS
# Lanes of the packed per-token rows (loss_tiles.ROW_LANES wide): the kernels' inputs ...
TARGET, DCE, DSUM, LSE = range(4)
# ... and the statistics kernel's outputs.
TOP, SUM_EXP, TARGET_LOGIT = range(3)


def _pad_to(a: Array, size: int, axis: int, value=0) -> Array:
  pad = size - a.shape[axis]
  if pad == 0:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, pad)
  return jnp.pad(a, widths, constant_values=value)


def _pack_rows(*columns_N: Array) -> Array:
  """float32 [N, ROW_LANES]: the per-token columns as its first lanes, zeros after (a target
  column index is exact in float32 below 2^24, any vocabulary lmtiny builds)."""
  packed = jnp.stack([c.astype(jnp.float32) for c in columns_N], axis=1)
  return jnp.pad(packed, ((0, 0), (0, loss_tiles.ROW_LANES - len(columns_N))))


def _lane(rows, k: int):
  """Lane k of a packed [tm, ROW_LANES] block, as a [tm, 1] column."""
  return rows[:, k:k + 1]


def _tile_logits(x_ref, w_ref, rows, j, v_local: int, softcap: float):
  """(float32 logits [tm, tv] of this tile, the targets' one-hot mask, the mask of real columns or
  None); `rows` is the tile's packed per-token block."""
  logits = jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)
  if softcap > 0:
    logits = softcap * jnp.tanh(logits / softcap)
  tv = logits.shape[1]
  cols = j * tv + jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  is_target = cols == _lane(rows, TARGET).astype(jnp.int32)
  real = None if v_local % tv == 0 else cols < v_local
  return logits, is_target, real


def _tile_dlogits(x_ref, w_ref, rows_ref, j, v_local: int, softcap: float):
  """d(objective)/d(logits) of one tile in w's dtype: dsum * softmax - dce * onehot (times the
  softcap's derivative), dsum = dce + dlse per token."""
  rows = rows_ref[...]
  logits, is_target, real = _tile_logits(x_ref, w_ref, rows, j, v_local, softcap)
  probs = jnp.exp(logits - _lane(rows, LSE))
  if real is not None:
    probs = jnp.where(real, probs, 0.0)
  dlogits = _lane(rows, DSUM) * probs - jnp.where(is_target, _lane(rows, DCE), 0.0)
  if softcap > 0:
    dlogits = dlogits * (1.0 - jnp.square(logits / softcap))
  return dlogits.astype(w_ref.dtype)


def _stats_kernel(x_ref, w_ref, rows_ref, stats_ref, max_acc, sum_acc, target_acc, *, v_local, softcap):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _():
    max_acc[...] = jnp.full(max_acc.shape, -jnp.inf, jnp.float32)
    sum_acc[...] = jnp.zeros(sum_acc.shape, jnp.float32)
    target_acc[...] = jnp.zeros(target_acc.shape, jnp.float32)

  logits, is_target, real = _tile_logits(x_ref, w_ref, rows_ref[...], j, v_local, softcap)
  if real is not None:
    logits = jnp.where(real, logits, -jnp.inf)
  new_max = jnp.maximum(max_acc[...], jnp.max(logits, axis=1, keepdims=True))
  sum_acc[...] = (sum_acc[...] * jnp.exp(max_acc[...] - new_max)
                  + jnp.sum(jnp.exp(logits - new_max), axis=1, keepdims=True))
  max_acc[...] = new_max
  target_acc[...] += jnp.sum(jnp.where(is_target, logits, 0.0), axis=1, keepdims=True)

  @pl.when(j == pl.num_programs(1) - 1)
  def _():
    lane = jax.lax.broadcasted_iota(jnp.int32, stats_ref.shape, 1)
    stats_ref[...] = jnp.where(lane == TOP, max_acc[...], jnp.where(
        lane == SUM_EXP, sum_acc[...], jnp.where(lane == TARGET_LOGIT, target_acc[...], 0.0)))


def _dx_kernel(x_ref, w_ref, rows_ref, dx_ref, dx_acc, *, v_local, softcap):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _():
    dx_acc[...] = jnp.zeros(dx_acc.shape, jnp.float32)

  dlogits = _tile_dlogits(x_ref, w_ref, rows_ref, j, v_local, softcap)
  # dlogits [tm, tv] . w [D, tv] over tv
  dx_acc[...] += jax.lax.dot_general(dlogits, w_ref[...], (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(1) - 1)
  def _():
    dx_ref[...] = dx_acc[...].astype(dx_ref.dtype)


def _dw_kernel(x_ref, w_ref, rows_ref, dw_ref, *, v_local, softcap):
  j, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def _():
    dw_ref[...] = jnp.zeros(dw_ref.shape, jnp.float32)

  dlogits = _tile_dlogits(x_ref, w_ref, rows_ref, j, v_local, softcap)
  # x [tm, D] . dlogits [tm, tv] over tm, into the float32 block that stays in VMEM while i runs
  dw_ref[...] += jax.lax.dot_general(x_ref[...], dlogits, (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)


def _call(name, kernel, grid, in_specs, out_spec, out_shape, scratch, interpret: bool):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_spec, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for shape in scratch],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret, name=name)


def _specs(kernel: str, tm: int, tv: int, d: int):
  """The blocks of x, w and the packed rows, as functions of the grid indices: token tiles
  outermost for the statistics and dx, vocab tiles for dw (loss_tiles.outer_is_tokens)."""
  if loss_tiles.outer_is_tokens(kernel):
    token, vocab = (lambda i, j: i), (lambda i, j: j)
  else:
    token, vocab = (lambda j, i: i), (lambda j, i: j)
  x = pl.BlockSpec((tm, d), lambda *g: (token(*g), 0))
  w = pl.BlockSpec((d, tv), lambda *g: (0, vocab(*g)))
  rows = pl.BlockSpec((tm, loss_tiles.ROW_LANES), lambda *g: (token(*g), 0))
  return x, w, rows


def _run(kernel, body, x_NxD, w_DxV, rows_NxL, out_dtype, interpret: bool):
  """Runs one kernel on its own tiles (loss_tiles.tiles), the inputs zero-padded to whole tiles.
  Returns the statistics [n, ROW_LANES], dx [n, d] in `out_dtype`, or dw [d, v] float32."""
  (n, d), v = x_NxD.shape, w_DxV.shape[1]
  tm, tv = loss_tiles.tiles(kernel, n, v, d)
  m_tiles, v_tiles = -(-n // tm), -(-v // tv)
  x, w = _pad_to(x_NxD, m_tiles * tm, 0), _pad_to(w_DxV, v_tiles * tv, 1)
  rows = _pad_to(rows_NxL, m_tiles * tm, 0)  # padded tokens: zero x, so logits 0, and zero weights
  x_spec, w_spec, rows_spec = _specs(kernel, tm, tv, d)
  if kernel == STATS:
    out = (rows_spec, jax.ShapeDtypeStruct(rows.shape, jnp.float32), [(tm, 1)] * 3)
  elif kernel == DX:
    out = (x_spec, jax.ShapeDtypeStruct(x.shape, out_dtype), [(tm, d)])
  else:
    out = (w_spec, jax.ShapeDtypeStruct(w.shape, jnp.float32), [])
  grid = (m_tiles, v_tiles) if loss_tiles.outer_is_tokens(kernel) else (v_tiles, m_tiles)
  result = _call(kernel, body, grid, [x_spec, w_spec, rows_spec], *out, interpret)(x, w, rows)
  return result[:n] if kernel != DW else result[:, :v]


def fused_forward(x_NxD: Array, w_DxV: Array, targets_N: Array, ce_weights_N: Array, z_weights_N: Array,
                  vocab_start, softcap: float, axis_name, interpret: bool):
  """(ce_N, lse_N, dx_NxD in x's dtype, dw_DxV float32) of logits x @ w, the gradients those of
  sum(ce_weights * ce) + sum(z_weights * lse^2). `w` is this device's vocab columns (from
  `vocab_start`) in the compute dtype, whole along D; with `axis_name` the statistics are
  finished across the vocab shards (pmax, psum) and dx is this shard's part."""
  v_local = w_DxV.shape[1]
  options = dict(v_local=v_local, softcap=softcap)
  # -1 is no column: a target on another vocab shard must not meet a padded column of this one.
  local_N = (targets_N - vocab_start).astype(jnp.int32)
  local_N = jnp.where((local_N >= 0) & (local_N < v_local), local_N, -1)
  stats = _run(STATS, functools.partial(_stats_kernel, **options), x_NxD, w_DxV, _pack_rows(local_N), None, interpret)
  top, sum_exp, target = stats[:, TOP], stats[:, SUM_EXP], stats[:, TARGET_LOGIT]
  if axis_name is not None:  # finish across the vocab shards
    all_top = jax.lax.pmax(top, axis_name)
    sum_exp = jax.lax.psum(sum_exp * jnp.exp(top - all_top), axis_name)
    top, target = all_top, jax.lax.psum(target, axis_name)
  lse = jnp.log(sum_exp) + top
  dce = ce_weights_N.astype(jnp.float32)
  dsum = dce + 2.0 * z_weights_N.astype(jnp.float32) * lse  # dce + d(z lse^2)/d lse
  rows = _pack_rows(local_N, dce, dsum, lse)
  dx = _run(DX, functools.partial(_dx_kernel, **options), x_NxD, w_DxV, rows, x_NxD.dtype, interpret)
  dw = _run(DW, functools.partial(_dw_kernel, **options), x_NxD, w_DxV, rows, None, interpret)
  return lse - target, lse, dx, dw
