"""Causal, document-masked attention behind one function; the backend follows the platform.

A query at index i may attend a key at index j when j <= i + offset and both carry the same
segment id (packed rows hold several documents as contiguous runs of ids 1..k; segment 0 is
padding and attends only to itself). `segment_ids=None` means one document per row.

Sliding window (`window=w > 0`, a static int per layer; FlashAttention's window_size=(w, 0)):
query i + offset also needs j >= i + offset - w, so it sees w + 1 keys at most. Every backend
takes it, packed rows included: xla cuts more, smaller query blocks and skips the key blocks
wholly outside the window; cuDNN gets jax.nn's local_window_size=(w, 0) (its sliding window
length w + 1) and, packed, the same length per run (a run is its own sequence, and the window
is relative, so it is the same mask); splash swaps CausalMask for LocalMask((w, 0)); decode
masks the full-length cache (`attention_mask`). w >= T - 1 in self-attention is plain causal.

Backends (`model.attention`):
  xla    - einsum + float32 softmax; runs anywhere. Self-attention skips the blocks above the
           diagonal and builds its mask inside each block (`xla_causal_attention`); decode
           and the tests' reference take a dense [B, 1, T, S] mask (`xla_attention`).
  cudnn  - cuDNN flash attention (NVIDIA GPUs, bf16/fp16). Causal is the kernel's mask *type*, so
           no [T, S] tensor exists and masked blocks are skipped. Packed rows use cuDNN's
           packed-sequence (THD) layout: `segment_runs` turns segment ids into per-row run
           lengths and start offsets, and each run is its own causal sequence. The public
           `jax.nn.dot_product_attention` takes only one length per row (padding, not packing),
           so packed rows go through `jax._src.cudnn.fused_attention_stablehlo`, the function
           jax.nn itself calls. Its packed layout needs Hopper (sm90+) and a static bound on runs
           per row: `max_runs` when the packer guarantees one (data.max_docs_per_row, see
           lmtiny.data.pipeline.max_runs_per_row), else T // 64 (lmtiny.config.cudnn_max_runs). The bound
           sizes the kernel's per-run state (softmax statistics, grid), so a tight one saves
           work; runs past it merge into the last one, which then attends causally across those
           documents (nanochat attends across all of them). jax up to 0.11.0 scaled the kv offsets by the *query* head count (fixed in
           jax's be78ee0f, 2026-07-30): `packed_gqa_needs_repeat` asks the installed jax, and
           only where it still does so are k/v repeated to H heads for packed GQA.
  splash - Pallas splash attention (TPU): causal MultiHeadMask + SegmentIds, GQA as the MQA
           kernel vmapped over kv heads, run inside `jax.shard_map` (batch over data/fsdp,
           heads over tensor; the specs come from lmtiny.parallel.sharding). The kernel does not scale
           q: we do. Off TPU it runs in Pallas interpret mode (slow; for tests).
  auto   - cudnn on GPU for bf16/fp16 (xla for packed rows before Hopper), splash on TPU,
           xla elsewhere.

tokamax (PyPI 0.0.12, evaluated here on jax 0.10.2): it installs and imports, and its XLA path
matches jax.nn. Its public `dot_product_attention` takes a dense mask or per-row lengths, no
segment ids; document masking needs its private `base.Mask(k_start=...)`. It pins
typeguard==2.13.3 and pulls qwix, pydantic and tensorboardX, and its Pallas GPU kernels could
not be measured without a GPU. cuDNN through JAX itself needs no new dependency and is what
the GPU benchmark (benchmarks/attention.py) checks against xla; tokamax is not adopted.

Decode (T != S or a q_offset, the KV cache) always runs xla: a few queries against the cache
are memory-bound, and cuDNN's causal type aligns the diagonal at the top-left corner.

With a `tensor` mesh axis that does not divide num_kv_heads, k/v are repeated
(`sharding.kv_head_repeats`) so q, k and v shard their heads alike, as the cuDNN partitioner
and shard_map require. The output carries the checkpoint name `ATTN_OUT` (splash also names its
logsumexp residual) so a remat policy can keep it and a fused forward runs once.
"""
from __future__ import annotations

