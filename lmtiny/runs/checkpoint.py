"""Orbax checkpoints: train state (params, optimizer state, step, RNG) and the data iterator's
state saved together, asynchronously, every N steps, keeping the newest K.

Restoring takes an abstract target whose ShapeDtypeStructs carry the *current* mesh's shardings,
so a checkpoint written on one mesh (or process count) restores onto another. Every process
takes part in a save; grain writes one iterator-state file per process.

A damaged checkpoint (a missing, truncated or undecodable file, array data that does not match its
fingerprint) raises CheckpointCorrupt from every restore here, and only a damaged one does: the
fallbacks to an older checkpoint (Checkpointer.restore_newest, lmtiny.runs.directory.load_weights) catch
that and nothing else, so a path or programming error surfaces as itself.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Callable

import grain
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

# CheckpointCorrupt and FingerprintMismatch are raised here and imported from here by the loaders.
from lmtiny.errors import RunFailed, UserError
from lmtiny.runs.checkpoint_reads import CheckpointCorrupt, FingerprintMismatch, first_nonblank_line, quiet_abandoned_io, reading
from lmtiny.runs.fingerprint import fingerprint


class CheckpointError(UserError):
  """No checkpoint in the run directory restores cleanly (one line naming the steps and why)."""


class CheckpointSaveError(RunFailed):
  """A checkpoint failed to save (disk full, permissions); the previous one is intact."""


def _fingerprint_list(state) -> list[int]:
  return jax.tree.leaves(fingerprint(state))


def _saved_fingerprint(state) -> dict:
  """What a save records: the state's fingerprint and, within it, the parameters' (what a
  weights-only read checks), from one pass."""
  sums = fingerprint(state)
  return {"state": jax.tree.leaves(sums), "params": jax.tree.leaves(sums["params"])}


def describe_error(e: BaseException) -> str:
  """'Type: first line' of an exception, at most 160 characters (a CheckpointCorrupt: its first
  line, which says what is damaged)."""
  line = first_nonblank_line(str(e))[:160]
  return line if isinstance(e, CheckpointCorrupt) else f"{type(e).__name__}: {line}".rstrip(": ")


def _drop_orbax_save_tracebacks(record) -> bool:
  """absl-logger filter: orbax's background save thread logs a failed save with its whole
  traceback (hundreds of lines on a full disk); Checkpointer reports it in one line instead."""
  return not (record.exc_info and "orbax" in record.pathname)


def _absolute(directory: str) -> epath.Path:
  """A local directory made absolute (orbax refuses relative paths); gs:// and other URLs as they are."""
  return epath.Path(directory if "://" in directory else os.path.abspath(directory))


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = directory  # as given, for messages
    self._root = _absolute(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self._root, options=options)
    # Reads without orbax's end-of-restore barrier (a collective): a process whose read fails
    # never reaches it, which would leave the others waiting there. restore_newest agrees instead.
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    self._reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler(), multiprocessing_options=alone)
    self._unverified = None  # a list while restore_newest defers fingerprint checks (see there)
    self._saving, self._failed = None, False
    absl_logger = logging.getLogger("absl")
    if _drop_orbax_save_tracebacks not in absl_logger.filters:
      absl_logger.addFilter(_drop_orbax_save_tracebacks)
    quiet_abandoned_io()  # a save that fails (a full disk) leaves its writes in flight, as a failed read does

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iter=None, progress: dict | None = None) -> None:
    """Starts a save; a failure (this one's start, or an earlier async one) raises CheckpointSaveError.
    Waits for the previous save first (orbax would, inside save()), so its failure names its step.
    `progress`: small JSON the run needs back on resume (e.g. train_seconds, lmtiny.training.budget)."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(self._saving, e) from None
    self.check_errors()
    items = {"state": ocp.args.StandardSave(state),
             "fingerprint": ocp.args.JsonSave(_saved_fingerprint(state))}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    if progress is not None:
      items["progress"] = ocp.args.JsonSave(progress)
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
    if not self._root.is_dir():
      return []
    return sorted(int(p.name) for p in self._root.iterdir() if p.name.isdigit() and p.is_dir())

  def data_states(self, step: int) -> list[dict] | None:
    """The per-process data-iterator states saved at `step` (index = process), None if absent;
    CheckpointCorrupt if one is undecodable."""
    path = self._root / str(step) / "data_iter"
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
    with reading():
      return [json.loads(found[i][1].read_text()) for i in sorted(found)]

  def saved_progress(self, step: int) -> dict:
    """The `progress` saved at `step` ({} if none was); CheckpointCorrupt if it is undecodable."""
    path = self._root / str(step) / "progress"
    files = [f for f in path.glob("*") if f.name != "commit_success.txt"] if path.is_dir() else []
    if not files:
      return {}
    with reading():
      try:
        value = json.loads(files[0].read_text())
      except ValueError:
        raise CheckpointCorrupt(f"progress/{files[0].name} is not JSON") from None
    if not isinstance(value, dict):
      raise CheckpointCorrupt(f"progress/{files[0].name} is malformed")
    return value

  def restore(self, step: int, abstract_state, data_iter=None):
    """Restore onto the shardings in `abstract_state`; `data_iter` is restored in place. A damaged
    checkpoint raises CheckpointCorrupt (FingerprintMismatch when the state's data does not match
    its fingerprint); one that never held the data-iterator state asked for, CheckpointError."""
    step_dir = self._root / str(step)
    with reading():
      saved = _check_items(step_dir, ("state", "data_iter") if data_iter is not None else ("state",), self.directory)
      restored = self._reader.restore(step_dir, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
      fingerprints = _saved_fingerprints(step_dir, saved)
      if data_iter is not None:
        _restore_iterator(step_dir / "data_iter", data_iter)
    check = (restored["state"], fingerprints and fingerprints["state"])
    if self._unverified is None:
      _verify(*check)
    else:
      self._unverified.append(check)
    return restored["state"]

  def restore_newest(self, restore: Callable[[int], object], log: Callable[[str], None]):
    """`restore(step)` for the newest step that restores cleanly, as (step, result); None if the
    directory has no checkpoint. Steps that are damaged (`restore` raises CheckpointCorrupt) are
    moved aside (checkpoints/corrupt-STEP-TIME, by process 0) with one warning line each once an
    older one has restored; if none restores, nothing is moved and CheckpointError names every
    step and its damage. Any other error propagates (on every process, see _attempt).

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
    """(fn(), None), or (None, why) if the checkpoint is damaged (fn raised CheckpointCorrupt) on
    any process: the same verdict on every one. `why` is the damage's one line, prefixed
    "process K: " per damaged process when there are several. Any other error propagates, on every
    process: as itself where it was raised, as a RuntimeError naming that process elsewhere (so
    no process is left waiting in a collective)."""
    error = None
    try:
      result, why = fn(), None
    except CheckpointCorrupt as e:
      result, why = None, describe_error(e)
    except Exception as e:  # pylint: disable=broad-except  (re-raised below, once the others know)
      if jax.process_count() == 1:
        raise
      result, why, error = None, describe_error(e), e
    if jax.process_count() == 1:
      return result, why
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    # Each process's row: the step it tried, its verdict (0 restored, 1 damaged, 2 another error),
    # its reason as bytes, so every process can name every failure (the log worth reading is process 0's).
    text = (why or "").encode()[:_REASON_BYTES]
    row = np.zeros(2 + _REASON_BYTES, np.int32)
    row[:2 + len(text)] = [step, 0 if why is None else 2 if error is not None else 1, *text]
    rows = np.asarray(multihost_utils.process_allgather(row))
    if (rows[:, 0] != step).any():  # checkpoint listings that differ between processes
      raise CheckpointError(f"{self.directory}: processes tried different checkpoint steps "
                            f"({rows[:, 0].tolist()}); is the directory shared by all hosts?")
    reasons = {k: r[2:].astype(np.uint8).tobytes().rstrip(b"\0").decode(errors="ignore") for k, r in enumerate(rows)}
    if error is not None:
      raise error
    for k, r in enumerate(rows):
      if r[1] == 2:
        raise RuntimeError(f"restoring {self.directory} step {step} failed on process {k}: {reasons[k]}")
    failed = [f"process {k}: {reasons[k]}" for k, r in enumerate(rows) if r[1]]
    return (result, None) if not failed else (None, "; ".join(failed))

  def move_aside(self, step: int) -> str:
    """checkpoints/STEP -> checkpoints/corrupt-STEP-YYYYmmdd-HHMMSS (kept for inspection)."""
    name = f"corrupt-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    target = os.path.join(self.directory, name)
    if jax.process_index() == 0:
      try:
        (self._root / str(step)).rename(self._root / name)
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


