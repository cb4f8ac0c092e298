"""Decoder-only transformer in Flax NNX: RoPE, RMSNorm, GQA, optional QK-norm and logit softcap.

Tensor names carry their shape (B batch, T query length, S key length, D d_model, H query heads,
K kv heads, G = H / K query heads per kv head, Dh head dim, F MLP hidden, V vocab, L layers).
Every parameter carries `logical_axes` metadata; `lmtiny.parallel.sharding` maps those names to mesh
axes, so this file never mentions the mesh. Parameters are stored in float32 and cast to the
compute dtype where they are used.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lmtiny import config as config_lib
from lmtiny.errors import ConfigError
from lmtiny.kernels.fp8 import FP8_OUT, fp8_eligible
from lmtiny.model.attention import attention, ATTN_OUT, ATTN_QKV, reads_head_major, target_platform
from lmtiny.model.quant import QuantizedWeight
from lmtiny.parallel.sharding import (constrain, gathers_weights, sharded_fp8_matmul,
                                     sharded_fused_linear_cross_entropy, sharded_linear_cross_entropy)

Array = jax.Array
# Scalar mixes of bf16 activations (residual scalars, smear, backout, gates, q/k scale) run in
# float32 inside their fusion: a scalar cast to bf16 would make its gradient a sum over B x T x D
# with a bf16 accumulator, and 1.2 as a bf16 constant is 1.203125.
F32 = jnp.float32


def compute_dtype(m) -> Any:
  if m.dtype == "auto":
    return jnp.bfloat16 if jax.default_backend() in ("tpu", "gpu") else jnp.float32
  return jnp.dtype(m.dtype)


# ---------------------------------------------------------------------------------------------
# Initialisers. `fan_in` / `fan_out` are for the matrix as it multiplies (heads flattened).


def loss_kernel(m) -> str:
  """The training loss's kernel (model.loss_kernel): auto = fused on GPU and TPU (the platform
  being compiled for, lmtiny.model.attention.target_platform), chunked on CPU. `pallas` is TPU's
  (Mosaic; interpreted on CPU, for tests): GPU grids cannot run its sequential reductions."""
  kernel = m.loss_kernel
  platform = target_platform()
  if kernel == "auto":
    return "chunked" if platform == "cpu" else "fused"
  if kernel == "pallas" and platform == "gpu":
    raise ConfigError("model.loss_kernel=pallas: its kernels are TPU's (Mosaic) or interpreted on CPU; "
                      "on GPU use fused")
  return kernel


def _fused_impl(kernel: str) -> str:
  """lmtiny.kernels.cross_entropy's fused `impl` for model.loss_kernel fused or pallas."""
  if kernel == "fused":
    return "xla"
  return "interpret" if target_platform() == "cpu" else "mosaic"


def _init_matrix(m, role: str, key, shape, fan_in: int, fan_out: int) -> Array:
  """Initial values for one weight; `role` is embed, lm_head, in (q/k/v, value embeddings), up
  (MLP up/gate), out (o/down) or gate (the value-embedding and smear gates)."""
  scheme = m.init
  if role == "gate":  # small positive weights: gates start slightly above neutral (nanochat)
    return jax.random.uniform(key, shape, minval=0.0, maxval=0.02)
  if scheme in ("nanochat", "nanochat_2026"):
    if role == "embed":  # std 1 (0.8 in 2026), except that a tied table is also the unembedding
      return (m.init_std if m.tie_embeddings else 0.8 if scheme == "nanochat_2026" else 1.0) * jax.random.normal(key, shape)
    if role == "lm_head":
      return 0.001 * jax.random.normal(key, shape)
    if role == "out":  # residual projections start at zero: every block begins as the identity
      return jnp.zeros(shape)
    bound = math.sqrt(3.0 / fan_in)  # uniform with std 1/sqrt(fan_in)
    if role == "up" and scheme == "nanochat_2026":
      bound *= 0.4
    return jax.random.uniform(key, shape, minval=-bound, maxval=bound)
  if role == "embed" or scheme == "gpt2":
    std = m.init_std
    if role == "out" and scheme == "gpt2":  # GPT-2: scale residual projections by 1/sqrt(2L)
      std /= math.sqrt(2 * m.num_layers)
    return std * jax.random.normal(key, shape)
  if scheme == "xavier":
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, minval=-bound, maxval=bound)
  # kaiming (He): std sqrt(2 / fan_in), the gain for ReLU-family nonlinearities.
  return math.sqrt(2.0 / fan_in) * jax.random.normal(key, shape)


def _param(m, rngs: nnx.Rngs, role: str, shape, logical_axes, fan_in: int, fan_out: int) -> nnx.Param:
  value = _init_matrix(m, role, rngs.params(), shape, fan_in, fan_out).astype(jnp.float32)
  return nnx.Param(value, logical_axes=logical_axes)


# ---------------------------------------------------------------------------------------------
# Layers.


def tpu_scheduling_barrier(tree):
  """`tree` behind an optimization barrier when compiling for a TPU; as it is elsewhere.

  The backward's barriers that hold a layer's partial results to that layer (the weight
  gradients, the residual scalars' sums) are for XLA:TPU's scheduler, which otherwise moved them
  to the end of the backward and kept their operands alive until then (see the callers).
  XLA:GPU keeps them in place unaided, and there a barrier only blocks fusion: without them,
  d24_2026 compiled for an H100 adds each micro-step's weight gradients to their sums inside the
  GEMMs and moves 9.4% fewer elementwise bytes, in 0.36 GiB less.
  """
  return jax.lax.optimization_barrier(tree) if target_platform() == "tpu" else tree


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def embed_lookup(table_VxD: Array, tokens_BxT: Array, dtype) -> Array:
  """Rows of the float32 table in the compute dtype, with a float32 gradient.

  The FSDP-sharded table is gathered whole first (ZeRO-3: weights are all-gathered where used; a
  lookup into a D-sharded table would need a costly reshard of its output instead), and it is
  gathered as a compute-dtype copy: under FSDP that all-gather runs in every micro-step, and in
  bf16 it moves half the bytes (d20: 168 MB, not 335). A table held whole (one device, data or
  tensor parallelism) casts only the rows it gathers, not all V x D entries each micro-step. The
  rows are the same either way (cast, then gather = gather, then cast). The gradient scatter-adds
  the rows' cotangents into a float32 table (in bf16, 4,096 unit gradients into one row would sum
  to 256).
  """
  if not gathers_weights():
    return jnp.take(table_VxD, tokens_BxT, axis=0).astype(dtype)
  # The copy pinned to the table's own split first: told only where the copy goes (whole), the
  # partitioner gathered the float32 table and cast it after (d12_2026 on fsdp=8: 7 tables, 672
  # MiB a step, not 336).
  shards_VxD = constrain(table_VxD.astype(dtype), ("embed_vocab", "embed"))
  return jnp.take(constrain(shards_VxD, ("embed_vocab", "act_embed")), tokens_BxT, axis=0)