import functools
import math
import operator
import warnings

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lmtiny import config as config_lib
from lmtiny.parallel import sharding

Array = jax.Array

ATTN_OUT = "attn_out"   # checkpoint name of the attention output (and fused kernels' residuals)
ATTN_QKV = "attn_qkv"   # checkpoint name of q, k, v after RoPE (set by lmtiny.model)
HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
KEY_ALIGN = 16  # windowed xla blocks start their keys at multiples of this (aligned slices)


def static_window(window) -> int:
  """The window as a Python int >= 0 (it shapes the program: a traced value cannot)."""
  try:
    window = operator.index(window)
  except TypeError:
    raise ValueError(f"attention window must be a static int >= 0 (0: full context), got {window!r}") from None
  if window < 0:
    raise ValueError(f"attention window must be >= 0 (0: full context), got {window}")
  return window


def attention_mask(q_segment_ids_BxT: Array, kv_segment_ids_BxS: Array, q_offset: Array | int = 0,
                   window: int = 0) -> Array:
  """Boolean [B, 1, T, S]: causal (key index <= query index + q_offset), same segment and, with
  window w > 0, key index >= query index + q_offset - w."""
  t, s = q_segment_ids_BxT.shape[1], kv_segment_ids_BxS.shape[1]
  q_index_BxT = jnp.arange(t)[None, :] + jnp.reshape(q_offset, (-1, 1))
  causal_BxTxS = jnp.arange(s)[None, None, :] <= q_index_BxT[:, :, None]
  if window:
    causal_BxTxS = causal_BxTxS & (jnp.arange(s)[None, None, :] >= q_index_BxT[:, :, None] - window)
  same_doc_BxTxS = q_segment_ids_BxT[:, :, None] == kv_segment_ids_BxS[:, None, :]
  return (causal_BxTxS & same_doc_BxTxS)[:, None, :, :]


def xla_attention(q_BxTxHxDh: Array, k_BxSxKxDh: Array, v_BxSxKxDh: Array, mask_Bx1xTxS: Array) -> Array:
  """Attention under any boolean mask (the decode path and the reference of the others)."""
  b, t, h, dh = q_BxTxHxDh.shape
  k = k_BxSxKxDh.shape[2]
  q_BxTxKxGxDh = q_BxTxHxDh.reshape(b, t, k, h // k, dh)
  scores_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxDh, k_BxSxKxDh,
                                preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(dh))
  scores_BxKxGxTxS = jnp.where(mask_Bx1xTxS[:, :, None], scores_BxKxGxTxS, jnp.finfo(jnp.float32).min)
  probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxDh.dtype)
  out_BxTxKxGxDh = jnp.einsum("bkgts,bskd->btkgd", probs_BxKxGxTxS, v_BxSxKxDh)
  return out_BxTxKxGxDh.reshape(b, t, h, dh)


