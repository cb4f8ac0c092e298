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
import time
from typing import Callable

import grain
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lmtiny.config import RunFailed, UserError


class CheckpointError(UserError):
  """No checkpoint in the run directory restores cleanly (one line naming the steps and why)."""


class CheckpointSaveError(RunFailed):
  """A checkpoint failed to save (disk full, permissions); the previous one is intact."""


@jax.jit
def fingerprint(state):
  """Per-leaf wrapping uint32 sums of the raw bits: integer addition is exact in any order, so
  the value is the same on any mesh, and any changed byte in an array (almost surely) changes it."""
  def bits(x):
    x = jnp.asarray(x)
    if x.dtype.itemsize == 2:
      x = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    elif x.dtype.itemsize == 4:
      x = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
      x = x.astype(jnp.uint32)
    return jnp.sum(x, dtype=jnp.uint32)
  return [bits(x) for x in jax.tree.leaves(state)]


def _fingerprint_list(state) -> list[int]:
  return [int(v) for v in jax.device_get(fingerprint(state))]


def describe_error(e: BaseException) -> str:
  """'Type: first line' of an exception, at most 160 characters. Also silences asyncio's
  "exception was never retrieved" reports: a failed orbax restore abandons one read task per
  array, each of which would print its tensorstore spec (hundreds of lines) when collected."""
  import logging  # pylint: disable=g-import-not-at-top
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return f"{type(e).__name__}: {lines[0][:160] if lines else ''}".rstrip(": ")


