"""Orbax checkpoints: train state (params, optimizer state, step, RNG) and the data iterator's
state saved together, asynchronously, every N steps, keeping the newest K.

Restoring takes an abstract target whose ShapeDtypeStructs carry the *current* mesh's shardings,
so a checkpoint written on one mesh (or process count) restores onto another. Every process
takes part in a save; grain writes one iterator-state file per process.
"""
from __future__ import annotations

import json
import os
import re

import grain
from etils import epath
import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = directory
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory) if "://" not in directory else directory,
                                         options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iter=None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def data_states(self, step: int) -> list[dict] | None:
    """The per-process data-iterator states saved at `step` (index = process), None if absent."""
    path = epath.Path(self.directory) / str(step) / "data_iter"
    if not path.exists():
      return None
    found = {}
    for f in path.glob("process_*-of-*.json"):
      m = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", f.name)
      if m:
        found[int(m.group(1))] = (int(m.group(2)), f)
    counts = {n for n, _ in found.values()}
    if len(counts) != 1 or sorted(found) != list(range(counts.pop())):
      return None
    return [json.loads(found[i][1].read_text()) for i in sorted(found)]

  def restore(self, step: int, abstract_state, data_iter=None):
    """Restore onto the shardings in `abstract_state`; `data_iter` is restored in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs placed on `shardings` (a tree of the same structure)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


def restore_params(directory: str, step: int, abstract_params):
  """Only the model parameters of the checkpoint at `step` (no optimizer state, no data iterator),
  placed on the shardings the ShapeDtypeStructs in `abstract_params` carry: a run trained on any
  mesh restores onto one device or onto another mesh (used for sampling)."""
  path = epath.Path(directory) / str(step) / "state"
  target = {"params": abstract_params}
  args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)
  with ocp.PyTreeCheckpointer() as checkpointer:
    return checkpointer.restore(path, args=args)["params"]
