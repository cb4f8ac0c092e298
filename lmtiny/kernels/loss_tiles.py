"""Tiles of the Pallas loss kernels (lmtiny.kernels.pallas_cross_entropy), and the HBM bytes they move.

Each kernel is a grid over token tiles (tm rows of x) and vocab tiles (tv columns of w), one
axis outer and one inner. The operand indexed by the outer axis is read once; the other is read
again for every outer tile:
  stats, dx (outer: tokens, the accumulator a token tile's): w is read N / tm times, 2D / tm
     bytes per logit (bf16);
  dw (outer: vocab, the accumulator a vocab tile's): x and the per-token rows are read V / tv
     times, (2D + 512) / tv bytes per logit.
So each kernel takes its outer tile as large as VMEM allows, and its inner one no larger than
the MXU wants (256 columns, v6e's width). The per-token operands travel packed as lanes of one
float32 [N, 128] array (`ROW_LANES`): XLA:TPU lays an [N, 1] array out in (8, 128) tiles, so
each separate column cost 512 bytes a token, and dw reads four of them per vocab tile.

`vmem_bytes` is what a kernel's tiles hold in VMEM: its blocks twice (Pallas double-buffers
them) and its scratch, which is exactly what XLA:TPU allocates for them on a v5e, and `TEMPS`
float32 [tm, tv] temporaries (logits, exps, dlogits), which v4 adds (36.6 MiB for the statistics
at 2048 x 256 and D = 2048, against 25.0 on a v5e). `VMEM_BUDGET` leaves 1 MiB of the smallest
scoped VMEM (v4's and v5e's 16 MiB); tests/kernels/test_pallas_cross_entropy.py compiles the
chosen tiles for both and holds the model at or above XLA:TPU's figure.

Importing this module imports no JAX (lmtiny.training.hlo_cost counts the kernels' bytes with it).
"""
from __future__ import annotations

STATS, DX, DW = KERNELS = ("loss_stats", "loss_dx", "loss_dw")
ROW_LANES = 128
ROW_BYTES = 4 * ROW_LANES  # one packed per-token row
TEMPS = 7
VMEM_BUDGET = 15 * 2**20
MAX_TILE = 2048  # the tests lower it to cut small problems into several tiles
INNER = 256  # the inner tile: the MXU's width on v6e (two passes of v5e's 128)


def outer_is_tokens(kernel: str) -> bool:
  return kernel in (STATS, DX)


def vmem_bytes(kernel: str, tm: int, tv: int, d: int) -> int:
  """VMEM a kernel holds with tiles tm x tv at width d (bf16 x and w)."""
  blocks = 2 * tm * d + 2 * d * tv + ROW_BYTES * tm  # x, w, the packed per-token rows
  if kernel == STATS:
    blocks += ROW_BYTES * tm  # the packed statistics
    scratch = 3 * ROW_BYTES * tm  # running max, sum of exps, target logit: [tm, 1] each
  elif kernel == DX:
    blocks += 2 * tm * d  # dx, bf16
    scratch = 4 * tm * d  # its float32 accumulator
  else:
    blocks += 4 * d * tv  # dw, float32, accumulated in place
    scratch = 0
  return 2 * blocks + scratch + TEMPS * 4 * tm * tv


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def tiles(kernel: str, n: int, v: int, d: int) -> tuple[int, int]:
  """(token tile, vocab tile) of `kernel` for n tokens, v vocab columns and width d: the largest
  outer tile (a power of two, at most MAX_TILE) that fits VMEM_BUDGET beside an inner tile of
  INNER, or of 128 (the lane width) where that buys a larger outer tile. A tile never exceeds
  what it covers, rounded up to 16 rows (bf16 packs 16 per sublane tile) or 128 lanes."""
  cover = (_round_up(n, 16), _round_up(v, 128))

  def shaped(outer: int, inner: int) -> tuple[int, int]:
    tm, tv = (outer, inner) if outer_is_tokens(kernel) else (inner, outer)
    return min(tm, cover[0]), min(tv, cover[1])

  def largest_outer(inner: int) -> tuple[int, int]:
    outer = MAX_TILE
    while outer > min(128, MAX_TILE) and vmem_bytes(kernel, *shaped(outer, inner), d) > VMEM_BUDGET:
      outer //= 2
    return shaped(outer, inner)

  inner = min(INNER, MAX_TILE)
  wide, narrow = largest_outer(inner), largest_outer(min(128, inner))
  outer = 0 if outer_is_tokens(kernel) else 1
  return narrow if narrow[outer] > wide[outer] else wide


def hbm_bytes(kernel: str, n: int, v: int, d: int) -> float:
  """Bytes a kernel moves between HBM and VMEM for n tokens, v vocab columns and width d: each
  block fetched once per change of its index, results written once (Pallas skips the copy of a
  block whose index did not change from the grid step before)."""
  tm, tv = tiles(kernel, n, v, d)
  m_tiles, v_tiles = -(-n // tm), -(-v // tv)
  x, w, rows = m_tiles * tm * d * 2, v_tiles * tv * d * 2, m_tiles * tm * ROW_BYTES
  if kernel == STATS:
    return x + rows + w * m_tiles + m_tiles * tm * ROW_BYTES
  if kernel == DX:
    return x + rows + w * m_tiles + x
  return (x + rows) * v_tiles + w + v_tiles * tv * d * 4