def _drop_orbax_save_tracebacks(record) -> bool:
  """absl-logger filter: orbax's background save thread logs a failed save with its whole
  traceback (hundreds of lines on a full disk); Checkpointer reports it in one line instead."""
  return not (record.exc_info and "orbax" in record.pathname)


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = directory
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory) if "://" not in directory else directory,
                                         options=options)
    # Reads without orbax's end-of-restore barrier (a collective): a process whose read fails
    # never reaches it, which would leave the others waiting there. restore_newest agrees instead.
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    self._reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler(), multiprocessing_options=alone)
    self._unverified = None  # a list while restore_newest defers fingerprint checks (see there)
    self._saving, self._failed = None, False
    import logging  # pylint: disable=g-import-not-at-top
    absl_logger = logging.getLogger("absl")
    if _drop_orbax_save_tracebacks not in absl_logger.filters:
      absl_logger.addFilter(_drop_orbax_save_tracebacks)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iter=None) -> None:
    """Starts a save; a failure (this one's start, or an earlier async one) raises CheckpointSaveError.
    Waits for the previous save first (orbax would, inside save()), so its failure names its step."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(self._saving, e) from None
    self.check_errors()
    items = {"state": ocp.args.StandardSave(state),
             "fingerprint": ocp.args.JsonSave({"state": _fingerprint_list(state),
                                               "params": _fingerprint_list(state["params"])})}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except  (ENOSPC, EACCES, tensorstore errors)
      raise self._save_error(step, e) from None
    self._saving = step

  def check_errors(self) -> None:
    """Raises CheckpointSaveError if an asynchronous save has failed (cheap; call every step)."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(self._saving, e) from None

  def _save_error(self, step, e) -> CheckpointSaveError:
    self._failed = True
    kept = [s for s in self.finished_steps() if s != step]
    last = f"the last good checkpoint is step {kept[-1]}" if kept else "no checkpoint has been kept"
    full = "No space left on device" in str(e) or getattr(e, "errno", None) == 28  # ENOSPC, deep in tensorstore's text
    why = "disk full: No space left on device" if full else describe_error(e)
    return CheckpointSaveError(f"checkpoint at step {step} failed to save ({why}) in "
                               f"{self.directory}; {last}")

  def finished_steps(self) -> list[int]:
    """Committed step directories on disk (orbax's own list may include the failed one)."""
    root = epath.Path(self.directory)
    if not root.is_dir():
      return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())

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
    """Restore onto the shardings in `abstract_state`; `data_iter` is restored in place. The
    state's fingerprint (when the checkpoint has one) is checked: a mismatch raises ValueError."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    has_fingerprint = (epath.Path(self.directory) / str(step) / "fingerprint").exists()
    if has_fingerprint:
      items["fingerprint"] = ocp.args.JsonRestore()
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._reader.restore(epath.Path(self.directory) / str(step), args=ocp.args.Composite(**items))
    check = (restored["state"], restored["fingerprint"]["state"] if has_fingerprint else None)
    if self._unverified is None:
      _verify(*check)
    else:
      self._unverified.append(check)
    return restored["state"]

  def restore_newest(self, restore: Callable[[int], object], log: Callable[[str], None]):
    """`restore(step)` for the newest step that restores cleanly, as (step, result); None if the
    directory has no checkpoint. Steps that fail are moved aside (checkpoints/corrupt-STEP-TIME,
    by process 0) with one warning line each once an older one has restored; if none restores,
    nothing is moved and CheckpointError names every step and its error.

    With several processes a step is usable only if it restored on all of them: every attempt
    ends in an agreement (one small all-gather), so all processes pick the same step and run the
    same collectives. The fingerprint checks (collectives over the restored arrays) are deferred
    until every process holds its arrays, then agreed on as well."""
    bad = []
    try:
      for step in sorted(set(self.all_steps()) | set(self.finished_steps()), reverse=True):
        self._unverified = [] if jax.process_count() > 1 else None
        result, why = self._attempt(step, lambda: restore(step))  # pylint: disable=cell-var-from-loop
        if why is None and self._unverified:
          _, why = self._attempt(step, lambda: [_verify(*check) for check in self._unverified])
        if why is not None:
          bad.append((step, why))
          continue
        for bad_step, why in bad:
          moved = self.move_aside(bad_step)
          log(f"warning: checkpoint at step {bad_step} is unusable ({why}); moved to {moved}; "
              f"resuming from step {step}")
        if bad:
          self.manager.reload()
        return step, result
    finally:
      self._unverified = None
    if bad:
      reasons = "; ".join(f"step {s}: {why}" for s, why in bad)
      raise CheckpointError(f"{self.directory}: no checkpoint restores cleanly ({reasons}); move the "
                            "directory aside to start the run over")
    return None

  def _attempt(self, step: int, fn: Callable[[], object]):
    """(fn(), None), or (None, why) if fn raised on any process: the same verdict on every one.
    `why` is the error's one line, prefixed "process K: " per failed process when there are several."""
    try:
      result, why = fn(), None
    except Exception as e:  # pylint: disable=broad-except  (orbax, tensorstore, grain, JSON)
      result, why = None, describe_error(e)
    if jax.process_count() == 1:
      return result, why
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    # Each process's row: the step it tried, whether it failed, its reason as bytes, so every
    # process can name every failure (the log worth reading is process 0's).
    text = (why or "").encode()[:_REASON_BYTES]
    row = np.zeros(2 + _REASON_BYTES, np.int32)
    row[:2 + len(text)] = [step, why is not None, *text]
    rows = np.asarray(multihost_utils.process_allgather(row))
    if (rows[:, 0] != step).any():  # checkpoint listings that differ between processes
      raise CheckpointError(f"{self.directory}: processes tried different checkpoint steps "
                            f"({rows[:, 0].tolist()}); is the directory shared by all hosts?")
    failed = [f"process {k}: " + r[2:].astype(np.uint8).tobytes().rstrip(b"\0").decode(errors="ignore")
              for k, r in enumerate(rows) if r[1]]
    return (result, None) if not failed else (None, "; ".join(failed))

  def move_aside(self, step: int) -> str:
    """checkpoints/STEP -> checkpoints/corrupt-STEP-YYYYmmdd-HHMMSS (kept for inspection)."""
    root = epath.Path(self.directory)
    target = root / f"corrupt-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      try:
        (root / str(step)).rename(target)
      except OSError as e:  # some object stores cannot rename a directory: skipped on every restore instead
        target = f"nowhere (cannot move it: {describe_error(e)})"
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"lmtiny-move-aside-{step}")
    return str(target)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for a pending save; raises CheckpointSaveError if it failed (unless already raised)."""
    reported = self._failed
    try:
      try:
        self.manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except
        raise self._save_error(self._saving, e) from None
      self.check_errors()
    except CheckpointSaveError:
      if not reported:
        raise
    finally:
      self._reader.close()
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except  (a failed save is reported above)
        pass


_REASON_BYTES = 240  # a describe_error line is at most ~200


def _verify(state, saved_fingerprint: list[int] | None) -> None:
  if saved_fingerprint is not None and _fingerprint_list(state) != saved_fingerprint:
    raise ValueError("array data does not match the fingerprint saved with it (altered bytes)")


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
    params = checkpointer.restore(path, args=args)["params"]
  saved = saved_fingerprint(directory, step)
  if saved is not None and "params" in saved and _fingerprint_list(params) != saved["params"]:
    raise ValueError("parameter data does not match the fingerprint saved with it (altered bytes)")
  return params


def saved_fingerprint(directory: str, step: int) -> dict | None:
  """The fingerprints saved with the checkpoint at `step` (None for checkpoints without one)."""
  path = epath.Path(directory) / str(step) / "fingerprint"
  files = [f for f in path.glob("*") if f.name != "commit_success.txt"] if path.is_dir() else []
  if not files:
    return None
  return json.loads(files[0].read_text())