def _embed_lookup_fwd(table_VxD, tokens_BxT, dtype):
  # The table's row count rides along in an empty [V, 0] array; the table itself is not kept.
  rows_Vx0 = jnp.zeros((table_VxD.shape[0], 0), table_VxD.dtype)
  return embed_lookup(table_VxD, tokens_BxT, dtype), (tokens_BxT, rows_Vx0)


def _embed_lookup_bwd(dtype, residuals, g_BxTxD):
  tokens_BxT, rows_Vx0 = residuals
  d_table_VxD = jnp.zeros((rows_Vx0.shape[0], g_BxTxD.shape[-1]), rows_Vx0.dtype)
  d_table_VxD = d_table_VxD.at[tokens_BxT.reshape(-1)].add(g_BxTxD.reshape(-1, g_BxTxD.shape[-1]).astype(rows_Vx0.dtype))
  return constrain(d_table_VxD, ("embed_vocab", "embed")), None


embed_lookup.defvjp(_embed_lookup_fwd, _embed_lookup_bwd)


@jax.custom_vjp
def residual_mix(resid_lambda: Array, x0_lambda: Array, x_BxTxD: Array, x0_BxTxD: Array) -> Array:
  """resid_lambda * x + x0_lambda * x0, in float32, returned in x's dtype (nanochat 2026's
  per-layer residual scalars).

  Its gradient sums each scalar's B x T x D products while the backward is at this layer. Left
  to autodiff, XLA:TPU fused every layer's two sums into one reduction at the end of the
  backward, which kept each layer's input and cotangent alive until then: two activations a
  layer (d24_2026 on v6e:2x4, fsdp=8, 8 sequences, remat=full: 96 MiB a layer). Here the sums
  over D are taken before the cotangent flows on (on a TPU an optimization barrier ties them to
  it: tpu_scheduling_barrier), and only their [B, T] partial sums wait for the end.
  """
  return (resid_lambda * x_BxTxD.astype(F32) + x0_lambda * x0_BxTxD.astype(F32)).astype(x_BxTxD.dtype)


def _residual_mix_fwd(resid_lambda, x0_lambda, x_BxTxD, x0_BxTxD):
  return residual_mix(resid_lambda, x0_lambda, x_BxTxD, x0_BxTxD), (resid_lambda, x0_lambda, x_BxTxD, x0_BxTxD)


def _residual_mix_bwd(residuals, g_BxTxD):
  resid_lambda, x0_lambda, x_BxTxD, x0_BxTxD = residuals
  g = g_BxTxD.astype(F32)
  partials = (jnp.sum(g * x_BxTxD.astype(F32), axis=-1), jnp.sum(g * x0_BxTxD.astype(F32), axis=-1),
              (resid_lambda * g).astype(x_BxTxD.dtype), (x0_lambda * g).astype(x0_BxTxD.dtype))
  d_resid_BxT, d_x0_BxT, d_x_BxTxD, d_x0_BxTxD = tpu_scheduling_barrier(partials)
  return (jnp.sum(d_resid_BxT).astype(resid_lambda.dtype), jnp.sum(d_x0_BxT).astype(x0_lambda.dtype),
          d_x_BxTxD, d_x0_BxTxD)


residual_mix.defvjp(_residual_mix_fwd, _residual_mix_bwd)


def mix_layer_input(x_BxTxD: Array, scalars: tuple[Array, Array, Array] | None) -> Array:
  """A layer's input after its residual scalars: `scalars` is (resid_lambda, x0_lambda, x0) from
  Transformer.run_layers, or None (no residual scalars: x as is)."""
  return x_BxTxD if scalars is None else residual_mix(scalars[0], scalars[1], x_BxTxD, scalars[2])


class RMSNorm(nnx.Module):
  """RMSNorm in float32; `learned_scale=False` gives the parameter-free variant (nanochat)."""

  def __init__(self, dim: int, *, learned_scale: bool, logical_axis: str, eps: float = 1e-6):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=(logical_axis,)) if learned_scale else None

  def __call__(self, x: Array) -> Array:
    return self.normalize(x.astype(jnp.float32)).astype(x.dtype)

  def normalize(self, x32: Array) -> Array:
    """The norm of a float32 `x32`, in float32 (for callers that go on computing before rounding)."""
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y if self.scale is None else y * self.scale[...]


