"""SIGTERM as a request to stop: the training loop saves a checkpoint and returns.

Entry points install one `Preemption` first thing, so a SIGTERM during start-up (imports, data,
compilation) ends the run cleanly instead of killing it (exit 143); the loop's own handler
inherits a request the outer one caught. In a multi-process run every host must stop (and save)
at the same step, so the decision is agreed by an all-reduce of the flag. The all-reduce is read
one step late: it is dispatched after step s and read after step s + 1, by when the device has
finished step s anyway, so the host never waits for the step it just dispatched and keeps
preparing the next batch while the device works. A SIGTERM therefore stops the run one step
after the one it arrived in, on every host alike.
"""
from __future__ import annotations

import functools
import signal
from typing import Callable


class Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint and returns.

  `agree` (tests) replaces the cross-process all-reduce: flag -> a handle whose `result()` is the
  flag OR-ed over processes (None: jax's processes; a single process needs no agreement).
  """

  def __init__(self, agree: Callable[[bool], object] | None = None):
    self.requested = False
    self._previous = None
    self._agree = agree
    self._pending = None  # the all-reduce dispatched at the previous decision, not yet read

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

  def decided(self, step: int, now: bool = False) -> bool:
    """Whether to stop after `step`, the same answer on every process.

    `now`: a stop every process asks for at this same step (stop_after), taken at once. A
    SIGTERM reaching any host is agreed one step late (see the module docstring); the first
    decision of a loop agrees at once, as no step is in flight to wait for.
    """
    if now:
      self.requested = True
    agree = self._agree or _process_agreement()
    if agree is None:  # one process: nothing to agree on
      return self.requested
    handle = agree(self.requested)
    if self._pending is None:  # the first decision: read it now
      agreed = bool(handle.result())
      self._pending = _Known(agreed)
    else:
      agreed = bool(self._pending.result())
      self._pending = handle
    self.requested = self.requested or agreed
    return now or agreed

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _Known:
  """A handle whose result is already on the host."""

  def __init__(self, value: bool):
    self._value = value

  def result(self) -> bool:
    return self._value


class _DeviceAny:
  """An all-reduce (max) of one flag per process, dispatched without waiting for it."""

  def __init__(self, array):
    self._array = array

  def result(self) -> bool:
    return bool(self._array.addressable_data(0))


def _process_agreement() -> Callable[[bool], _DeviceAny] | None:
  import jax  # pylint: disable=g-import-not-at-top  (this module must import in no time)
  if jax.process_count() == 1:
    return None
  return _any_over_processes()


@functools.cache
def _any_over_processes() -> Callable[[bool], _DeviceAny]:
  """flag -> _DeviceAny: each process puts its flag on its devices of a 1-D mesh over all devices;
  a jitted max makes one replicated value. Dispatch returns at once (no host sync)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.devices()), ("hosts",))
  spread, replicated = NamedSharding(mesh, PartitionSpec("hosts")), NamedSharding(mesh, PartitionSpec())
  reduce = jax.jit(lambda flags: flags.max(), out_shardings=replicated)
  local = jax.local_device_count()

  def any_over_processes(flag: bool) -> _DeviceAny:
    flags = jax.make_array_from_process_local_data(spread, np.full(local, int(flag), np.int32))
    return _DeviceAny(reduce(flags))
  return any_over_processes
