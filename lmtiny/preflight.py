"""Checks made before any work starts, each failing in one line: output paths that cannot be
written, a config that no longer matches the run directory it resumes, too little disk for the
checkpoints a run will keep."""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from typing import Callable

import jax

from lmtiny.config import ConfigError, UserError


class OutputError(UserError):
  """An output path that is not a directory or cannot be written."""


def check_output_dir(path: str, flag: str) -> None:
  """`path` is (or can be created as) a writable directory; probes by creating a file (file
  permission bits say nothing to root, read-only mounts and full disks say it to nobody)."""
  if not path or "://" in path:
    return  # object stores: lmtiny.distributed.check_workdir probes those
  if os.path.exists(path) and not os.path.isdir(path):
    raise OutputError(f"{flag}={path}: exists and is not a directory")
  _probe(_nearest_existing(path), path, flag)


def check_output_file(path: str, flag: str) -> None:
  """`path` can be written as a file the way files.atomic_write writes it (a temporary sibling
  renamed over it): it is not a directory and its directory is (or can be created) writable."""
  if not path:
    raise OutputError(f"{flag}=: empty; name a file")
  if "://" not in path and os.path.isdir(path):
    raise OutputError(f"{flag}={path}: is a directory; name a file")
  check_output_parent(path, flag)


def check_output_parent(path: str, flag: str) -> None:
  """The directory that holds `path` can take a new entry: for outputs built in a temporary
  sibling and renamed into place (files.atomic_directory), which a writable but read-only-parented
  `path` would not allow."""
  if not path or "://" in path:
    return
  _probe(_nearest_existing(os.path.dirname(os.path.abspath(path))), path, flag)


def _nearest_existing(path: str) -> str:
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  return existing


def _probe(existing: str, path: str, flag: str) -> None:
  """OutputError naming `flag` unless a file can be created (and written) in `existing`."""
  if not os.path.isdir(existing):
    raise OutputError(f"{flag}={path}: {existing} is a file, not a directory")
  probe = os.path.join(existing, f".lmtiny-write-check-{uuid.uuid4().hex[:8]}")
  try:
    with open(probe, "wb") as f:
      f.write(b"x")
  except OSError as e:
    raise OutputError(f"{flag}={path}: cannot write to {existing} ({os.strerror(e.errno) if e.errno else e})") from None
  finally:  # a full disk creates the file and then fails the write: no probe may stay behind
    if os.path.lexists(probe):
      os.remove(probe)


# ---------------------------------------------------------------------------------------------
# Disk space.


def state_bytes(abstract_state) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))


def check_disk_space(directory: str, checkpoint_bytes: int, keep: int, log: Callable[[str], None]) -> None:
  """Warns when free space cannot hold `keep` checkpoints plus the one being written."""
  if "://" in directory:
    return
  existing = os.path.abspath(directory)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  free = shutil.disk_usage(existing).free
  need = (keep + 1) * checkpoint_bytes
  if free < need:
    log(f"warning: {existing} has {_size(free)} free; {keep} kept checkpoint(s) plus the one being written "
        f"need about {_size(need)} ({_size(checkpoint_bytes)} each): saves may fail with a full disk")


def _size(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1024:
      return f"{n:.0f} {unit}"
    n /= 1024
  return f"{n:.1f} TB"


def is_disk_full(e: BaseException) -> bool:
  return isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e)


# ---------------------------------------------------------------------------------------------
# The run directory's config.


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
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from lmtiny.model import abstract_model  # pylint: disable=g-import-not-at-top
  from lmtiny.optim import make_optimizer  # pylint: disable=g-import-not-at-top
  params = nnx.state(abstract_model(cfg.model), nnx.Param)
  tx, _ = make_optimizer(cfg.optim, cfg.model.d_model, max(int(cfg.train.steps), 1))
  tree = {"params": params, "opt_state": jax.eval_shape(tx.init, params)}
  return jax.tree.structure(tree), [(x.shape, str(x.dtype)) for x in jax.tree.leaves(tree)]


def config_changes(workdir: str, cfg) -> dict[str, tuple]:
  """{field: (old, new)} against RUN/config.json ({} for a new run). Raises ConfigError naming
  the changed fields when they change the parameters' or optimizer state's shapes (the
  checkpoints could not be restored)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return {}
  try:
    old = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: unreadable ({e}); move it aside to start over in this directory") from None
  new = json.loads(cfg.to_json_best_effort())
  old_flat, new_flat = _flat(old), _flat(new)
  changes = {k: (old_flat.get(k), new_flat.get(k)) for k in sorted(set(old_flat) | set(new_flat))
             if old_flat.get(k) != new_flat.get(k)}
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
  from etils import epath  # pylint: disable=g-import-not-at-top
  from lmtiny.files import atomic_write  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir) / "config_history.jsonl"
  record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": step,
            "changes": {k: {"old": o, "new": n} for k, (o, n) in changes.items()}}
  old = path.read_text() if path.exists() else ""
  atomic_write(path, (old + json.dumps(record) + "\n").encode())
  listed = ", ".join(f"{k} {o!r} -> {n!r}" for k, (o, n) in changes.items())
  log(f"config changed since the last run (from step {step}): {listed} (recorded in {path})")
