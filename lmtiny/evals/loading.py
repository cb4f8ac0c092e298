"""A trained run's model for evaluation and RL: config, tokenizer and parameters sharded on a mesh.

`load_model` is the one place evaluation loads weights (quantization plugs in here).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections
from flax import nnx

from lmtiny import sharding


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


def load_model(workdir: str, step: int | None = None, mesh=None, quantize: str = "none",
               group_size: int | None = None) -> LoadedModel:
  """The run in `workdir` at `step` (default: newest); raises a UserError naming what is wrong.
  `quantize` (int8 | int4) scores the weight-only quantized model (lmtiny.quant)."""
  from lmtiny.checkpoint import abstract_with_shardings, restore_params
  from lmtiny.generate import load_run
  from lmtiny.model import abstract_model
  run = load_run(workdir, step)
  mesh = mesh or data_mesh()
  graphdef, abstract_params = nnx.split(abstract_model(run.cfg.model), nnx.Param)
  target = abstract_with_shardings(abstract_params, sharding.tree_shardings(abstract_params, mesh))
  params = restore_params(os.path.join(workdir, "checkpoints"), run.step, target)
  model = nnx.merge(graphdef, params)
  if quantize != "none":
    from lmtiny.quant import quantize_model
    model = quantize_model(model, quantize, group_size)
  return LoadedModel(model, run.tokenizer, run.cfg, run.step, mesh)
