"""lmtiny parameters <-> Hugging Face tensors, for any architecture's table of names.

An architecture (lmtiny.interop.llama, lmtiny.interop.nanochat) maps each lmtiny parameter path
(as nnx's flat_state gives it, layers unstacked: ("layers", i, "attn", "q")) to a Hugging Face
tensor name and a layout. HF keeps nn.Linear weights as [out, in]; lmtiny keeps [in, out] with
heads unflattened (q [D, H, Dh], o [H, Dh, D]), and pads its vocabulary rows to
model.vocab_multiple, which HF never sees (padded rows get no logit; an import pads with zeros).
Each conversion is a transpose, a reshape or a crop, so export(import(x)) is x bit for bit.

Layouts:
  vector        as is (norm scales, scalars)
  matrix        [in, out] -> [out, in]
  heads_in      [D, N, Dh] -> [N*Dh, D]           (q, k, v)
  heads_in_flip heads_in with the second half of each head negated (q, k for a RoPE that rotates
                the other way: q.k is unchanged, and so is a parameter-free norm of q or k)
  heads_out     [H, Dh, D] -> [D, H*Dh]           (o)
  vocab_rows    [Vp, X] -> [V, X]                 (token and value embeddings)
  vocab_matrix  [D, Vp] -> [V, D]                 (lm_head)
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from lmtiny.errors import UserError

NameTable = Callable[[tuple], tuple[str, str]]  # lmtiny path -> (HF name, layout)


class InteropError(UserError):
  """A model or checkpoint that cannot be converted; the message names the field or file."""


def to_hf(layout: str, x: np.ndarray, vocab: int) -> np.ndarray:
  if layout == "vector":
    return x
  if layout == "vocab_rows":
    return x[:vocab]
  if layout == "vocab_matrix":
    return x[:, :vocab].T
  if layout == "heads_in":
    return x.reshape(x.shape[0], -1).T
  if layout == "heads_in_flip":
    return to_hf("heads_in", _negate_second_half(x), vocab)
  if layout == "heads_out":
    return x.reshape(-1, x.shape[-1]).T
  return x.T


def hf_shape(layout: str, shape: tuple, vocab: int) -> tuple:
  """The HF tensor's shape for an lmtiny parameter of `shape`."""
  n = int(np.prod(shape))
  if layout == "vector":
    return tuple(shape)
  if layout == "vocab_rows":
    return (vocab, shape[1])
  if layout == "vocab_matrix":
    return (vocab, shape[0])
  if layout == "heads_out":
    return (shape[-1], n // shape[-1])
  return (n // shape[0], shape[0])


def from_hf(layout: str, y: np.ndarray, shape: tuple) -> np.ndarray:
  """The lmtiny parameter of `shape` (padded vocabulary rows zero)."""
  if layout == "vector":
    return y.reshape(shape)
  if layout == "vocab_rows":
    return np.pad(y, ((0, shape[0] - y.shape[0]), (0, 0)))
  if layout == "vocab_matrix":
    return np.pad(y.T, ((0, 0), (0, shape[1] - y.shape[0])))
  if layout == "heads_in_flip":
    return _negate_second_half(y.T.reshape(shape))
  return y.T.reshape(shape)


def _negate_second_half(x: np.ndarray) -> np.ndarray:
  """x [..., Dh] with x[..., Dh/2:] negated (exact, so twice is the identity bit for bit)."""
  half = x.shape[-1] // 2
  return np.concatenate([x[..., :half], -x[..., half:]], axis=-1)


def unstack_layers(flat: dict, num_layers: int) -> dict:
  """Per-layer paths ('layers', i, ...) from scan-stacked ones ('layers', ...) with a leading L axis."""
  out = {}
  for path, x in flat.items():
    if path[0] == "layers" and not isinstance(path[1], int):
      for i in range(num_layers):
        out[("layers", i) + path[1:]] = x[i]
    else:
      out[path] = x
  return out


def export_tensors(flat: dict, names: NameTable, vocab: int) -> dict[str, np.ndarray]:
  """{HF name: array} of lmtiny parameters (per-layer paths), as stored (float32)."""
  out = {}
  for path, x in flat.items():
    name, layout = names(path)
    out[name] = to_hf(layout, x, vocab)
  return out


def import_tensors(tensors: dict[str, np.ndarray], shapes: dict, names: NameTable, vocab: int, where: str,
                   ignored: tuple[str, ...] = ()) -> dict:
  """lmtiny per-layer parameters (float32) from HF tensors; `shapes` maps every lmtiny path to its
  shape. Missing, unexpected or mis-shaped tensors raise InteropError naming them."""
  wanted = {}
  for path in shapes:
    name, layout = names(path)
    wanted[name] = (path, layout)
  extra = sorted(k for k in tensors if k not in wanted and not k.endswith(ignored))
  if extra:
    raise InteropError(f"{where}: tensor {extra[0]} has no place in the lmtiny model"
                       + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
  out = {}
  for name, (path, layout) in wanted.items():
    if name not in tensors:
      raise InteropError(f"{where}: tensor {name} is missing")
    y, shape = tensors[name], shapes[path]
    expected = hf_shape(layout, shape, vocab)
    if tuple(y.shape) != expected:
      raise InteropError(f"{where}: tensor {name} has shape {list(y.shape)}, expected {list(expected)} "
                         "(from config.json)")
    out[path] = np.asarray(from_hf(layout, y, shape), np.float32)
  return out