def xla_query_blocks(seq_len: int, window: int = 0) -> int:
  """Query blocks of `xla_causal_attention`: `config.attention_query_blocks` without a window; with
  one, the most of 16/8/4/2 that leave blocks of at least max(32, window / 2) rows (never fewer
  than without a window), so each block reads about its own rows plus the window."""
  full = config_lib.attention_query_blocks(seq_len)
  if not 0 < window < seq_len - 1:
    return full
  min_rows = max(32, -(-window // 2))
  return max(full, next((n for n in (16, 8, 4, 2) if seq_len % n == 0 and seq_len // n >= min_rows), 1))


def xla_key_starts(seq_len: int, window: int = 0) -> list[int]:
  """First key each query block of `xla_causal_attention` reads (it reads up to its last row):
  0 without a window, else the block's first row minus the window, rounded down to a multiple
  of KEY_ALIGN (aligned slices) and clipped at 0."""
  rows = seq_len // xla_query_blocks(seq_len, window)
  if not 0 < window < seq_len - 1:
    return [0] * (seq_len // rows)
  return [max(0, (start - window) // KEY_ALIGN * KEY_ALIGN) for start in range(0, seq_len, rows)]


def xla_score_fraction(seq_len: int, window: int = 0) -> float:
  """The part of the [T, T] score square `xla_causal_attention` computes (FLOPs and memory)."""
  rows = seq_len // xla_query_blocks(seq_len, window)
  return sum(rows * (start + rows - key_start)
             for start, key_start in zip(range(0, seq_len, rows), xla_key_starts(seq_len, window))) / seq_len ** 2


def xla_causal_attention(q_BxTxHxDh: Array, k_BxTxKxDh: Array, v_BxTxKxDh: Array,
                         segment_ids_BxT: Array | None, window: int = 0) -> Array:
  """Causal (and document-masked, and windowed) self-attention in plain XLA, skipping masked blocks.

  The queries are cut into `xla_query_blocks` row blocks; block i attends only to the keys up
  to its last row, so with 4 blocks the scores hold 10/16 of the [T, T] square (FLOPs and
  memory). With a window w, block i also starts at key (first row - w) rounded down to a multiple
  of KEY_ALIGN, and more, smaller blocks are cut: about (rows + w) / T of the square is computed
  (`xla_score_fraction`: T=2048, w=512 -> 8 blocks, 0.33 against 0.625 without; T=256, w=7 -> 0.18).
  Each block's mask is built from iotas and segment ids inside its select (no [B, 1, T, S]
  tensor). Queries are laid out block-major, [blocks, B, K, G*rows, Dh], so each block is a
  contiguous operand and each matmul one batched GEMM over (B, K) whose G query heads share
  their kv head. Same values as `xla_attention` with `attention_mask`; on the tiny config's
  shapes on CPU its forward+backward takes 29 ms against 84 ms (one thread).
  """
  b, t, h, dh = q_BxTxHxDh.shape
  kv = k_BxTxKxDh.shape[2]
  window = static_window(window)
  if window >= t - 1:
    window = 0  # the window holds every earlier key: plain causal
  g, blocks = h // kv, xla_query_blocks(t, window)
  rows = t // blocks
  # Block-major queries [blocks, B, K, G x rows, Dh]: each block is one contiguous operand.
  q_NxBxKxRxDh = (q_BxTxHxDh.reshape(b, blocks, rows, kv, g, dh).transpose(1, 0, 3, 4, 2, 5)
                  .reshape(blocks, b, kv, g * rows, dh))
  k_BxKxTxDh, v_BxKxTxDh = (x.transpose(0, 2, 1, 3) for x in (k_BxTxKxDh, v_BxTxKxDh))
  scale = 1.0 / math.sqrt(dh)
  outs = []
  for i, key_start in enumerate(xla_key_starts(t, window)):
    start, end = i * rows, (i + 1) * rows  # this block's queries; keys key_start .. end - 1
    scores_BxKxRxS = jnp.einsum("bkrd,bksd->bkrs", q_NxBxKxRxDh[i], k_BxKxTxDh[:, :, key_start:end],
                                preferred_element_type=jnp.float32) * scale
    key_1xRxS, query_1xRxS = (jax.lax.broadcasted_iota(jnp.int32, (1, rows, end - key_start), d) for d in (2, 1))
    if window:
      key_1xRxS = key_1xRxS + key_start
      allowed_1xRxS = (key_1xRxS <= query_1xRxS + start) & (key_1xRxS >= query_1xRxS + (start - window))
    else:
      allowed_1xRxS = key_1xRxS <= query_1xRxS + start
    if segment_ids_BxT is not None:
      allowed_1xRxS = allowed_1xRxS & (segment_ids_BxT[:, start:end, None]
                                       == segment_ids_BxT[:, None, key_start:end])
    # Scores stay 4-D (G folded into the rows, the mask tiled to match): 1.2x faster on CPU
    # than splitting G out again.
    allowed_1x1xRxS = jnp.tile(allowed_1xRxS, (1, g, 1))[:, None]
    scores_BxKxRxS = jnp.where(allowed_1x1xRxS, scores_BxKxRxS, jnp.finfo(jnp.float32).min)
    probs_BxKxRxS = jax.nn.softmax(scores_BxKxRxS, axis=-1).astype(v_BxKxTxDh.dtype)
    outs.append(jnp.einsum("bkrs,bksd->bkrd", probs_BxKxRxS, v_BxKxTxDh[:, :, key_start:end]))
  out_NxBxKxGxRxDh = jnp.stack(outs).reshape(blocks, b, kv, g, rows, dh)
  return out_NxBxKxGxRxDh.transpose(1, 0, 4, 2, 3, 5).reshape(b, t, h, dh)


# ---------------------------------------------------------------------------------------------
# Backend selection (pure: platform, dtype and shapes in, backend name out).


def splash_block(seq_len: int) -> int | None:
  """The splash tile (q and kv) for a sequence: the largest of 512/256/128 dividing it, or None."""
  return next((blk for blk in (512, 256, 128) if seq_len % blk == 0), None)


def resolve_impl(impl: str, dtype, *, platform: str | None = None, self_attention: bool = True,
                 seq_len: int | None = None, packed: bool = False, gpu_capability: tuple | None = None,
                 max_runs: int = 0) -> str:
  """The backend that runs: `impl` unless it is auto, and xla wherever a fused kernel cannot.

  self_attention=False (decode against a cache, T != S) always gives xla. A requested fused
  backend the shape rules out (splash needs seq_len % 128 == 0; packed cuDNN rows with no bound
  from the packer need room for two runs under T // 64, T >= 128) also falls back to xla.
  """
  platform = platform or target_platform()
  if not self_attention:
    return "xla"
  if impl == "auto":
    if platform == "gpu" and jnp.dtype(dtype) in HALF_DTYPES:
      old_gpu = gpu_capability is not None and gpu_capability < (9, 0)
      impl = "xla" if packed and old_gpu else "cudnn"
    elif platform == "tpu":
      impl = "splash"
    else:
      impl = "xla"
  if impl == "splash" and seq_len is not None and splash_block(seq_len) is None:
    return "xla"
  if impl == "cudnn" and packed and not max_runs and seq_len is not None and config_lib.cudnn_max_runs(seq_len) < 2:
    return "xla"  # T < 128: a bound of one run per row would drop the document mask
  return impl


def reads_head_major(impl: str, dtype, seq_len: int) -> bool:
  """Whether `attention` runs splash for a self-attention of `seq_len` tokens, whose kernel reads
  queries and keys head-major ([B, H, T, Dh]) rather than as the projections leave them."""
  return resolve_impl(impl, dtype, seq_len=seq_len) == "splash"


# What attention is built for: this machine's backend, unless lmtiny.training.lowering is lowering a
# program for a GPU or TPU that this machine lacks (then platform and GPU capability are its).
LOWERING_TARGET = {"platform": None, "gpu_capability": None}


def target_platform() -> str:
  return LOWERING_TARGET["platform"] or jax.default_backend()


def _gpu_capability() -> tuple | None:
  if LOWERING_TARGET["platform"] is not None:
    return LOWERING_TARGET["gpu_capability"]
  cap = getattr(jax.devices()[0], "compute_capability", None)
  return tuple(int(x) for x in cap.split(".")) if cap else None


def named_residuals(kernel):
  """kernel(q, k, v, aux) -> out, as a custom_vjp whose backward residuals carry names.

  A fused kernel is a custom_vjp: its backward needs residuals (the output, the logsumexp)
  that only its own forward produces. Under jax.checkpoint an unnamed residual is not
  saveable, so every remat policy would rerun the kernel's forward in the backward pass. Here
  every residual except the q, k, v inputs themselves is named ATTN_OUT (q, k, v are
  recomputed from the block input, or saved under ATTN_QKV by the model). `aux` holds
  non-differentiable inputs (segment ids) and gets no cotangent.
  """
  @jax.custom_vjp
  def run(q, k, v, aux):
    return kernel(q, k, v, aux)

  def forward(q, k, v, aux):
    out, vjp_fn = jax.vjp(lambda q_, k_, v_: kernel(q_, k_, v_, aux), q, k, v)
    leaves, tree = jax.tree.flatten(vjp_fn)
    own = [i for i, x in enumerate(leaves) if not any(x is y for y in (q, k, v))]
    # The barrier makes the residuals final (e.g. splash's logsumexp sliced from its 128-lane
    # copy) before the output moves on, so their larger forms die at the kernel.
    out, kept = jax.lax.optimization_barrier((out, [leaves[i] for i in own]))
    for i, x in zip(own, kept):
      leaves[i] = checkpoint_name(x, ATTN_OUT)
    return out, jax.tree.unflatten(tree, leaves)

  def backward(vjp_fn, g):
    return (*vjp_fn(g), None)

  run.defvjp(forward, backward)
  return run


# ---------------------------------------------------------------------------------------------
# cuDNN.


def segment_runs(segment_ids_BxT: Array, max_runs: int) -> tuple[Array, Array]:
  """Segment ids -> cuDNN packed-sequence arguments for one row each.

  Returns (lengths [B, M], starts [B, M + 1]), int32: run j of row b covers tokens
  starts[b, j] .. starts[b, j] + lengths[b, j] - 1; unused entries are -1 (the layout
  `fused_attention_stablehlo.dot_product_attention` documents). A run is a maximal stretch of
  equal ids; runs past the M-th merge into the M-th.
  """
  b, t = segment_ids_BxT.shape
  new_run_BxT = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], 1)
  run_BxT = jnp.minimum(jnp.cumsum(new_run_BxT, axis=1) - 1, max_runs - 1)
  in_run_BxTxM = run_BxT[:, :, None] == jnp.arange(max_runs)[None, None, :]
  lengths_BxM = jnp.sum(in_run_BxTxM, axis=1, dtype=jnp.int32)
  starts_BxM = jnp.argmax(in_run_BxTxM, axis=1).astype(jnp.int32)
  used_BxM = lengths_BxM > 0
  lengths_BxM = jnp.where(used_BxM, lengths_BxM, -1)
  starts_BxM1 = jnp.concatenate([jnp.where(used_BxM, starts_BxM, -1), jnp.full((b, 1), -1, jnp.int32)], 1)
  return lengths_BxM, starts_BxM1


@functools.cache
def packed_gqa_needs_repeat() -> bool:
  """Whether this jax's cuDNN packed layout needs GQA k/v repeated to the query's head count.

  jax turns per-row run starts into flat element offsets (`_fix_seqlen_offsets`) by multiplying
  with heads x head dim; up to 0.11.0 it used the query's head count for the kv offsets too,
  which is right only when k/v have as many heads as q. Asked of jax itself on a 2-head query
  and a 1-head key (second run starts at token 1): kv offset 2 = scaled by query heads.
  Anything unexpected answers True: repeating is correct on every version, only costlier.
  """
  try:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha  # pylint: disable=g-import-not-at-top
    with jax.ensure_compile_time_eval():
      lengths = jnp.array([[1, 1]], jnp.int32)
      starts = jnp.array([[0, 1, -1]], jnp.int32)
      q = jax.ShapeDtypeStruct((1, 2, 2, 1), jnp.bfloat16)
      k = jax.ShapeDtypeStruct((1, 2, 1, 1), jnp.bfloat16)
      kv_offsets = cudnn_fmha._fix_seqlen_offsets(lengths, lengths, starts, starts, q, k)[3]  # pylint: disable=protected-access
      return int(kv_offsets.reshape(-1)[1]) != 1
  except Exception:  # pylint: disable=broad-except
    return True


def _cudnn_attention(q_BxTxHxDh: Array, k_BxSxKxDh: Array, v_BxSxKxDh: Array, segment_ids_BxT: Array | None,
                     window: int = 0, max_runs: int = 0) -> Array:
  # jax.nn's (w, 0) becomes cuDNN's sliding_window_length w + 1: keys (i - w - 1, i], i.e. i - w .. i.
  local = {"local_window_size": (window, 0)} if window else {}
  runs = config_lib.cudnn_max_runs(q_BxTxHxDh.shape[1], max_runs)
  if segment_ids_BxT is None or runs == 1:  # one run per row: causal type alone
    causal = named_residuals(lambda q, k, v, _: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                             implementation="cudnn", **local))
    return causal(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, None)
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha  # pylint: disable=g-import-not-at-top
  b, t, h, dh = q_BxTxHxDh.shape
  group = h // k_BxSxKxDh.shape[2]
  if group > 1 and packed_gqa_needs_repeat():  # this jax strides kv runs by the query's heads
    k_BxSxKxDh, v_BxSxKxDh = (jnp.repeat(x, group, axis=2) for x in (k_BxSxKxDh, v_BxSxKxDh))
    k_BxSxKxDh, v_BxSxKxDh = (sharding.constrain(x, ("batch", "seq", "act_heads", None)) for x in (k_BxSxKxDh, v_BxSxKxDh))
  lengths_BxM, starts_BxM1 = (sharding.constrain(x, ("batch", None)) for x in segment_runs(segment_ids_BxT, runs))

  def packed(q, k, v, runs):  # each run is its own sequence: a window within it is the same i - w .. i
    return cudnn_fmha.dot_product_attention(
        q, k, v, q_seqlen=runs[0], kv_seqlen=runs[0], q_offsets=runs[1], kv_offsets=runs[1],
        scale=1.0 / math.sqrt(dh), mask_type=cudnn_fmha.MaskType.PADDING_CAUSAL,
        sliding_window_length=window + 1 if window else None)

  return named_residuals(packed)(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, (lengths_BxM, starts_BxM1))


# ---------------------------------------------------------------------------------------------
# Splash (TPU Pallas; interpret mode elsewhere).


def _splash_local(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxT, *, interpret: bool, window: int = 0):
  """Splash attention on one device's shard: batch rows and kv heads vmapped over the MQA kernel."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask  # pylint: disable=g-import-not-at-top
  b, t, h, dh = q_BxTxHxDh.shape
  s, kv = k_BxSxKxDh.shape[1], k_BxSxKxDh.shape[2]
  g = h // kv
  blk = splash_block(t)
  sizes = splash.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                            block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
  # LocalMask((w, 0), offset 0): key j visible to query i iff i - w <= j <= i; blocks wholly
  # outside it are skipped like those above the diagonal.
  head_mask = (splash_mask.LocalMask((t, s), window_size=(window, 0), offset=0) if window
               else splash_mask.CausalMask((t, s)))
  kernel = splash.make_splash_mqa_single_device(splash_mask.MultiHeadMask([head_mask] * g), block_sizes=sizes,
                                                interpret=interpret)
  scaled_q = q_BxTxHxDh * jnp.asarray(1.0 / math.sqrt(dh), q_BxTxHxDh.dtype)
  q_BxKxGxTxDh = scaled_q.reshape(b, t, kv, g, dh).transpose(0, 2, 3, 1, 4)
  k_BxKxSxDh, v_BxKxSxDh = (x.transpose(0, 2, 1, 3) for x in (k_BxSxKxDh, v_BxSxKxDh))

  def one_row(q_KxGxTxDh, k_KxSxDh, v_KxSxDh, seg_T):
    seg = None if seg_T is None else splash.SegmentIds(q=seg_T, kv=seg_T)
    return jax.vmap(lambda q_, k_, v_: kernel(q_, k_, v_, segment_ids=seg))(q_KxGxTxDh, k_KxSxDh, v_KxSxDh)

  def rows(q, k, v, seg):
    return jax.vmap(one_row, in_axes=(0, 0, 0, None if seg is None else 0))(q, k, v, seg)

  out_BxKxGxTxDh = named_residuals(rows)(q_BxKxGxTxDh, k_BxKxSxDh, v_BxKxSxDh, segment_ids_BxT)
  return out_BxKxGxTxDh.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


def _splash_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxT, *, interpret: bool,
                      window: int = 0) -> Array:
  def local(q, k, v, seg):
    return _splash_local(q, k, v, seg, interpret=interpret, window=window)

  mesh = sharding.traced_mesh()
  if mesh is None:
    return local(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxT)
  q_spec, kv_spec, seg_spec = sharding.attention_specs(q_BxTxHxDh.shape, k_BxSxKxDh.shape, dict(mesh.shape))
  if segment_ids_BxT is None:
    return jax.shard_map(lambda q, k, v: local(q, k, v, None), mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec),
                         out_specs=q_spec, check_vma=False)(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh)
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                       check_vma=False)(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxT)


# ---------------------------------------------------------------------------------------------
# The entry point.


def attention(q_BxTxHxDh: Array, k_BxSxKxDh: Array, v_BxSxKxDh: Array, *, q_segment_ids: Array | None = None,
              kv_segment_ids: Array | None = None, q_offset: Array | int = 0, impl: str = "auto",
              window: int = 0, max_runs: int = 0) -> Array:
  """Multi-head / grouped-query attention; K kv heads serve H // K query heads each.

  Fused backends run self-attention only (T == S, q_offset == 0, the same segment ids for
  queries and keys); anything else, the KV-cache decode path included, runs xla. `window` (a
  static int, 0 = unlimited) lets query position i see keys i - window .. i only. `max_runs` (a
  static int, 0 = unknown) bounds the runs of equal segment ids per row, as the packer guarantees
  it: packed cuDNN sizes its per-run state by it.
  """
  window = static_window(window)
  b, t, h, _ = q_BxTxHxDh.shape
  s, kv = k_BxSxKxDh.shape[1], k_BxSxKxDh.shape[2]
  self_attention = (t == s and isinstance(q_offset, int) and q_offset == 0
                    and q_segment_ids is kv_segment_ids)
  if self_attention and window >= t - 1:
    window = 0  # every earlier key is inside the window: plain causal, no mask to apply
  platform, requested = target_platform(), impl
  packed = q_segment_ids is not None
  impl = resolve_impl(impl, q_BxTxHxDh.dtype, platform=platform, self_attention=self_attention, seq_len=t,
                      packed=packed, gpu_capability=_gpu_capability() if platform == "gpu" and packed else None,
                      max_runs=max_runs)
  repeats = sharding.kv_head_repeats(h, kv)
  if repeats > 1:  # q and k/v must shard their heads alike (see lmtiny.parallel.sharding)
    k_BxSxKxDh, v_BxSxKxDh = (sharding.constrain(jnp.repeat(x, repeats, axis=2), ("batch", "seq", "act_kv_heads", None))
                              for x in (k_BxSxKxDh, v_BxSxKxDh))
  out_BxTxHxDh = None
  if impl == "cudnn":
    try:
      out_BxTxHxDh = _cudnn_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_segment_ids, window, max_runs)
    except (AttributeError, ImportError, RuntimeError, TypeError, ValueError, NotImplementedError) as e:
      if requested != "auto":  # asked for by name: the user sees why it cannot run
        raise
      # auto: a cuDNN build or a jax version whose (partly private) API refuses these inputs
      # at trace time costs speed, not the run.
      warnings.warn(f"model.attention=auto: cuDNN attention unavailable ({type(e).__name__}: {e}); using xla")
  elif impl == "splash":
    out_BxTxHxDh = _splash_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_segment_ids, interpret=platform != "tpu",
                                     window=window)
  if out_BxTxHxDh is None and self_attention:
    out_BxTxHxDh = xla_causal_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_segment_ids, window)
  if out_BxTxHxDh is None:
    if q_segment_ids is None:
      q_segment_ids = jnp.ones((b, t), jnp.int32)
    if kv_segment_ids is None:
      kv_segment_ids = jnp.ones((b, s), jnp.int32)
    mask_Bx1xTxS = attention_mask(q_segment_ids, kv_segment_ids, q_offset, window)
    out_BxTxHxDh = xla_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1xTxS)
  return checkpoint_name(out_BxTxHxDh, ATTN_OUT)
