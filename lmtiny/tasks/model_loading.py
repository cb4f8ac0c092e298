"""A trained run's model for evaluation: config, tokenizer and parameters sharded on a mesh.

`load_model` loads through `lmtiny.runs.directory.load_weights`, as generate and serve do: the newest
usable checkpoint, a LoRA run's adapters folded into its base, optional quantization.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from lmtiny.parallel import sharding
from lmtiny.runs.directory import load_weights


@dataclasses.dataclass
class LoadedModel:
  model: Any       # nnx Transformer, parameters sharded over `mesh`
  tokenizer: Any   # lmtiny.tokenizer.Tokenizer
  cfg: Any         # the run's ConfigDict
  step: int        # the checkpoint step
  mesh: Any


def data_mesh():
  """Every local device on the data axis (evaluation batches are split over it)."""
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))


def load_model(workdir, step: int | None = None, mesh=None, quantize: str = "none",
               group_size: int | None = None) -> LoadedModel:
  """The run in `workdir` (a directory, or a Run from lmtiny.runs.directory.load_run) at `step` (default:
  the newest that loads); raises a UserError naming what is wrong. `quantize` (int8 | int4) scores the weight-only quantized model (lmtiny.model.quant)."""
  mesh = mesh or data_mesh()
  run, params = load_weights(workdir, step, mesh=mesh, quantize=quantize, group_size=group_size)
  return LoadedModel(run.model(params), run.tokenizer, run.cfg, run.step, mesh)
