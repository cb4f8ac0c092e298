"""What jax saves for a loss's backward pass (jax.ad_checkpoint.print_saved_residuals), read back
as (dtype, shape, what) triples: the tests' view of the activations a remat policy keeps."""
from __future__ import annotations

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmtiny.parallel import sharding

DTYPE_BYTES = {"bf16": 2, "f32": 4, "f16": 2, "i32": 4, "s32": 4, "f8_e4m3fn": 1, "f8_e5m2": 1, "bool": 1}


def saved_residuals(loss, params, mesh_cfg=None) -> list[tuple[str, tuple[int, ...], str]]:
  """(dtype, shape, what) of each residual jax saves for `loss`'s backward pass, the arguments
  (parameters) excluded, traced on the mesh `mesh_cfg` lays over the 8 devices (or none)."""
  out = io.StringIO()
  with (jax.set_mesh(sharding.make_mesh(mesh_cfg)) if mesh_cfg else contextlib.nullcontext(),
        contextlib.redirect_stdout(out)):
    jax.ad_checkpoint.print_saved_residuals(loss, params)
  saved = []
  for line in out.getvalue().splitlines():
    if "from the argument" not in line:
      dtype, dims = re.match(r"(\w+)\[([\d,]*)\]", line).groups()
      saved.append((dtype, tuple(int(d) for d in dims.split(",") if d), line))
  return saved


def residual_bytes(saved) -> int:
  return sum(DTYPE_BYTES[dtype] * int(np.prod(shape)) for dtype, shape, _ in saved)


def token_loss(model, rows: int = 8):
  """(loss of the parameters, parameters): the mean next-token loss of `rows` sequences of the
  model's max_seq_len."""
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = jnp.zeros((rows, model.cfg.max_seq_len), jnp.int32)

  def loss(params):
    ce, _ = nnx.merge(graph, params, rest).token_losses(tokens, tokens)
    return ce.mean()
  return loss, params
