"""Weight-only quantization for inference: per-output-channel int8 and group-wise int4.

  model = quantize_model(model, "int8")                 # or "int4", group_size=64
  Sampler(model).generate(...)                           # sampling as usual; KV cache in compute dtype

Every weight that feeds a matmul (q, k, v, o, gate, up, down, lm_head, and the embedding table
when it is tied, since it is then the unembedding) becomes a `QuantizedWeight`: integer values
plus float32 scales, symmetric, one scale per output channel and per group of `group_size`
consecutive input (contraction) rows; int8 defaults to one group spanning the whole contraction
(per-channel), int4 to groups of 64. int4 values in [-7, 7] are packed two to a byte. An untied
embedding table is a lookup, not a matmul, and stays in float32; norms stay in float32.

The model code reads each weight as `param[...].astype(dtype)`; a QuantizedWeight answers that
by dequantizing inside the jitted program (integer -> compute dtype, times the scales, in front
of the einsum that consumes it), so no model change is needed and only the integer weights live
in memory between calls. `.T` (the tied unembedding) works too.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmtiny.errors import UserError

MODES = ("int8", "int4")
DEFAULT_GROUP = {"int8": 0, "int4": 64}  # 0: one group over the whole contraction (per channel)
QMAX = {8: 127, 4: 7}
# parameter name -> its contraction axes (the rest are output channels)
CONTRACTION_AXES = {"q": (0,), "k": (0,), "v": (0,), "o": (0, 1), "gate": (0,), "up": (0,), "down": (0,),
                    "lm_head": (0,)}
TIED_EMBED_AXES = (1,)  # embed [V, D] is used as embed.T [D, V]: it contracts over D


class QuantizeError(UserError):
  """A quantization request that cannot be met (unknown mode, group size that does not divide)."""


def check_flags(quantize: str, group_size: int | None) -> None:
  """--group-size means something only with --quantize: alone it would be silently ignored."""
  if group_size is not None and quantize == "none":
    raise QuantizeError(f"--group-size={group_size}: only applies with --quantize int8|int4")


@jax.tree_util.register_pytree_node_class
class QuantizedWeight:
  """A weight of logical shape `shape` stored as integers [..., G, g, N] (int4: [..., G, g/2, N]
  packed uint8) and float32 scales [..., G, 1, N]: C = prod(contraction dims) = G * g rows, N =
  prod(output dims) columns. Leading `...` dims are a scan-stacked layer axis."""

  def __init__(self, values, scales, *, shape, contract, bits, perm=None):
    self.values, self.scales = values, scales
    self.logical_shape, self.contract, self.bits = tuple(shape), tuple(contract), bits
    self.perm = perm  # an axis permutation applied after dequantization (from .T)

  def tree_flatten(self):
    return (self.values, self.scales), (self.logical_shape, self.contract, self.bits, self.perm)

  @classmethod
  def tree_unflatten(cls, aux, children):
    shape, contract, bits, perm = aux
    return cls(*children, shape=shape, contract=contract, bits=bits, perm=perm)

  @property
  def shape(self):
    return self.logical_shape if self.perm is None else tuple(self.logical_shape[i] for i in self.perm)

  @property
  def ndim(self):
    return len(self.logical_shape)

  @property
  def dtype(self):
    return jnp.dtype(jnp.float32)

  @property
  def nbytes(self) -> int:
    return int(self.values.nbytes + self.scales.nbytes)

  def __getitem__(self, index):
    if index is not Ellipsis:
      raise TypeError("a QuantizedWeight supports only [...]")
    return self

  @property
  def T(self):
    perm = tuple(range(self.ndim))[::-1] if self.perm is None else tuple(self.perm)[::-1]
    return QuantizedWeight(self.values, self.scales, shape=self.logical_shape, contract=self.contract,
                           bits=self.bits, perm=perm)

  def astype(self, dtype):
    """The dequantized weight in `dtype` (traced: this runs inside the caller's jit)."""
    values = self.values
    if self.bits == 4:
      values = unpack_int4(values)
    w = values.astype(dtype) * self.scales.astype(dtype)
    return _from_canonical(w, self.logical_shape, self.contract, self.perm)

  def __repr__(self):
    return f"QuantizedWeight(int{self.bits}, shape={self.shape}, groups={self.scales.shape[-3]})"


def _canonical_order(ndim: int, contract) -> list[int]:
  return list(contract) + [a for a in range(ndim) if a not in contract]


def _from_canonical(w, shape, contract, perm):
  """[..., G, g, N] -> the weight's own layout (then `perm`)."""
  lead = w.shape[:-3]
  order = _canonical_order(len(shape), contract)
  w = w.reshape(lead + tuple(shape[a] for a in order))
  n = len(lead)
  w = jnp.transpose(w, tuple(range(n)) + tuple(n + order.index(a) for a in range(len(shape))))
  if perm is not None:
    w = jnp.transpose(w, tuple(range(n)) + tuple(n + p for p in perm))
  return w


def pack_int4(q: np.ndarray) -> np.ndarray:
  """int8 values in [-8, 7], shape [..., g, N] with g even -> uint8 [..., g/2, N] (low nibble first)."""
  lo, hi = q[..., 0::2, :], q[..., 1::2, :]
  return ((lo.astype(np.uint8) & 0xF) | ((hi.astype(np.uint8) & 0xF) << 4)).astype(np.uint8)


def unpack_int4(p):
  """The inverse of pack_int4 (works on NumPy and traced JAX arrays)."""
  lo = (p & 0xF).astype(jnp.int8)
  hi = (p >> 4).astype(jnp.int8)
  lo, hi = lo - 16 * (lo >= 8).astype(jnp.int8), hi - 16 * (hi >= 8).astype(jnp.int8)
  both = jnp.stack([lo, hi], axis=-2)  # [..., g/2, 2, N]
  return both.reshape(both.shape[:-3] + (2 * both.shape[-3], both.shape[-1]))


def quantize_array(w: np.ndarray, contract, bits: int, group_size: int, name: str = "weight",
                   stacked: bool = False) -> QuantizedWeight:
  """Symmetric quantization of one weight (a float NumPy array; `stacked`: it carries a leading
  scan-stacked layer axis that `contract` does not count)."""
  w = np.asarray(w, np.float32)
  lead = w.shape[:1] if stacked else ()
  shape = w.shape[1:] if stacked else w.shape
  order = _canonical_order(len(shape), contract)
  c = math.prod(shape[a] for a in contract)
  n = math.prod(shape) // c
  g = group_size or c
  if c % g or (bits == 4 and g % 2):
    raise QuantizeError(f"--group-size={group_size}: must divide the {c} input rows of {name}"
                        + (" and be even for int4" if bits == 4 else ""))
  canon = np.transpose(w, tuple(range(len(lead))) + tuple(len(lead) + a for a in order))
  canon = canon.reshape(lead + (c // g, g, n))
  qmax = QMAX[bits]
  scales = np.max(np.abs(canon), axis=-2, keepdims=True) / qmax
  scales = np.where(scales == 0, 1.0, scales).astype(np.float32)
  q = np.clip(np.rint(canon / scales), -qmax, qmax).astype(np.int8)
  values = pack_int4(q) if bits == 4 else q
  return QuantizedWeight(jnp.asarray(values), jnp.asarray(scales), shape=shape, contract=contract, bits=bits)


def _contraction_axes(path, tied: bool):
  name = path[-1]
  if name == "embed":
    return TIED_EMBED_AXES if tied else None
  return CONTRACTION_AXES.get(name)


def quantize_model(model, mode: str, group_size: int | None = None):
  """A copy of `model` (an lmtiny Transformer) whose matmul weights are QuantizedWeights."""
  if mode not in MODES:
    raise QuantizeError(f"--quantize={mode}: must be one of {', '.join(MODES)}")
  bits = 8 if mode == "int8" else 4
  group = DEFAULT_GROUP[mode] if group_size is None else group_size
  if group < 0:
    raise QuantizeError(f"--group-size={group}: must be >= 0 (0 = one group per output channel)")
  graphdef, state = nnx.split(model)
  tied = model.cfg.tie_embeddings
  flat = []
  for path, var in nnx.to_flat_state(state):
    axes = _contraction_axes(path, tied) if isinstance(var, nnx.Param) else None
    if axes is not None:
      value = quantize_array(np.asarray(jax.device_get(var.get_value())), axes, bits, group,
                             ".".join(map(str, path)), stacked=model.cfg.scan_layers and path[0] == "layers")
      var = var.replace(value)
    flat.append((path, var))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def param_bytes(model) -> int:
  """Bytes the model's parameters occupy (integer values and scales of quantized weights)."""
  return sum(int(x.nbytes) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