def dense(x: Array, w: Array, in_dims: int = 1, matmul_dtype: str = "default", logical_axes=None) -> Array:
  """x [..., *in] @ w [*in, *out] -> [..., *out] in x's dtype; w comes as stored (float32, or a
  QuantizedWeight) and the GEMM runs on a copy in x's dtype.

  On CPU and GPU it is one 2-D GEMM over the flattened rows: the weight gradient contracts every
  row dimension, which left as [B, T, ...] XLA:CPU runs by transposing the cotangent and leaving
  its fast GEMM path (3.4x slower measured on the tiny MLP's weight gradient). XLA:TPU gets the
  dimensions as they are, free to lay each out for its consumer: flattened, it copied splash's
  head-major q/k/v gradients into [B*T, H*Dh] rows for the projections' backward GEMMs (822
  against 485 MiB of copies a micro-step in a 2-layer d12_2026 on a v6e, 8 x 2048 tokens).
  `matmul_dtype="fp8"` runs the GEMM in fp8 with tensorwise scales (lmtiny.kernels.fp8) where
  the matrix is big enough for it (nanochat's rule, `fp8_eligible`); `logical_axes` (the weight's)
  tell a mesh how its sides split (lmtiny.parallel.sharding.sharded_fp8_matmul).
  """
  if isinstance(w, QuantizedWeight):  # inference only: dequantized where used
    w = w.astype(x.dtype)
  in_shape, out_shape = w.shape[:in_dims], w.shape[in_dims:]
  lead = x.shape[:x.ndim - in_dims]
  fp8 = matmul_dtype == "fp8" and fp8_eligible(math.prod(in_shape), math.prod(out_shape))
  if not fp8 and target_platform() == "tpu":
    return matmul(x, w, in_dims)
  w_IxO = w.reshape(math.prod(in_shape), math.prod(out_shape))
  x_MxI = x.reshape(math.prod(lead), w_IxO.shape[0])
  if fp8:
    axes = tuple(logical_axes or (None,) * w.ndim)[-w.ndim:]  # a scanned stack's "layers" axis is sliced off
    out_MxO = sharded_fp8_matmul(x_MxI, w_IxO, lead[0] if lead else 1, (axes[0], w.shape[0]),
                                 (axes[in_dims], w.shape[in_dims]))
  else:
    out_MxO = matmul(x_MxI, w_IxO, 1)
  return out_MxO.reshape(*lead, *out_shape)


def _dense_param(x: Array, w: nnx.Param, in_dims: int, matmul_dtype: str) -> Array:
  """`dense` of a weight parameter, its logical axes passed along."""
  return dense(x, w[...], in_dims, matmul_dtype, w.get_metadata().get("logical_axes"))


def _contract(a: Array, b: Array, a_dims: range, b_dims: range, out_dtype=None) -> Array:
  return jax.lax.dot_general(a, b, ((tuple(a_dims), tuple(b_dims)), ((), ())), preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: Array, w: Array, in_dims: int) -> Array:
  """x [*rows, *in] @ w.astype(x.dtype) [*in, *out], with dw in float32 straight from the GEMM's
  accumulator.

  Autodiff through the cast would give dw in the compute dtype: each device's partial weight
  gradient rounded to bf16 and then reduced across the data and FSDP axes in bf16. Here the
  weight-gradient GEMM returns float32 (the accumulator, not a rounding of it), so XLA's
  all-reduce / reduce-scatter of it runs in float32. dx stays in x's dtype.
  """
  return _contract(x, w.astype(x.dtype), range(x.ndim - in_dims, x.ndim), range(in_dims))


def _matmul_fwd(x, w, in_dims):
  w_compute = w.astype(x.dtype)
  out = _contract(x, w_compute, range(x.ndim - in_dims, x.ndim), range(in_dims))
  return out, (x, w_compute, jnp.zeros((0,), w.dtype))