def _verify(state, saved_fingerprint: list[int] | None, what: str = "array") -> None:
  if saved_fingerprint is not None and _fingerprint_list(state) != saved_fingerprint:
    raise FingerprintMismatch(f"{what} data does not match the fingerprint saved with it (altered bytes)")


def _check_items(step_dir: epath.Path, needed: tuple[str, ...], directory: str) -> set[str] | None:
  """The items the checkpoint at `step_dir` was saved with (its _CHECKPOINT_METADATA; None when
  that is absent or unreadable), after checking that the `needed` ones and the state's tree
  metadata are there: CheckpointCorrupt for a missing one it was saved with (or any, when the
  record is gone too); CheckpointError for one it never held (a checkpoint of another kind)."""
  saved = _saved_items(step_dir)
  for item in needed:
    if (step_dir / item).is_dir():
      continue
    if saved is not None and item not in saved:
      raise CheckpointError(f"{directory}: the checkpoint at step {step_dir.name} holds no {item} "
                            f"(it holds {', '.join(sorted(saved))}: written by another kind of run)")
    raise CheckpointCorrupt(f"{item}/ is missing")
  if not (step_dir / "state" / "_METADATA").exists():  # orbax would restore a tree of another structure
    raise CheckpointCorrupt("state/_METADATA is missing")
  return saved


