"""Preemption: a SIGTERM on any host stops every host at one step, agreed one step late (no host
sync on the step just dispatched); stop_after stops at once. The cross-process all-reduce itself
runs in tests/parallel/test_multiprocess.py (test_sigterm_on_one_host_stops_both_at_the_same_step)."""
import os
import signal

from lmtiny.runs.preemption import Preemption


class FakeAgreement:
  """Stands in for the all-reduce: the other host's flag per decision, OR-ed with ours; records
  when each result is read."""

  def __init__(self, other_flags):
    self.other_flags, self.dispatched, self.read = other_flags, 0, []

  def __call__(self, flag):
    index, self.dispatched = self.dispatched, self.dispatched + 1
    agreement = self

    class Handle:
      def result(self):
        agreement.read.append(index)
        return flag or agreement.other_flags[index]
    return Handle()


def _decisions(preemption, steps, local_signal_at=None, stop_after=None):
  out = [preemption.decided(0)]
  for step in range(1, steps + 1):
    if step == local_signal_at:
      preemption.requested = True  # what the SIGTERM handler does, during this step
    out.append(preemption.decided(step, now=step == stop_after))
  return out


def test_a_signal_on_another_host_stops_this_one_a_step_later():
  # The other host's flag is up from its decision after step 3: both stop after step 4.
  agree = FakeAgreement([False] * 3 + [True] * 10)
  assert _decisions(Preemption(agree), 6) == [False] * 4 + [True] * 3


def test_the_decision_reads_the_previous_steps_all_reduce_only():
  agree = FakeAgreement([False] * 10)
  p = Preemption(agree)
  p.decided(0)
  assert agree.read == [0]  # the loop's first decision: nothing in flight, read at once
  for step in (1, 2, 3):
    p.decided(step)
    assert agree.dispatched == step + 1 and agree.read == [0] + list(range(1, step))


def test_a_local_signal_is_agreed_a_step_later():
  agree = FakeAgreement([False] * 10)
  assert _decisions(Preemption(agree), 5, local_signal_at=2) == [False, False, False, True, True, True]


def test_stop_after_stops_at_once():
  agree = FakeAgreement([False] * 10)
  assert _decisions(Preemption(agree), 5, stop_after=3)[:4] == [False, False, False, True]


def test_a_single_process_decides_from_its_own_flag():
  p = Preemption()
  assert not p.decided(1) and p.decided(2, now=True)
  with Preemption() as q:
    os.kill(os.getpid(), signal.SIGTERM)
    assert q.decided(3)