def _matmul_bwd(in_dims, residuals, g):
  x, w_compute, like_0 = residuals
  rows = x.ndim - in_dims
  # The contractions autodiff of x @ w writes (no transposes for XLA to fold away).
  dx = _contract(g, w_compute, range(rows, g.ndim), range(in_dims, w_compute.ndim))
  dw = _contract(x, g, range(rows), range(rows), jnp.float32)
  # On a TPU dx flows on only once dw is formed, so each layer's weight gradient is taken while
  # its operands are at hand. Left free, XLA:TPU's scheduler (without the all-gather fusion, i.e. off
  # a v5e) put every layer's weight-gradient GEMMs at the end of the backward and kept all their
  # operands alive until then (d24-v6e8: 25.06 GiB a chip; 17.04 with this barrier; 18.80 with
  # the fusion and no barrier).
  dx, dw = tpu_scheduling_barrier((dx, dw))
  return dx, dw.astype(like_0.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def rope_tables(positions_BxT: Array, head_dim: int, theta: float, table_len: int) -> tuple[Array, Array]:
  """(cos, sin) [B, T, 1, Dh/2] float32 of the rotary angles of positions 0 <= p < table_len
  (a position out of range gives NaN, loudly), computed once per forward pass for every layer.

  The sines and cosines are a NumPy constant table that the positions index. Computed in the
  graph instead, XLA fuses the sine and cosine into each consumer and recomputes them per head,
  per layer and again in the backward pass (an optimization barrier does not survive XLA:CPU's
  pipeline): 4.2 ms against 0.5 ms per rotation at the tiny config's q shape on CPU. The table
  is computed in float32, as the traced formula was.
  """
  half = head_dim // 2
  freqs_half = (np.float32(theta) ** (-np.arange(half, dtype=np.float32) / np.float32(half))).astype(np.float32)
  angles_PxH = np.arange(table_len, dtype=np.float32)[:, None] * freqs_half[None, :]
  cos_PxH, sin_PxH = (jnp.asarray(fn(angles_PxH), jnp.float32) for fn in (np.cos, np.sin))
  return tuple(jnp.take(table, positions_BxT, axis=0, mode="fill", fill_value=jnp.nan)[:, :, None, :]
               for table in (cos_PxH, sin_PxH))


def apply_rope(x_BxTxNxDh: Array, tables: tuple[Array, Array]) -> Array:
  """Rotary embedding, rotating the first half of each head against the second half; the tables
  broadcast against x ([B, T, 1, Dh/2] for tokens before heads, swapped for heads first)."""
  return rotate(x_BxTxNxDh.astype(jnp.float32), tables).astype(x_BxTxNxDh.dtype)


def rotate(x32: Array, tables: tuple[Array, Array]) -> Array:
  """apply_rope in float32, unrounded."""
  cos, sin = tables
  x1, x2 = jnp.split(x32, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rope(x_BxTxNxDh: Array, positions_BxT: Array, theta: float, table_len: int) -> Array:
  return apply_rope(x_BxTxNxDh, rope_tables(positions_BxT, x_BxTxNxDh.shape[-1], theta, table_len))


class Attention(nnx.Module):
  """Self-attention of layer `layer`: its window (config.layer_windows) and, on value-embedding
  layers (config.has_value_embed), a [V, K*Dh] table whose rows are added to v through a gate
  of 3 * sigmoid per kv head, driven by the first config_lib.VE_GATE_CHANNELS channels of the input
  (ResFormer-style value residuals, as nanochat)."""

  def __init__(self, m, rngs: nnx.Rngs, layer: int = 0):
    self.cfg = m
    d, h, k, dh = m.d_model, m.num_heads, config_lib.num_kv_heads(m), config_lib.head_dim(m)
    self.window = config_lib.layer_windows(m)[layer]
    self.matmul_dtype = m.matmul_dtype
    self.q = _param(m, rngs, "in", (d, h, dh), ("embed", "heads", "head_dim"), d, h * dh)
    self.k = _param(m, rngs, "in", (d, k, dh), ("embed", "kv_heads", "head_dim"), d, k * dh)
    self.v = _param(m, rngs, "in", (d, k, dh), ("embed", "kv_heads", "head_dim"), d, k * dh)
    self.o = _param(m, rngs, "out", (h, dh, d), ("heads", "head_dim", "embed"), h * dh, d)
    if m.qk_norm:
      self.q_norm = RMSNorm(dh, learned_scale=m.norm_scale, logical_axis="head_dim", eps=m.norm_eps)
      self.k_norm = RMSNorm(dh, learned_scale=m.norm_scale, logical_axis="head_dim", eps=m.norm_eps)
    else:
      self.q_norm = self.k_norm = None
    if config_lib.has_value_embed(m, layer):
      v_rows = config_lib.padded_vocab(m)  # the table is uniform like v's weights (fan-in d)
      # [V, K*Dh], laid out and sharded like the token embedding (a lookup table, not a matrix)
      self.value_embed = _param(m, rngs, "in", (v_rows, k * dh), ("embed_vocab", "embed"), d, k * dh)
      self.ve_gate = _param(m, rngs, "gate", (config_lib.VE_GATE_CHANNELS, k), ("gate_in", "kv_heads"), config_lib.VE_GATE_CHANNELS, k)
    else:
      self.value_embed = self.ve_gate = None

  def value_rows(self, tokens_BxT: Array, dtype) -> Array | None:
    """This layer's value-embedding rows of `tokens_BxT`, [B, T, K, Dh] in `dtype` (None on a layer
    without value embeddings)."""
    if self.value_embed is None:
      return None
    rows_BxTxKDh = embed_lookup(self.value_embed[...].astype(jnp.float32), tokens_BxT, dtype)
    return rows_BxTxKDh.reshape(*tokens_BxT.shape, config_lib.num_kv_heads(self.cfg), config_lib.head_dim(self.cfg))

  def project_qkv(self, x_BxTxD: Array, rope_BxT: tuple[Array, Array], ve_BxTxKxDh: Array | None = None):
    """Queries, keys and values with QK-norm and RoPE (`rope_tables`) applied, and on
    value-embedding layers the rows `ve_BxTxKxDh` (`value_rows`) mixed into v (also used by the
    KV-cache decoder)."""
    dtype = x_BxTxD.dtype
    q_BxTxHxDh = self._dense(x_BxTxD, self.q)
    k_BxTxKxDh = self._dense(x_BxTxD, self.k)
    v_BxTxKxDh = self._dense(x_BxTxD, self.v)
    if self.value_embed is not None:
      gate_BxTxK = 3 * jax.nn.sigmoid(dense(x_BxTxD[..., :config_lib.VE_GATE_CHANNELS], self.ve_gate[...]).astype(F32))
      v_BxTxKxDh = (v_BxTxKxDh.astype(F32) + gate_BxTxK[..., None] * ve_BxTxKxDh.astype(F32)).astype(dtype)
    # QK-norm and RoPE run in the layout the attention kernel reads (only the layout differs: the
    # values are the same). Splash reads heads major; left token-major, XLA:TPU relayouts each
    # float32 q/k up to three times around the norm's reduction over Dh (2,461 against 822 MiB of
    # copies a micro-step in a 2-layer d12_2026 on a v6e, tests/training/test_lowering.py).
    head_major = reads_head_major(self.cfg.attention, dtype, x_BxTxD.shape[1])
    to_kernel = (lambda x: x.swapaxes(1, 2)) if head_major else (lambda x: x)
    q, k = self._norm_scale_rotate(to_kernel(q_BxTxHxDh), to_kernel(k_BxTxKxDh), tuple(map(to_kernel, rope_BxT)))
    q_BxTxHxDh = constrain(to_kernel(q), ("batch", "seq", "act_heads", None))  # swapaxes undoes itself
    k_BxTxKxDh = constrain(to_kernel(k), ("batch", "seq", "act_kv_heads", None))
    v_BxTxKxDh = constrain(v_BxTxKxDh, ("batch", "seq", "act_kv_heads", None))
    return q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh

  def _norm_scale_rotate(self, q: Array, k: Array, tables: tuple[Array, Array]) -> tuple[Array, Array]:
    """QK-norm, RoPE and the q/k scale of q and k, heads and tokens in either order (Dh last), in
    float32 and rounded once at the end. XLA:GPU then reads q and k twice, for the norm's sums and
    for one kernel that normalises, rotates, scales and rounds them; rounded at each stage (RoPE
    before a weightless norm, as nanochat orders them), it also wrote the rotated halves for the
    norm's kernels to read: +2.9% of d24_2026's elementwise bytes (lmtiny.training.kernel_roofline).
    The norm comes first: a learned scale does not commute with the rotation, and a weightless norm
    does (a rotation keeps each head's RMS)."""
    return self._qk(q, self.q_norm, tables), self._qk(k, self.k_norm, tables)

  def _qk(self, y: Array, norm: RMSNorm | None, tables: tuple[Array, Array]) -> Array:
    y32 = y.astype(F32)
    y32 = rotate(y32 if norm is None else norm.normalize(y32), tables)
    # 1.2 as a bf16 constant would be 1.203125: the scale multiplies in float32 (1.0 exactly)
    return (y32 * self.cfg.qk_scale).astype(y.dtype)

  def _dense(self, x: Array, w: nnx.Param, in_dims: int = 1) -> Array:
    return _dense_param(x, w, in_dims, self.matmul_dtype)

  def project_out(self, out_BxTxHxDh: Array) -> Array:
    out_BxTxD = self._dense(out_BxTxHxDh, self.o, in_dims=2)
    return constrain(out_BxTxD, ("batch", "seq", "act_embed"))

  def __call__(self, x_BxTxD: Array, rope_BxT: tuple[Array, Array], segment_ids_BxT: Array | None,
               ve_BxTxKxDh: Array | None = None, max_runs: int = 0) -> Array:
    q, k, v = (checkpoint_name(x, ATTN_QKV) for x in self.project_qkv(x_BxTxD, rope_BxT, ve_BxTxKxDh))
    out_BxTxHxDh = attention(q, k, v, q_segment_ids=segment_ids_BxT, kv_segment_ids=segment_ids_BxT,
                             impl=self.cfg.attention, max_runs=max_runs, **self.window_kwargs())
    return self.project_out(out_BxTxHxDh)

  def window_kwargs(self) -> dict:
    """attention()'s window argument, passed only for windowed layers (full layers build the same
    program as before windows existed)."""
    return {"window": self.window} if self.window else {}


@jax.custom_vjp
def relu2(x: Array) -> Array:
  """relu(x)², whose backward reads only its output: 2 relu(x) = 2 sqrt(relu(x)²).

  The down projection's weight gradient keeps the output anyway, so the pre-activation (the up
  projection's output, as large) need not be kept too, as autodiff kept it: d12_2026 as it ships
  (remat none) compiled for an H100 takes 21.50 GiB instead of 25.85, and d24_2026 kept whole at
  16 sequences 52.98 instead of 58.17. The backward rounds sqrt(y) to the activation dtype, which
  gives back relu(x) exactly (every bf16 whose square neither overflows nor underflows), then
  multiplies as nanochat's bf16 backward does, g * (2 relu(x)) rounded once: the same bits.
  Computed in float32 and rounded once at the end, 12.5% of the positive elements came out a
  rounding away (the square's rounding, carried through the root).
  """
  return jnp.square(jax.nn.relu(x))


def _relu2_fwd(x):
  y = relu2(x)
  return y, y


def _relu2_bwd(y, g):
  # The root in float32: XLA rewrites sqrt(r * r) to r, which would keep relu's output alive too.
  relu_x = jnp.sqrt(y.astype(F32)).astype(y.dtype)
  return (g.astype(y.dtype) * (2 * relu_x),)


relu2.defvjp(_relu2_fwd, _relu2_bwd)


ACTIVATIONS = {
    "relu2": relu2,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


class MLP(nnx.Module):

  def __init__(self, m, rngs: nnx.Rngs):
    d, f = m.d_model, config_lib.mlp_dim(m)
    self.activation = m.activation
    self.matmul_dtype = m.matmul_dtype
    self.up = _param(m, rngs, "up", (d, f), ("embed", "mlp"), d, f)
    self.gate = _param(m, rngs, "up", (d, f), ("embed", "mlp"), d, f) if m.activation == "swiglu" else None
    self.down = _param(m, rngs, "out", (f, d), ("mlp", "embed"), f, d)

  def __call__(self, x_BxTxD: Array) -> Array:
    up_BxTxF = self._dense(x_BxTxD, self.up)
    if self.gate is not None:
      hidden_BxTxF = jax.nn.silu(self._dense(x_BxTxD, self.gate)) * up_BxTxF
    else:
      hidden_BxTxF = ACTIVATIONS[self.activation](up_BxTxF)
    hidden_BxTxF = constrain(hidden_BxTxF, ("batch", "seq", "act_mlp"))
    return constrain(self._dense(hidden_BxTxF, self.down), ("batch", "seq", "act_embed"))

  def _dense(self, x: Array, w: nnx.Param) -> Array:
    return _dense_param(x, w, 1, self.matmul_dtype)


class Block(nnx.Module):

  def __init__(self, m, rngs: nnx.Rngs, layer: int = 0):
    self.attn_norm = RMSNorm(m.d_model, learned_scale=m.norm_scale, logical_axis="norm", eps=m.norm_eps)
    self.attn = Attention(m, rngs, layer)
    self.mlp_norm = RMSNorm(m.d_model, learned_scale=m.norm_scale, logical_axis="norm", eps=m.norm_eps)
    self.mlp = MLP(m, rngs)

  def __call__(self, x_BxTxD: Array, rope_BxT: tuple[Array, Array], segment_ids_BxT: Array | None,
               ve_BxTxKxDh: Array | None = None, max_runs: int = 0) -> Array:
    x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD), rope_BxT, segment_ids_BxT, ve_BxTxKxDh, max_runs)
    return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))


