"""What a re-run checks against the run directory it resumes: the config's changes (edits that
change the parameters' or optimizer state's shapes, or data.packing, are refused in one line; others
are recorded in config_history.jsonl), and the bytes of the state each checkpoint holds (for the disk check)."""
from __future__ import annotations

import json
import time
from typing import Callable

import jax
import ml_collections
from etils import epath
from flax import nnx

from lmtiny.errors import ConfigError
from lmtiny.fs.atomic import atomic_write
from lmtiny.model.transformer import abstract_model
from lmtiny.runs.config_file import FILE, MOVE_ASIDE, over_defaults, read_saved_config
from lmtiny.training.optim import make_optimizer


def state_bytes(abstract_state) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _shapes(cfg) -> object:
  """Parameter and optimizer-state shapes a config gives (abstract: no memory, no FLOPs)."""
  params = nnx.state(abstract_model(cfg.model), nnx.Param)
  tx, _ = make_optimizer(cfg.optim, cfg.model.d_model, max(int(cfg.train.steps), 1))
  tree = {"params": params, "opt_state": jax.eval_shape(tx.init, params)}
  return jax.tree.structure(tree), [(x.shape, str(x.dtype)) for x in jax.tree.leaves(tree)]


def config_changes(workdir: str, cfg) -> dict[str, tuple]:
  """{field: (old, new)} against RUN/config.json ({} for a new run). Raises ConfigError naming
  the changed fields when they change the parameters' or optimizer state's shapes (the
  checkpoints could not be restored)."""
  old = read_saved_config(workdir, missing_ok=True, hint=MOVE_ASIDE)
  if old is None:
    return {}
  # a field added since the run was recorded reads as its default, not as a change
  old = json.loads(over_defaults(old, where=str(epath.Path(workdir) / FILE)).to_json_best_effort())
  new = json.loads(cfg.to_json_best_effort())
  old_flat, new_flat = _flat(old), _flat(new)
  changes = {k: (old_flat.get(k), new_flat.get(k)) for k in sorted(set(old_flat) | set(new_flat))
             if old_flat.get(k) != new_flat.get(k)}
  if "data.packing" in changes:  # the saved data position is a position of the other packer
    was, now = changes["data.packing"]
    raise ConfigError(f"config.data.packing={now!r}: {workdir} holds a run trained with data.packing={was!r}, "
                      f"and its saved data position is a position of those rows; keep {was!r} to resume it, or "
                      "choose another --workdir")
  structural = [k for k in changes if k.startswith(("model.", "optim."))]
  if not structural:
    return changes
  try:
    same = _shapes(ml_collections.ConfigDict(old)) == _shapes(cfg)
  except Exception:  # pylint: disable=broad-except  (an old config this version cannot build)
    same = False
  if not same:
    listed = ", ".join(f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in structural)
    raise ConfigError(f"{workdir} holds a run whose model or optimizer state has other shapes ({listed}); "
                      f"keep those as they were to resume it, or choose another --workdir")
  return changes


def record_config_changes(workdir: str, changes: dict, step: int, log: Callable[[str], None]) -> None:
  """Appends the allowed edits to RUN/config_history.jsonl and says so in one line."""
  if not changes:
    return
  path = epath.Path(workdir) / "config_history.jsonl"
  record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": step,
            "changes": {k: {"old": o, "new": n} for k, (o, n) in changes.items()}}
  old = path.read_text() if path.exists() else ""
  atomic_write(path, (old + json.dumps(record) + "\n").encode())
  listed = ", ".join(f"{k} {o!r} -> {n!r}" for k, (o, n) in changes.items())
  log(f"config changed since the last run (from step {step}): {listed} (recorded in {path})")
