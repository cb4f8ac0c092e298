"""A jax.profiler trace of a few train steps after warm-up, and the summary of where the device time went.

    --config.train.profile_steps=2 [--config.train.profile_skip=1]

Each start of a run (a fresh run or a resume) runs `profile_skip` steps (default 1: the step that
compiles), then traces the next `profile_steps` steps into RUN/profile/ (TensorBoard: `tensorboard
--logdir RUN/profile`, the Profile tab; Perfetto: open RUN/profile/plugins/profile/<time>/
perfetto_trace.json.gz at ui.perfetto.dev). The window starts and ends with the device idle (the
state is waited for), so it holds exactly those steps' work, and whatever the run does on their
cadence (an evaluation, a sample). Then it prints the summary of lmtiny.runs.trace_summary (shares
of device time in matmuls, attention, collectives, elementwise work and idle; the top operations)
and writes it to RUN/profile/summary.md and summary.json. Only process 0 traces (its own devices).
Host tracing runs at level 3, so XLA:CPU's operations appear too; Python is not traced.
`python -m lmtiny.bench --profile DIR` traces one step the same way (profile_call).
"""
from __future__ import annotations

import glob
import os
from typing import Any, Callable

import jax
from etils import epath

from lmtiny.fs.atomic import atomic_write, atomic_write_json
from lmtiny.runs import trace_summary

PROFILE_DIR = "profile"


def _traces(logdir: str) -> set[str]:
  return set(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "perfetto_trace.json.gz")))


def start_trace(logdir: str) -> set[str]:
  """Starts a jax.profiler trace into `logdir` (see the module's docstring for its options); returns
  the traces already there, for summarize_new_trace."""
  os.makedirs(logdir, exist_ok=True)
  before = _traces(logdir)
  options = jax.profiler.ProfileOptions()
  options.host_tracer_level = 3  # XLA:CPU's thunks (its "device" operations) are host events at level 3
  options.python_tracer_level = 0
  jax.profiler.start_trace(logdir, create_perfetto_trace=True, profiler_options=options)
  return before


def summarize_new_trace(logdir: str, before: set[str]) -> dict | None:
  """lmtiny.runs.trace_summary's summary of the newest trace under `logdir` not in `before` (read
  with the HLO its .xplane.pb holds), plus its path (`trace`) and the backend; None if none appeared."""
  new = sorted(_traces(logdir) - before, key=os.path.getmtime)
  if not new:
    return None
  planes = glob.glob(os.path.join(os.path.dirname(new[-1]), "*.xplane.pb"))
  trace = trace_summary.load_trace(new[-1])
  hlo = trace_summary.hlo_ops(epath.Path(planes[0]).read_bytes(), trace_summary.trace_modules(trace)) if planes else None
  summary = trace_summary.summarize(trace, hlo=hlo)
  summary.update(trace=new[-1], backend=jax.default_backend())
  return summary


def format_profile(summary: dict, *, steps: int, span: str) -> list[str]:
  """The summary's lines (trace_summary.format_summary), headed `profile: SPAN on BACKEND: `."""
  return trace_summary.format_summary(summary, steps=steps, header=f"profile: {span} on {summary['backend']}: ")


def profile_call(logdir: str, call: Callable[[], Any]) -> dict | None:
  """Traces one `call()` (whatever it returns is waited for; wait for its inputs before) into
  `logdir` and returns summarize_new_trace's summary of it."""
  before = start_trace(logdir)
  try:
    jax.block_until_ready(call())
  finally:
    jax.profiler.stop_trace()
  return summarize_new_trace(logdir, before)


class StepProfiler:
  """Starts a trace before step `start + skip + 1` of a segment that begins at `start`, stops it
  after `steps` steps (or at the segment's end), then summarizes it (see the module's docstring)."""

  def __init__(self, train_cfg, workdir: str, start: int, total_steps: int, log: Callable[[str], None],
               enabled: bool = True):
    self.steps, self.log = int(train_cfg.profile_steps), log
    self.first = start + int(train_cfg.profile_skip) + 1
    self.last = min(self.first + self.steps - 1, total_steps)
    self.enabled = enabled and self.steps > 0 and self.first <= total_steps
    self.logdir = str(epath.Path(workdir) / PROFILE_DIR)
    self.active, self._before, self._step = False, set(), start
    if enabled and self.steps > 0 and not self.enabled:
      log(f"profile: not captured: step {self.first} (after train.profile_skip={train_cfg.profile_skip} steps of "
          f"this start, at step {start}) is past the last step {total_steps}")
    if self.enabled and "://" in self.logdir:
      self.enabled = False
      log(f"profile: not captured: jax.profiler writes local files only, and the run is at {workdir}")

  def __enter__(self) -> StepProfiler:
    return self

  def __exit__(self, kind, error, tb) -> None:
    if error is None:
      self.stop(self._step)
    elif self.active:  # the run failed: end the trace, summarize nothing
      self.active = False
      jax.profiler.stop_trace()

  def before_step(self, step: int, state) -> None:
    """Called before the update that makes step `step` (1-based)."""
    if self.enabled and not self.active and step == self.first:
      jax.block_until_ready(state)  # the trace holds this window's work only
      self._before = start_trace(self.logdir)
      self.active = True

  def after_step(self, step: int, state) -> None:
    """Called once step `step` is made (its state may still be computing)."""
    self._step = step
    if self.active and step >= self.last:
      jax.block_until_ready(state)
      self.stop(step)

  def stop(self, step: int) -> None:
    """Ends the trace (also when the segment stops early) and writes and prints the summary."""
    if not self.active:
      return
    self.active = False
    jax.profiler.stop_trace()
    summary = summarize_new_trace(self.logdir, self._before)
    if summary is None:
      self.log(f"profile: no perfetto_trace.json.gz appeared under {self.logdir}")
      return
    steps = step - self.first + 1
    span = f"steps {self.first}-{step}" if steps > 1 else f"step {step}"
    summary.update(first_step=self.first, last_step=step)
    lines = format_profile(summary, steps=steps, span=span)
    md = os.path.join(self.logdir, "summary.md")
    atomic_write(md, ("# Profile\n\n```text\n" + "\n".join(lines) + f"\n```\n\ntrace: {summary['trace']}\n").encode())
    atomic_write_json(os.path.join(self.logdir, "summary.json"), summary)
    for line in lines:
      self.log(line)
    self.log(f"profile: trace {summary['trace']} (tensorboard --logdir {self.logdir}; ui.perfetto.dev) | summary {md}")