_POLICIES = jax.checkpoint_policies
_SAVE_ATTN_OUT = _POLICIES.save_only_these_names(ATTN_OUT)
# The dot policies keep an fp8 GEMM's output (in the compute dtype) by name too (lmtiny.kernels.fp8).
_SAVE_ATTN_OUT_FP8_OUT = _POLICIES.save_only_these_names(ATTN_OUT, FP8_OUT)
_SAVE_WEIGHT_GEMMS = _POLICIES.save_from_both_policies(_POLICIES.dots_with_no_batch_dims_saveable,
                                                      _SAVE_ATTN_OUT_FP8_OUT)
# What each model.remat policy keeps for the backward pass of a block (the block input is always
# kept); the rest is recomputed. Every policy but `full` keeps the attention output under its
# checkpoint name, and with it a fused kernel's residuals (logsumexp), so cuDNN or splash runs
# its forward once. "none" (no jax.checkpoint at all) keeps everything.
REMAT_POLICIES = {
    "full": None,                        # nothing: the whole block, attention included, reruns
    "save_attn_out": _SAVE_ATTN_OUT,     # attention output [B,T,H,Dh]
    "save_qkv": _POLICIES.save_only_these_names(ATTN_QKV, ATTN_OUT),  # + q, k, v after RoPE
    # + every weight-matmul output (no batch dims; MaxText's "minimal"): only norms, RoPE and
    # activations are recomputed. dots_no_batch is its former name, kept.
    "minimal": _SAVE_WEIGHT_GEMMS,
    "dots_no_batch": _SAVE_WEIGHT_GEMMS,
    # + batched matmuls too: on the xla backend that is the [B,K,G,T,S] attention scores.
    "dots": _POLICIES.save_from_both_policies(_POLICIES.dots_saveable, _SAVE_ATTN_OUT_FP8_OUT),
}


