"""The one run loop. `run(stage)` owns what every run does the same way: the run directory under
its lock, the run files, the disk check, restore or fresh start, the metrics writer, preemption
agreed across processes, the checkpoint cadence, the "run" record and closing. What is trained
and how comes from a `Stage`: pretraining and SFT (lmtiny.training.trainer), RL
(lmtiny.training.policy_gradient). The loop never asks which stage it runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from typing import Any, Callable, Iterator, Protocol

import jax
from etils import epath

from lmtiny.data.pipeline import worker_count
from lmtiny.errors import RunFailed
from lmtiny.fs import outputs
from lmtiny.fs.atomic import atomic_write
from lmtiny.runs import kind as runkind, metrics as metrics_lib, tracking
from lmtiny.runs.checkpoint import abstract_with_shardings, Checkpointer
from lmtiny.runs.lock import main_only, RunLock
from lmtiny.runs.preemption import Preemption
from lmtiny.training import budget as budget_lib, epoch, profiling, resume


class TrainingDiverged(RunFailed):
  """Loss or gradient norm became NaN/Inf; the last good checkpoint was left intact."""


@dataclasses.dataclass
class Progress:
  """What the loop tells a stage about this segment of the run (one start of the command)."""
  name: str  # the stage's name in messages ("training", "SFT", "RL")
  writer: metrics_lib.MetricsWriter
  start: int  # the step this segment began at (0, or the restored checkpoint's)
  last_saved: int
  t0: float = dataclasses.field(default_factory=time.perf_counter)
  # train.time_budget's clock (lmtiny.training.budget): stages run work that is not training in
  # `budget.paused()`; `ended` is set before the checkpoint and periodic work of the run's last step.
  budget: budget_lib.Budget = dataclasses.field(default_factory=budget_lib.Budget)
  ended: bool = False

  def seconds(self) -> float:
    """Since this segment (this process's part of it) entered the loop."""
    return time.perf_counter() - self.t0

  def diverged(self, what: str, step: int) -> TrainingDiverged:
    """The error that stops a run whose step `step` went non-finite (that state is never saved)."""
    kept = (f"the last good checkpoint is step {self.last_saved}" if self.last_saved
            else "no checkpoint was saved")
    return TrainingDiverged(f"{what} at step {step}: {self.name} stopped; {kept}")


class Stage(Protocol):
  """What the loop drives. Attributes: `kind` (lmtiny.runs.kind: the run kind it records, and the
  only one whose directory it resumes), `name` (in messages), `cfg` (resolved; written as
  config.json), `workdir`, `mesh`, `steps` (lmtiny.training.steps.Steps: the abstract state and
  shardings a checkpoint restores into), `total_steps`, `tokenizer` (saved with the run), `log`,
  `main` (this is process 0, which writes the run's files)."""
  kind: str
  name: str
  cfg: Any
  workdir: str
  mesh: Any
  steps: Any
  total_steps: int
  tokenizer: Any
  log: Callable[[str], None]
  main: bool

  def prepare(self) -> dict:
    """Under the run's lock, before anything is written (process 0 only): refuse a directory this
    run must not use, with one line; return the config's allowed changes (resume.config_changes)."""

  def data_iterator(self) -> Any | None:
    """The batch iterator whose position checkpoints save (get_state / set_state), or None when
    each step makes its own data (RL: a step's problems are a function of (seed, step))."""

  def map_data_state(self, saved: list, template: dict) -> tuple[dict, str]:
    """A data position saved by another number of processes or workers, mapped onto this one:
    (state, one-line note). Only asked of stages whose `data_iterator()` is not None."""

  def fresh_state(self) -> dict:
    """The train state when no checkpoint restores."""

  def begin(self, state: dict, progress: Progress) -> None:
    """After the restore (progress.start > 0) or the fresh start: header lines, first evaluation."""

  def update(self, state: dict, step: int, data) -> tuple[dict, dict]:
    """One optimizer step: (the new state, its metrics, which may still be on the device)."""

  def after_step(self, step: int, metrics: dict, progress: Progress) -> None:
    """Step `step` is done: check and record its metrics (now, or later in `settle`)."""

  def settle(self, progress: Progress) -> None:
    """Read every metric not read yet: before a checkpoint (never save a state not seen to be
    finite), before an evaluation, and at the end."""

  def periodic(self, state: dict, step: int, progress: Progress) -> None:
    """Work on the stage's cadences after step `step` (evaluations, samples)."""

  def run_record(self, step: int, progress: Progress) -> dict:
    """The stage's fields of the "run" record that closes this segment."""

  def summary(self, step: int, progress: Progress) -> dict:
    """The stage's fields of what `run` returns."""


def write_run_files(workdir: epath.Path, cfg, tokenizer, kind: str | None = None) -> None:
  """config.json, the tokenizer so that sampling needs nothing but the run directory, and the
  run's kind (lmtiny.runs.kind; default: the one its config implies) when the directory is new."""
  text = cfg.to_json_best_effort(indent=2)
  atomic_write(workdir / "config.json", text.encode())
  runkind.record_kind(str(workdir), kind or runkind.infer_kind(json.loads(text)))
  if hasattr(tokenizer, "model_proto") and not (workdir / "tokenizer.model").exists():
    atomic_write(workdir / "tokenizer.model", tokenizer.model_proto)


@contextlib.contextmanager
def closing_run(ckpt: Checkpointer, writer) -> Iterator[None]:
  """Closes the run's checkpointer (waiting for its last save) and metrics writer when the block
  ends. If the block raised, their own errors are dropped: the block's error is the one to report,
  and a full disk or a broken save would make these fail too."""
  try:
    yield
  except BaseException:
    for close in (ckpt.close, writer.close):
      try:
        close()
      except Exception:  # pylint: disable=broad-except
        pass
    raise
  try:
    ckpt.close()  # a failed last save raises here
  finally:
    writer.close()


def run(stage: Stage, stop_after: int | None = None, clock: budget_lib.Clock | None = None) -> tuple[dict, dict]:
  """Runs `stage` to its last step or train.time_budget (pretraining), or (as a preemption would)
  checkpoints and returns after step `stop_after`; returns (the final state, the summary: step,
  preempted, ended_by, seconds and the stage's). `clock`: the budget's (tests)."""
  cfg, t = stage.cfg, stage.cfg.train
  workdir = epath.Path(stage.workdir)
  with RunLock(stage.workdir, log=stage.log, enabled=stage.main):
    changes = main_only(stage.prepare, stage.main)  # before any write
    if stage.main:
      workdir.mkdir(parents=True, exist_ok=True)
      write_run_files(workdir, cfg, stage.tokenizer, stage.kind)
      outputs.check_disk_space(stage.workdir, resume.state_bytes(stage.steps.abstract_state),
                               t.keep_checkpoints, stage.log)
    ckpt = Checkpointer(str(workdir / "checkpoints"), keep=t.keep_checkpoints, async_save=t.async_checkpointing)
    data = stage.data_iterator()
    with _closing(data), jax.set_mesh(stage.mesh):
      try:
        state, start, saved = _start(stage, ckpt, data)
      except BaseException:
        ckpt.close()
        raise
      if stage.main:
        resume.record_config_changes(stage.workdir, changes or {}, start, stage.log)
      try:
        writer = metrics_lib.MetricsWriter(stage.workdir, enabled=stage.main, resume_step=start,
                                           tensorboard=tracking.uses_tensorboard(t),
                                           trackers=tracking.open_trackers(cfg, stage.workdir, stage.kind) if stage.main else ())
      except BaseException:  # a tracker that could not start (W&B online without a login)
        ckpt.close()
        raise
      with closing_run(ckpt, writer):
        seconds = t.time_budget if stage.kind == "train" else 0.0
        progress = Progress(stage.name, writer, start=start, last_saved=start,
                            budget=budget_lib.Budget(seconds, saved.get("train_seconds", 0.0), clock))
        state, summary = _steps(stage, state, ckpt, data, progress, stop_after)
  if stage.main and t.plot:
    metrics_lib.plot_loss_curve(stage.workdir)
  return state, summary


@contextlib.contextmanager
def _closing(data) -> Iterator[None]:
  """Closes the run's data iterator when the block ends, error or not, which stops its prefetch
  thread. Dropping it would stop the thread too, but a caught restore error's traceback (a corrupt
  checkpoint) keeps it alive until Python's next full collection, its thread with it."""
  try:
    yield
  finally:
    if data is not None:
      data.close()


def _start(stage: Stage, ckpt: Checkpointer, data) -> tuple[dict, int, dict]:
  """The newest checkpoint that restores cleanly (corrupt ones are moved aside), else a fresh
  state: (state, step, the progress saved with it, e.g. train_seconds)."""
  found = ckpt.restore_newest(lambda step: (_restore(stage, ckpt, step, data), ckpt.saved_progress(step)),
                              stage.log)
  if found is None:
    return stage.fresh_state(), 0, {}
  stage.log(f"resumed from checkpoint at step {found[0]}")  # here: another process may yet reject a step
  (state, saved), step = found[1], found[0]
  return state, step, saved


def _restore(stage: Stage, ckpt: Checkpointer, step: int, data) -> dict:
  target = abstract_with_shardings(stage.steps.abstract_state, stage.steps.state_shardings)
  if data is None:
    return ckpt.restore(step, target)
  saved, template = ckpt.data_states(step), data.get_state()
  if saved is None or (len(saved) == jax.process_count() and worker_count(saved[0]) == worker_count(template)):
    return ckpt.restore(step, target, data)
  state = ckpt.restore(step, target)  # another process or worker count: the state as is, the data mapped
  data_state, note = stage.map_data_state(saved, template)
  data.set_state(data_state)
  stage.log(f"{note} (checkpoint written by {len(saved)} processes, resuming with {jax.process_count()})")
  return state


def _epoch_over(data) -> bool:
  """Whether `data` counts one epoch (lmtiny.training.epoch.OneEpoch) and its next batch is past it."""
  return isinstance(data, epoch.OneEpoch) and data.exhausted()


def _steps(stage: Stage, state, ckpt: Checkpointer, data, progress: Progress, stop_after) -> tuple[dict, dict]:
  """The steps of this segment: update, record, checkpoint on the cadence or a stop, periodic work."""
  t, start, budget = stage.cfg.train, progress.start, progress.budget
  stage.begin(state, progress)
  step, stop, ended_by = start, False, budget_lib.horizon(stage.kind, t)
  with Preemption() as preemption, profiling.StepProfiler(t, stage.workdir, start, stage.total_steps, stage.log,
                                                           enabled=stage.main) as profiler:
    preemption.inherit()
    while step < stage.total_steps:
      if step == start and (stop := preemption.decided(step)):
        stage.log(f"stopped (SIGTERM) before step {step + 1}: nothing new to save")
        break
      if step == start and budget.exhausted():
        stage.log(f"train.time_budget={budget.seconds:g}s was spent before step {step + 1}: nothing to train")
        ended_by = budget_lib.TIME_BUDGET
        break
      if step == start and _epoch_over(data):
        stage.log(f"the epoch of the data ended before step {step + 1}: nothing to train")
        ended_by = epoch.EPOCH
        break
      ckpt.check_errors()  # a failed async save surfaces here, one step later
      profiler.before_step(step + 1, state)
      state, step_metrics = stage.update(state, step, data)
      step += 1
      budget.stepped(step, step_metrics)
      profiler.after_step(step, state)
      stage.after_step(step, step_metrics, progress)
      # stop_after stops every process at once; a SIGTERM is agreed one step late (never a host sync)
      stop = preemption.decided(step, now=step == stop_after)
      if budget.reached():
        ended_by = budget_lib.TIME_BUDGET
      if _epoch_over(data):
        ended_by = epoch.EPOCH
      progress.ended = step == stage.total_steps or ended_by in (budget_lib.TIME_BUDGET, epoch.EPOCH)
      if step % t.checkpoint_every == 0 or progress.ended or stop:
        with budget.paused():
          stage.settle(progress)  # never checkpoint a state whose loss we have not seen to be finite
          ckpt.save(step, state, data, progress={"train_seconds": budget.spent()} if budget.active else None)
        progress.last_saved = step
      stage.periodic(state, step, progress)
      if stop:
        stage.log(f"stopped early (SIGTERM or stop_after): saved checkpoint at step {step}")
        break
      if ended_by == budget_lib.TIME_BUDGET:
        stage.log(f"train.time_budget={budget.seconds:g}s reached after step {step} "
                  f"({budget.spent():.1f}s of training): saved checkpoint at step {step}")
        break
      if ended_by == epoch.EPOCH:
        stage.log(f"one epoch of the data ended after step {step}: saved checkpoint at step {step}")
        break
    stage.settle(progress)
  ended_by = budget_lib.PREEMPTED if stop and not progress.ended else ended_by
  timed = {"train_seconds": budget.spent()} if budget.active else {}
  progress.writer.write(step, "run", {"seconds": progress.seconds(), "segment": start, "steps": step - start,
                                      "chips": metrics_lib.chip_count(), "chip": metrics_lib.chip_name(),
                                      "ended_by": ended_by, **timed, **stage.run_record(step, progress)})
  return state, {"step": step, "preempted": stop, "ended_by": ended_by,
                 "seconds": progress.seconds(), **timed, **stage.summary(step, progress)}