def _saved_items(step_dir: epath.Path) -> set[str] | None:
  try:
    return set(json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())["item_handlers"])
  except (OSError, ValueError, KeyError, TypeError):  # absent or undecodable: orbax reads without it
    return None


def _saved_fingerprints(step_dir: epath.Path, saved: set[str] | None) -> dict | None:
  """The fingerprints saved with the checkpoint ({"state": [...], "params": [...]}); None for a
  checkpoint saved without one. CheckpointCorrupt when one was saved and is missing or malformed."""
  path = step_dir / "fingerprint"
  files = [f for f in path.glob("*") if f.name != "commit_success.txt"] if path.is_dir() else []
  if not files:
    if saved is not None and "fingerprint" in saved:
      raise CheckpointCorrupt("fingerprint/ is missing (the checkpoint was saved with one)")
    return None
  value = json.loads(files[0].read_text())
  if not (isinstance(value, dict) and all(isinstance(v, list) for v in value.values()) and "state" in value):
    raise CheckpointCorrupt(f"fingerprint/{files[0].name} is malformed")
  return value


def _restore_iterator(path: epath.Path, data_iter) -> None:
  """grain's restore of `data_iter` from this process's state file in `path`, once that file is
  known to hold a state of this pipeline (the same nested keys as data_iter's own state):
  CheckpointCorrupt if it is missing, undecodable or another structure."""
  name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  if isinstance(data_iter, grain.DatasetIterator):
    state = json.loads((path / name).read_text())
    if _structure(state) != _structure(data_iter.get_state()):
      raise CheckpointCorrupt(f"data_iter/{name}: not a state of this data pipeline")
  grain.checkpoint.CheckpointHandler().restore(path, item=data_iter)


def _structure(state):
  """The nested dict keys of an iterator state (values other than dicts by their kind only)."""
  if isinstance(state, dict):
    return {k: _structure(v) for k, v in state.items()}
  return "list" if isinstance(state, list) else "value"


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs placed on `shardings` (a tree of the same structure)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


def restore_params(directory: str, step: int, abstract_params):
  """Only the model parameters of the checkpoint at `step` (no optimizer state, no data iterator),
  placed on the shardings the ShapeDtypeStructs in `abstract_params` carry: a run trained on any
  mesh restores onto one device or onto another mesh (used for sampling). Checked against the
  parameters' own fingerprint: damage elsewhere in the checkpoint (the optimizer state) leaves
  them usable. CheckpointCorrupt (FingerprintMismatch) when they are damaged."""
  return restore_part(directory, step, "params", abstract_params, "parameter")


def restore_part(directory: str, step: int, key: str, abstract, what: str):
  """One entry of the checkpoint's state ("params", "opt_state"), as restore_params does the
  parameters; CheckpointError when the checkpoint does not hold it."""
  step_dir = _absolute(directory) / str(step)
  target = {key: abstract}
  args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)
  with reading():
    saved = _check_items(step_dir, ("state",), directory)
    with ocp.PyTreeCheckpointer() as checkpointer:
      try:
        restored = checkpointer.restore(step_dir / "state", args=args)[key]
      except KeyError:
        raise CheckpointError(f"{step_dir}: holds no {what} state ({key})") from None
    fingerprints = _saved_fingerprints(step_dir, saved)
  _verify(restored, fingerprints and fingerprints.get(key), what)
  return restored
