"""A fixed wall-clock budget for pretraining (train.time_budget, seconds; 0 = off), and what ended a run.

Training seconds count the optimizer steps only: not the compilation (in the first step of every
start of the command), the evaluations, samples and CORE scores, nor the checkpoint saves (the loop
and the trainer run those inside `Budget.paused()`). The clock is read only where the device has
finished a step (its metrics are synchronised first), so a reading is the end of that step:

- The first step of a segment compiles, so it is not timed; once the second step is measured, the
  first is credited with the second's time (so a resumed run does not get one step for free).
- Metrics are read one step late: after step k is dispatched the host waits for step k - 1, by when
  the device is already busy with step k, and that reading is free. When the budget is within two
  step times of the last reading, the host also waits for step k itself: the run then stops at the
  first step boundary at or after the budget. (A step more than twice as slow as the one before is
  seen one step late: the run stops one step after that boundary.) One process only: with several,
  each host's clock would give its own LR and stop, so the trainer refuses that.
- The seconds spent are saved with every checkpoint (lmtiny.runs.checkpoint, item "progress") and
  restored, so a run killed and resumed spends its budget once.

The learning rate follows the budget (`budget_lr`): its position is progress = training seconds /
budget, not step / steps. Warmup stays in steps (`optim.warmup_steps`); after it, `cosine` runs
from progress 0 to 1, and `wsd` / `warmdown` are constant until progress 1 - `optim.decay_fraction`,
then linear to `lr * min_lr_ratio` at the budget. The trainer passes the LR as a multiplier of a
constant schedule, a traced argument of the step (lmtiny.training.steps, `lr_scaled`), so nothing
recompiles as it changes.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Iterator, Protocol

import jax

TIME_BUDGET = "time_budget"
PREEMPTED = "preempted"  # a SIGTERM (or stop_after): the run is not over; re-running resumes it


def horizon(kind: str, t) -> str:
  """What a run that reached its last step was ended by: pretraining's horizon field (train.steps,
  train.tokens_per_param or train.flops_budget), "steps" for other kinds."""
  if kind != "train":
    return "steps"
  if t.flops_budget > 0:
    return "flops_budget"
  return "tokens_per_param" if t.tokens_per_param > 0 else "steps"


def budget_lr(o, step: int, progress: float) -> float:
  """The learning rate of step `step` (0-based) of a budget run at `progress` (training seconds /
  budget) under optim.* (see the module docstring): the step schedule's
  (lmtiny.training.optim.lr_schedule) at step = progress x steps, with warmup in steps."""
  if step < o.warmup_steps:
    return o.lr * (step + 1 if o.schedule == "warmdown" else step) / o.warmup_steps
  p, floor = min(max(progress, 0.0), 1.0), o.lr * o.min_lr_ratio
  if o.schedule == "cosine":
    return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * p))
  if o.schedule == "constant" or o.decay_fraction <= 0 or p <= 1 - o.decay_fraction:
    return o.lr
  return floor + (o.lr - floor) * (1 - p) / o.decay_fraction


class Clock(Protocol):
  """Where a budget reads the time: `now()` in seconds, and `sync(tree)` waits until the device has
  computed `tree` (tests pass a simulated device)."""

  def now(self) -> float: ...

  def sync(self, tree: Any) -> None: ...


class DeviceClock:
  """time.perf_counter, and jax.block_until_ready."""

  def now(self) -> float:
    return time.perf_counter()

  def sync(self, tree: Any) -> None:
    jax.block_until_ready(tree)


class Budget:
  """Training seconds against `seconds` (0: no budget, and nothing is timed or synchronised).

  The loop calls `stepped(step, metrics)` after dispatching each step, `reached()` after it, runs
  saves and evaluations inside `paused()`, and saves `spent()`. The `spent` given is what earlier
  segments used (restored from the checkpoint)."""

  def __init__(self, seconds: float = 0.0, spent: float = 0.0, clock: Clock | None = None):
    self.seconds, self.active = float(seconds), seconds > 0
    self._clock = clock or DeviceClock()
    self._total = float(spent)  # training seconds up to the time _mark (counting) or in all (paused)
    self._mark: float | None = None  # when counting last (re)started; None: not counting
    self._last: tuple[int, float] | None = None  # the newest step boundary measured: (step, seconds)
    self._per_step: float | None = None  # seconds between the last two boundaries measured, per step
    self._pending: tuple[int, Any] | None = None  # the step dispatched whose end is not measured yet

  def _now(self) -> float:
    return self._total if self._mark is None else self._total + self._clock.now() - self._mark

  def _measure(self, step: int, metrics) -> None:
    """Step `step`'s end: wait for it, then read the clock."""
    self._clock.sync(metrics)
    seconds = self._now()
    done, before = self._last
    if step > done:
      per_step = (seconds - before) / (step - done)
      if self._per_step is None:  # the segment's first step (compiled, not timed) costs what the second did
        self._total, seconds = self._total + per_step, seconds + per_step
      self._per_step, self._last = per_step, (step, seconds)
    if self._pending is not None and self._pending[0] <= step:
      self._pending = None

  def stepped(self, step: int, metrics) -> None:
    """Step `step` was dispatched; `metrics` are its outputs (ready once it has run)."""
    if not self.active:
      return
    if self._last is None:  # the segment's first step: compiled, then run; counting starts at its end
      self._clock.sync(metrics)
      self._last, self._mark = (step, self._total), self._clock.now()
      return
    if self._pending is not None:
      self._measure(*self._pending)  # one step late: free, the device is busy with `step` meanwhile
    self._pending = (step, metrics)
    if self._per_step is None or self._last[1] + 2 * self._per_step >= self.seconds:
      self._measure(step, metrics)  # near the budget: this step's end, now

  def exhausted(self) -> bool:
    """Spent before this segment's first step (a finished budget run, re-run)."""
    return self.active and self._last is None and self._total >= self.seconds

  def reached(self) -> bool:
    """Whether the run ends after the step just dispatched: the newest boundary measured (that
    step's, or near the budget the one before) is at or after the budget."""
    return self.active and self._last is not None and self._last[1] >= self.seconds

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """Work that is not training (saves, evaluations, samples): the steps dispatched are waited
    for and counted first, then the clock stops until the block ends."""
    if not self.active or self._last is None:
      yield
      return
    if self._pending is not None:
      self._measure(*self._pending)
    self._total, self._mark = self._now(), None
    try:
      yield
    finally:
      self._mark = self._clock.now()

  def spent(self) -> float:
    """Training seconds so far, every segment's (the steps dispatched waited for)."""
    if self._pending is not None:
      self._measure(*self._pending)
    return self._now()

  def progress(self, step: int) -> float:
    """Estimated progress (training seconds / budget, at most 1) when `step` steps are done: the
    newest boundary's seconds plus a step time for each step since."""
    if self._last is None:
      return min(self._total / self.seconds, 1.0)
    done, seconds = self._last
    return min((seconds + max(step - done, 0) * (self._per_step or 0.0)) / self.seconds, 1.0)

  def lr_scale(self, o, step: int) -> float:
    """Step `step`'s LR (budget_lr) as a multiple of optim.lr."""
    return budget_lr(o, step, self.progress(step)) / o.lr
