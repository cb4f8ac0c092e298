"""A run directory and the one way its weights are loaded.

  run = load_run(workdir, step)                  # config.json, tokenizer, the checkpoint step
  run, params = load_weights(workdir, step, mesh=mesh, quantize="int8")
  model = run.model(params)

`load_weights` is what generate, serve, eval, export, RL and fine-tuning all call: it restores
only the parameters (no optimizer state), onto one local device or sharded over `mesh` by their
logical axes, whatever mesh the run was trained on. With no step asked for it starts at the
newest checkpoint and falls back past damaged ones (lmtiny.runs.checkpoint.CheckpointCorrupt: one
warning line each; nothing is moved, since a training run may be using the directory); any other
error is not the checkpoint's and surfaces as itself. Relative paths work (lmtiny.runs.checkpoint makes
them absolute for orbax). A LoRA run (config lora.rank > 0) holds only adapters: its base run
(config sft.init at sft.init_step, itself loaded this way, so chains of LoRA runs work) is loaded
and the adapters are folded in, W + alpha / rank * A @ B. `quantize`
(int8 | int4) makes the weight-only quantized parameters (lmtiny.model.quant). `new_directory` builds a
directory (a merged or imported run, an export) in a temporary sibling and renames it into place.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Iterator

import jax
from etils import epath
from flax import nnx

from lmtiny import config as config_lib
from lmtiny.errors import ConfigError, UserError
from lmtiny.fs import outputs
from lmtiny.fs.atomic import atomic_directory, atomic_write
from lmtiny.model.adapters import from_config
from lmtiny.model.quant import param_bytes, quantize_model
from lmtiny.model.transformer import abstract_model
from lmtiny.parallel import sharding
from lmtiny.runs import kind as runkind
from lmtiny.runs.config_file import over_defaults, read_saved_config
from lmtiny.tokenizer.huggingface import load_run_tokenizer, save_run_tokenizer
from lmtiny.runs.checkpoint import (abstract_with_shardings, CheckpointCorrupt, Checkpointer, describe_error,
                                    restore_params)


class RunError(UserError):
  """A run directory that cannot be used (missing, no checkpoint, unreadable config, no usable
  weights); the message names the flag or file."""


@dataclasses.dataclass
class Run:
  workdir: str
  cfg: Any           # the run's ConfigDict
  tokenizer: Any     # lmtiny.tokenizer.Tokenizer (or the HF tokenizer of an imported model)
  step: int          # the checkpoint step: the one asked for, else the newest
  asked: bool = False  # the step was asked for: load exactly it, never an older one

  def model(self, params):
    """The Transformer with `params` (from load_weights)."""
    graphdef, _ = nnx.split(abstract_model(self.cfg.model), nnx.Param)
    return nnx.merge(graphdef, params)


def checkpoint_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps in RUN/checkpoints (orbax names them by step; unfinished ones
  carry a temporary suffix locally, or lack commit_success.txt on cloud storage)."""
  root = epath.Path(workdir) / "checkpoints"
  if not root.is_dir():
    return []
  cloud = "://" in workdir
  return sorted(int(p.name) for p in root.iterdir()
                if p.name.isdigit() and (p / "state").is_dir() and (not cloud or (p / "commit_success.txt").exists()))


def load_run(workdir: str, step: int | None = None, flags: tuple[str, str] = ("--workdir", "--step")) -> Run:
  """Config, tokenizer and checkpoint step of a run; RunError naming `flags` (the workdir's and
  the step's) or the file that is wrong (a torn config.json: lmtiny.runs.config_file's ConfigError)."""
  dir_flag, step_flag = flags
  check_run_directory(workdir, dir_flag)
  steps = checkpoint_steps(workdir)
  if not steps:
    raise RunError(f"{dir_flag}={workdir}: no checkpoint in {os.path.join(workdir, 'checkpoints')}")
  if step is not None and step not in steps:
    raise RunError(f"{step_flag}={step}: no such checkpoint in {workdir} (have {', '.join(map(str, steps))})")
  config_path = os.path.join(workdir, "config.json")
  saved = read_saved_config(workdir)
  if not isinstance(saved.get("model"), dict):
    raise RunError(f"{config_path}: cannot read the run's config (no model section)")
  try:
    cfg = over_defaults(saved, where=config_path)  # its errors name the file
  except ConfigError as e:
    raise RunError(str(e)) from None
  try:
    config_lib.validate_model(cfg.model)
  except ConfigError as e:
    raise RunError(f"{config_path}: {e}") from None
  tokenizer = load_run_tokenizer(workdir)  # tokenizer.model, or hf_tokenizer/ of an imported model
  if tokenizer is None:
    raise RunError(f"{epath.Path(workdir) / 'tokenizer.model'}: missing (the run was trained without a tokenizer)")
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise RunError(f"{workdir}/tokenizer.model: {tokenizer.vocab_size} tokens, more than the model's "
                   f"vocab_size {cfg.model.vocab_size}")
  return Run(workdir, cfg, tokenizer, steps[-1] if step is None else step, asked=step is not None)