def _stacked_blocks(m, rngs: nnx.Rngs) -> Block:
  """One Block whose parameters carry a leading layer axis, for lax.scan over depth."""
  keys = jax.random.split(rngs.params(), m.num_layers)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Block(m, nnx.Rngs(0))))
  stacked = jax.vmap(lambda key: nnx.split(Block(m, nnx.Rngs(key)))[1])(keys)
  blocks = nnx.merge(graphdef, stacked)
  for _, var in nnx.iter_graph(blocks):
    if isinstance(var, nnx.Variable):
      var.set_metadata("logical_axes", ("layers",) + tuple(var.get_metadata()["logical_axes"]))
  return blocks


class _Draws:
  """Stands in for nnx.Rngs while a Block is built: the i-th key is fold_in(key, start + i), the
  key nnx.Rngs' params stream hands out at count start + i. Counts its draws."""

  def __init__(self, key, start):
    self.key, self.start, self.drawn = key, start, 0

  def params(self):
    key = jax.random.fold_in(self.key, self.start + self.drawn)
    self.drawn += 1
    return key


def _blocks_drawn_together(m, rngs: nnx.Rngs) -> list[Block]:
  """[Block(m, rngs, layer) for each layer], the same values, but the layers whose parameters
  have the same shapes draw them under one vmap: the init program holds one threefry draw per
  kind of parameter, not one per layer and kind. XLA:CPU compiled tiny_2026's init in 1.67 s
  instead of 2.07 (at LLVM -O0, the tests' setting: tiny's in 0.66 s instead of 1.51). A layer's
  index shapes its parameters (value embeddings) but not their values, which come from the keys
  its turn in the stream gives it."""
  stream = rngs.params
  key, start = stream.key[...], stream.count[...]
  graphdefs, starts, by_shape, drawn = [], [], {}, 0
  for layer in range(m.num_layers):
    draws = _Draws(key, 0)
    graphdef, state = nnx.split(nnx.eval_shape(lambda layer=layer, draws=draws: Block(m, draws, layer)))
    graphdefs.append(graphdef)
    starts.append(drawn)
    drawn += draws.drawn
    shapes = tuple((x.shape, x.dtype) for x in jax.tree.leaves(state))
    by_shape.setdefault((jax.tree.structure(state), shapes), []).append(layer)
  blocks = [None] * m.num_layers
  for group in by_shape.values():
    offsets = start + jnp.asarray([starts[layer] for layer in group], start.dtype)
    stacked = jax.vmap(lambda s, first=group[0]: nnx.split(Block(m, _Draws(key, s), first))[1])(offsets)
    for i, layer in enumerate(group):
      blocks[layer] = nnx.merge(graphdefs[layer], jax.tree.map(lambda x, i=i: x[i], stacked))
  stream.count[...] = start + drawn
  return blocks


