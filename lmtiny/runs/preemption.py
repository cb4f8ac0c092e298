"""SIGTERM as a request to stop: the training loop saves a checkpoint and returns.

Entry points install one `Preemption` first thing, so a SIGTERM during start-up (imports, data,
compilation) ends the run cleanly instead of killing it (exit 143); the loop's own handler
inherits a request the outer one caught. In a multi-process run the decision is all-reduced
every step, so every host stops (and saves) at the same step.
"""
from __future__ import annotations

import signal


class Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint and returns."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, nothing to restore
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def inherit(self) -> None:
    """Takes over a SIGTERM an enclosing handler (the entry point's, installed at start) caught."""
    outer = getattr(self._previous, "__self__", None)
    if isinstance(outer, Preemption) and outer.requested:
      self.requested = True

  def decided(self, step: int) -> bool:
    """Whether to stop now, the same answer on every process: a SIGTERM reaching any host
    stops all of them at the same step (one small all-reduce per step in multi-process runs)."""
    import jax  # pylint: disable=g-import-not-at-top  (this module must import in no time)
    if jax.process_count() == 1:
      return self.requested
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    self.requested = bool(np.any(flags))
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