def check_run_directory(workdir: str, flag: str = "--workdir") -> None:
  """RunError naming `flag` unless `workdir` looks like a run directory (config.json or checkpoints/):
  a path that is missing, a file, or a directory of something else (data shards, a tokenizer)."""
  path = epath.Path(workdir)
  if "://" not in workdir:  # object stores have no directories to find first
    if not os.path.exists(workdir):
      raise RunError(f"{flag}={workdir}: no such directory")
    if not os.path.isdir(workdir):
      raise RunError(f"{flag}={workdir}: not a directory")
  if not (path / "config.json").exists() and not (path / "checkpoints").is_dir():
    what = "; it holds data shards (lmtiny.data.prepare)" if (path / "manifest.json").exists() else ""
    raise RunError(f"{flag}={workdir}: not a run directory (no config.json, no checkpoints/){what}")


def is_lora_run(cfg) -> bool:
  """A run directory whose checkpoints hold LoRA adapters over its base run (sft.init)."""
  return bool(cfg.lora.rank)


def _placed(abstract, mesh):
  """ShapeDtypeStructs on the first local device, or sharded over `mesh` by logical axes."""
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  return abstract_with_shardings(abstract, sharding.tree_shardings(abstract, mesh))


def _restorer(run: Run, mesh) -> Callable[[int], Any]:
  """step -> the run's parameters at that step (a LoRA run: its base run's with the adapters folded in)."""
  directory = os.path.join(run.workdir, "checkpoints")
  if not is_lora_run(run.cfg):
    target = _placed(nnx.state(abstract_model(run.cfg.model), nnx.Param), mesh)
    return lambda step: restore_params(directory, step, target)
  where = f"{os.path.join(run.workdir, 'config.json')}: sft"
  _, base = load_weights(run.cfg.sft.init, run.cfg.sft.init_step, mesh=mesh,
                         flags=(f"{where}.init", f"{where}.init_step"))
  lora = from_config(run.cfg.model, run.cfg.lora)
  target = _placed(jax.eval_shape(lora.init, jax.random.key(0)), mesh)
  merge = jax.jit(lora.merge, out_shardings=jax.tree.map(lambda x: x.sharding, base))
  return lambda step: merge(base, restore_params(directory, step, target))


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def load_weights(run: Run | str, step: int | None = None, *, mesh=None, quantize: str = "none",
                 group_size: int | None = None, log: Callable[[str], None] = _stderr,
                 flags: tuple[str, str] = ("--workdir", "--step")) -> tuple[Run, Any]:
  """(run, parameters) of a run (a Run from load_run, or its directory and `step`): see the
  module docstring. The returned run's step is the one loaded. RunError naming `flags` when no
  checkpoint loads."""
  if not isinstance(run, Run):
    run = load_run(run, step, flags)
  restore = _restorer(run, mesh)
  steps = [run.step] if run.asked else [s for s in reversed(checkpoint_steps(run.workdir)) if s <= run.step]
  failures = []
  for at in steps:
    try:
      params = restore(at)
    except CheckpointCorrupt as e:
      failures.append(f"step {at}: {describe_error(e)}")
      if not run.asked:
        log(f"warning: {run.workdir}: checkpoint at step {at} is unusable ({describe_error(e)}); "
            "trying the previous one")
      continue
    run = dataclasses.replace(run, step=at)
    if quantize != "none":
      full = run.model(params)
      quantized = quantize_model(full, quantize, group_size)
      log(f"quantized {quantize}: parameters {param_bytes(full) / 1e6:.1f} MB -> "
          f"{param_bytes(quantized) / 1e6:.1f} MB")
      params = nnx.state(quantized, nnx.Param)
    return run, params
  raise RunError(f"{flags[0]}={run.workdir}: no usable checkpoint ({'; '.join(failures)})")


def check_new_directory(path: str, flag: str) -> None:
  """RunError naming `flag` unless `path` is absent or an empty directory."""
  if os.path.isdir(os.path.join(path, "checkpoints")):
    raise RunError(f"{flag}={path}: already holds a run (remove it or pick another directory)")
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise RunError(f"{flag}={path}: exists and is not an empty directory (pick another directory)")


@contextlib.contextmanager
def new_directory(path: str, flag: str, replace: bool = False) -> Iterator[str]:
  """files.atomic_directory for a run's output: without `replace`, `path` must be absent or empty
  (check_new_directory, an error naming `flag`)."""
  if not replace:
    check_new_directory(path, flag)
  with atomic_directory(path, replace) as tmp:
    yield tmp


def merge_lora_run(workdir: str, out: str, step: int | None = None) -> str:
  """Writes `out` (new, local): a full run directory (config.json, the tokenizer, one checkpoint of
  the merged parameters at the adapters' step) that loads like any other run, built whole in a
  temporary sibling (new_directory)."""
  run = load_run(workdir, step)
  if not is_lora_run(run.cfg):
    raise ConfigError(f"--workdir={workdir}: not a LoRA run (config.lora.rank is 0 in its config.json)")
  check_new_directory(out, "--out")
  outputs.check_output_parent(out, "--out")  # built beside `out` and renamed: before the weights load
  run, params = load_weights(run)
  cfg = run.cfg.to_dict()
  cfg["lora"]["rank"] = 0
  cfg["sft"]["merged_from"] = f"{workdir} step {run.step}"
  with new_directory(out, "--out") as tmp:
    checkpointer = Checkpointer(os.path.join(tmp, "checkpoints"), keep=1, async_save=False)
    checkpointer.save(run.step, {"params": params})
    checkpointer.close()
    save_run_tokenizer(tmp, run.tokenizer)
    atomic_write(os.path.join(tmp, "config.json"), json.dumps(cfg, indent=2).encode())
    runkind.record_kind(tmp, "merged")
  return out