class Transformer(nnx.Module):
  """tokens [B, T] -> logits [B, T, V] in float32."""

  def __init__(self, m, rngs: nnx.Rngs):
    config_lib.validate_model(m)
    self.cfg = m = ml_collections.FrozenConfigDict(m)  # hashable: the GraphDef can be a jit static
    d, v = m.d_model, config_lib.padded_vocab(m)
    self.embed = _param(m, rngs, "embed", (v, d), ("embed_vocab", "embed"), d, d)
    if m.scan_layers:
      self.layers = _stacked_blocks(m, rngs)
    else:
      self.layers = nnx.List(_blocks_drawn_together(m, rngs))
    self._init_block_scalars(m, rngs)
    self.final_norm = RMSNorm(d, learned_scale=m.norm_scale, logical_axis="norm", eps=m.norm_eps)
    self.embed_norm = (RMSNorm(d, learned_scale=m.norm_scale, logical_axis="norm", eps=m.norm_eps)
                       if m.embed_norm else None)
    self.lm_head = None if m.tie_embeddings else _param(m, rngs, "lm_head", (d, v), ("embed", "vocab"), d, v)

  def _init_block_scalars(self, m, rngs: nnx.Rngs) -> None:
    """nanochat 2026's learned scalars, each only when its knob is on: per-layer residual and
    input-mixing weights (stronger residual and more input early, their depth schedules), the
    smear gate and weight (smear starts off), and the backout weight (0.2)."""
    depth = jnp.arange(m.num_layers, dtype=jnp.float32) / max(m.num_layers - 1, 1)
    residual, smear, backout = m.residual_scalars, m.smear, m.backout
    self.resid_lambdas = nnx.Param(1.15 - 0.10 * depth, logical_axes=("layers",)) if residual else None
    self.x0_lambdas = nnx.Param(0.20 - 0.15 * depth, logical_axes=("layers",)) if residual else None
    self.smear_gate = (_param(m, rngs, "gate", (config_lib.SMEAR_CHANNELS, 1), ("gate_in", None), config_lib.SMEAR_CHANNELS, 1)
                       if smear else None)
    self.smear_lambda = nnx.Param(jnp.zeros((1,), jnp.float32), logical_axes=(None,)) if smear else None
    self.backout_lambda = nnx.Param(jnp.full((1,), 0.2, jnp.float32), logical_axes=(None,)) if backout else None

  def smear(self, x_BxTxD: Array, positions_BxT: Array, previous_Bx1xD: Array | None = None) -> Array:
    """x[t] += smear_lambda * sigmoid(x[t, :config_lib.SMEAR_CHANNELS] @ smear_gate) * x[t - 1] at every
    position > 0 of a document (packed rows restart their positions, so a document's first token
    takes nothing from the one before it). `previous_Bx1xD` is the embedding before the first
    token (the KV-cache decoder's last token); None = zeros."""
    if previous_Bx1xD is None:
      previous_Bx1xD = jnp.zeros_like(x_BxTxD[:, :1])
    x_prev_BxTxD = jnp.concatenate([previous_Bx1xD.astype(x_BxTxD.dtype), x_BxTxD[:, :-1]], axis=1)
    gate_BxTx1 = self.smear_lambda[...] * jax.nn.sigmoid(
        dense(x_BxTxD[..., :config_lib.SMEAR_CHANNELS], self.smear_gate[...]).astype(F32))
    mixed_BxTxD = jnp.where(positions_BxT[..., None] > 0, gate_BxTx1 * x_prev_BxTxD.astype(F32), 0)
    return (x_BxTxD.astype(F32) + mixed_BxTxD).astype(x_BxTxD.dtype)

  def run_layers(self, x_BxTxD: Array, run_layer: Callable[[int, Block, Array, Any], Array]) -> Array:
    """The trunk: each layer's `run_layer(i, block, x, scalars)`, which applies
    `mix_layer_input(x, scalars)` (nanochat 2026's residual scalars: resid_lambdas[i] * x +
    x0_lambdas[i] * x0, x0 the embedded input; None without them) before the block (the trainer
    does inside the layer's remat region, so the backward keeps one activation a layer, not the
    mix's input and output), then backout (minus backout_lambda x the output of layer L // 2)
    where on. Unrolled layers only."""
    # x0 is formed once and kept in the compute dtype. Left free, XLA:GPU fused the embedding's
    # norm and smear into every layer's residual mix, each kernel reading the float32 rows again
    # (d12_2026 for an H100: 2.1 GiB more memory; d24_2026: 2.3% more elementwise bytes).
    x_BxTxD = x0_BxTxD = jax.lax.optimization_barrier(x_BxTxD)
    dtype, backout_BxTxD = x_BxTxD.dtype, None
    for i, block in enumerate(self.layers):
      scalars = None if self.resid_lambdas is None else (self.resid_lambdas[i], self.x0_lambdas[i], x0_BxTxD)
      x_BxTxD = run_layer(i, block, x_BxTxD, scalars)
      if i == self.cfg.num_layers // 2:
        backout_BxTxD = x_BxTxD
    if self.backout_lambda is not None:
      x_BxTxD = (x_BxTxD.astype(F32) - self.backout_lambda[...] * backout_BxTxD.astype(F32)).astype(dtype)
    return x_BxTxD

  def embed_tokens(self, tokens_BxT: Array) -> Array:
    # (.astype(float32) is free on the float32 table; a quantized tied table dequantizes here.)
    x_BxTxD = embed_lookup(self.embed[...].astype(jnp.float32), tokens_BxT, compute_dtype(self.cfg))
    if self.embed_norm is not None:
      x_BxTxD = self.embed_norm(x_BxTxD)
    return constrain(x_BxTxD, ("batch", "seq", "act_embed"))

  def unembed_weight(self, dtype=None) -> Array:
    """[D, V] in `dtype`, or as stored for the loss kernels (None: they cast it themselves, so its
    gradient stays float32); the padded rows of model.vocab_multiple are cropped off (they never
    get a logit, so they get no gradient either)."""
    w_DxV = self.embed[...].T if self.lm_head is None else self.lm_head[...]
    if isinstance(w_DxV, QuantizedWeight):
      w_DxV = w_DxV.astype(dtype or jnp.float32)
    if w_DxV.shape[1] != self.cfg.vocab_size:
      w_DxV = w_DxV[:, :self.cfg.vocab_size]
    return w_DxV if dtype is None else w_DxV.astype(dtype)

  def unembed(self, x_BxTxD: Array) -> Array:
    x_BxTxD = self.final_norm(x_BxTxD)
    logits_BxTxV = jnp.einsum("btd,dv->btv", x_BxTxD, self.unembed_weight(x_BxTxD.dtype),
                              preferred_element_type=jnp.float32)
    if self.cfg.logit_softcap > 0:
      cap = self.cfg.logit_softcap
      logits_BxTxV = cap * jnp.tanh(logits_BxTxV / cap)
    return constrain(logits_BxTxV, ("batch", "seq", "act_vocab"))

  def __call__(self, tokens_BxT: Array, positions_BxT: Array | None = None,
               segment_ids_BxT: Array | None = None) -> Array:
    return self.unembed(self.hidden(tokens_BxT, positions_BxT, segment_ids_BxT))

  def token_losses(self, tokens_BxT: Array, targets_BxT: Array, positions_BxT: Array | None = None,
                   segment_ids_BxT: Array | None = None, max_runs: int = 0) -> tuple[Array, Array]:
    """Per-token (cross-entropy, logsumexp) [B, T] in float32 for the trainer: the lm_head GEMM
    runs in the compute dtype over chunks of model.loss_chunk_tokens tokens (lmtiny.kernels.cross_entropy), so
    the [B, T, V] logits never exist. Same values as cross-entropy of `self(tokens)`."""
    x_BxTxD = self.final_norm(self.hidden(tokens_BxT, positions_BxT, segment_ids_BxT, max_runs))
    return sharded_linear_cross_entropy(x_BxTxD, self.unembed_weight(), targets_BxT, **self._loss_options())

  def _loss_options(self) -> dict:
    return dict(softcap=self.cfg.logit_softcap, chunk_tokens=self.cfg.loss_chunk_tokens,
                fp8=config_lib.fp8_lm_head(self.cfg) and fp8_eligible(self.cfg.d_model, self.cfg.vocab_size))

  def loss_terms(self, tokens_BxT: Array, targets_BxT: Array, positions_BxT: Array | None,
                 segment_ids_BxT: Array | None, ce_weights_BxT: Array, z_weights_BxT: Array, max_runs: int = 0):
    """(objective, cross-entropy [B, T], logsumexp [B, T]) for training, with objective =
    sum(ce_weights * ce) + sum(z_weights * lse^2). model.loss_kernel picks the kernel: `fused`
    forms the gradient in the forward pass (three GEMMs; lmtiny.kernels.cross_entropy), `chunked`
    is today's loss (four GEMMs under a gradient; the reference), `auto` = fused on GPU and TPU,
    chunked on CPU; `pallas` is the fused loss with its logits kept on chip (TPU). Only the
    objective is to be differentiated. `max_runs`: as `hidden`."""
    kernel = loss_kernel(self.cfg)
    if kernel in ("fused", "pallas"):
      x_BxTxD = self.final_norm(self.hidden(tokens_BxT, positions_BxT, segment_ids_BxT, max_runs))
      return sharded_fused_linear_cross_entropy(x_BxTxD, self.unembed_weight(), targets_BxT, ce_weights_BxT,
                                        z_weights_BxT, impl=_fused_impl(kernel), **self._loss_options())
    ce_BxT, lse_BxT = self.token_losses(tokens_BxT, targets_BxT, positions_BxT, segment_ids_BxT, max_runs)
    objective = jnp.sum(ce_BxT * ce_weights_BxT) + jnp.sum(jnp.square(lse_BxT) * z_weights_BxT)
    return objective, ce_BxT, lse_BxT

  def rope_tables(self, positions_BxT: Array) -> tuple[Array, Array]:
    """RoPE tables for positions below max(model.max_seq_len, T) (packed rows restart theirs)."""
    table_len = max(self.cfg.max_seq_len, positions_BxT.shape[1])
    return rope_tables(positions_BxT, config_lib.head_dim(self.cfg), self.cfg.rope_theta, table_len)

  def hidden(self, tokens_BxT: Array, positions_BxT: Array | None = None,
             segment_ids_BxT: Array | None = None, max_runs: int = 0) -> Array:
    """The last block's output [B, T, D] (before the final norm). `max_runs` (static, 0 = none
    known) is the packer's bound on runs of equal segment ids per row (lmtiny.model.attention)."""
    b, t = tokens_BxT.shape
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    # segment_ids_BxT None: one document per row (a fused kernel then needs only its causal mask).
    x_BxTxD = self.embed_tokens(tokens_BxT)
    if self.smear_gate is not None:
      x_BxTxD = self.smear(x_BxTxD, positions_BxT)
    rope_BxT = self.rope_tables(positions_BxT)

    def run_block(block_graphdef, block_state, x, ve_BxTxKxDh, scalars=None):
      x = mix_layer_input(x, scalars)
      return nnx.merge(block_graphdef, block_state)(x, rope_BxT, segment_ids_BxT, ve_BxTxKxDh, max_runs)

    if self.cfg.remat != "none":
      # Under scan the loop boundary already stops XLA from merging recompute into the forward.
      run_block = jax.checkpoint(run_block, policy=REMAT_POLICIES[self.cfg.remat], static_argnums=(0,),
                                 prevent_cse=not self.cfg.scan_layers)
    if self.cfg.scan_layers:
      graphdef, stacked_state = nnx.split(self.layers)
      x_BxTxD, _ = jax.lax.scan(lambda x, st: (run_block(graphdef, st, x, None), None), x_BxTxD, stacked_state)
      return x_BxTxD
    # A layer's value-embedding rows are looked up outside its remat region, once per micro-step:
    # the backward takes them as saved inputs instead of gathering them again (under FSDP, instead
    # of all-gathering the whole table a second time).
    return self.run_layers(x_BxTxD, lambda _, block, x, scalars: run_block(
        *nnx.split(block), x, block.attn.value_rows(tokens_BxT, x.dtype), scalars))


# Logical axes of weight matrices (what multiplies activations); a parameter with two or more of
# them is a matrix. Norm scales ("norm", or a lone "head_dim") and the token embedding table
# ("embed_vocab") are not, stacked under a leading "layers" axis or not.
MATRIX_AXES = frozenset({"embed", "heads", "kv_heads", "mlp", "head_dim", "vocab"})


def path_names(path) -> list[str]:
  """The names along a pytree or nnx path (a DictKey's key, a GetAttrKey's name, else the entry),
  without nnx's `value` leaf: ["layers", "0", "attn", "q"]."""
  return [n for n in (str(getattr(k, "key", getattr(k, "name", k))) for k in path) if n != "value"]


def is_matrix(logical_axes) -> bool:
  axes = tuple(logical_axes or ())
  return "norm" not in axes and "embed_vocab" not in axes and sum(a in MATRIX_AXES for a in axes) >= 2


def cast_params(params, dtype):
  """Weight matrices cast to the compute dtype; the embedding table and norm scales stay float32
  (the lookup gathers from float32, see embed_tokens). The trainer does this once per step and
  the sampler once per generate call, so the model's own `.astype(dtype)` calls are no-ops, not
  a cast per micro-step or per decoded token. Gradients flow through the cast to the float32
  master weights."""
  dtype = jnp.dtype(dtype)

  def cast(v):
    if (isinstance(v, nnx.Variable) and is_matrix(v.get_metadata().get("logical_axes"))
        and not isinstance(v.get_value(), QuantizedWeight)):  # dequantizes in the compute dtype where used
      return jax.tree.map(lambda x: x.astype(dtype), v)
    return v

  return jax.tree.map(cast, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_model(m) -> Transformer:
  """The model with ShapeDtypeStruct parameters: no memory, no FLOPs."""
  return nnx.eval_shape(lambda: Transformer(m, nnx.Rngs(0)))


def count_params(m) -> int:
  """Parameter count of the real model (abstract init); lmtiny.arch must agree with it."""
  state = nnx.state(abstract_model(m), nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
