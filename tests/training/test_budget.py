"""train.time_budget (lmtiny/training/budget.py): the LR at a progress, the stop, compile and
evaluation not counted, and the seconds a resumed run restores. The runs use a simulated device
(`FakeDevice`) for their clock, so the step at which a run stops is known exactly."""
import json
import math

import jax
import pytest

from lm_fixtures import memory_data, one_device, tiny_config
from lmtiny.config import base_config
from lmtiny.errors import ConfigError
from lmtiny.runs.checkpoint import Checkpointer
from lmtiny.training.budget import Budget, budget_lr, TIME_BUDGET
from lmtiny.training.optim import lr_schedule
from lmtiny.training.resolved import resolve_run
from lmtiny.training.trainer import Trainer


def _quiet(_):
  pass


def _expected_lr(schedule, lr, floor, warmup, decay_fraction, i, total):
  """The step schedules written out for step i of `total` (the decay a whole number of steps)."""
  if i < warmup:
    return lr * (i + 1 if schedule == "warmdown" else i) / warmup
  if schedule == "cosine":  # (no warmup here: the budget's cosine runs over the whole budget)
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * i / total))
  decay = decay_fraction * total
  if schedule == "constant" or i <= total - decay:
    return lr
  return floor + (lr - floor) * (total - i) / decay


@pytest.mark.parametrize("schedule,warmup", [("cosine", 0), ("wsd", 3), ("warmdown", 3), ("constant", 3)])
def test_lr_at_a_progress_is_the_step_schedules_at_that_fraction(schedule, warmup):
  o = base_config().optim
  o.update(schedule=schedule, lr=0.02, min_lr_ratio=0.1, warmup_steps=warmup, decay_fraction=0.25)
  total = 40  # 10 decay steps
  steps = lr_schedule(o, total)
  for i in range(total + 1):
    want = _expected_lr(schedule, 0.02, 0.002, warmup, 0.25, i, total)
    assert budget_lr(o, i, i / total) == pytest.approx(want, rel=1e-6, abs=1e-9), i
    assert float(steps(i)) == pytest.approx(want, rel=1e-5, abs=1e-9), i
  assert budget_lr(o, 1000, 2.0) == pytest.approx(0.002 if schedule != "constant" else 0.02)  # past the budget: the end's


class FakeClock:
  """Steps of `durations` seconds run one after another from their dispatch; `sync` waits for one."""

  def __init__(self):
    self.host, self.free, self.done = 0.0, 0.0, {}

  def dispatch(self, step, seconds):
    self.free = max(self.host, self.free) + seconds
    self.done[step] = self.free

  def now(self):
    return self.host

  def sync(self, step):
    self.host = max(self.host, self.done[step])


def _run_budget(budget_seconds, durations, compile_s=100.0):
  """The loop's calls on a Budget: (the step it stops after, the seconds it counted)."""
  clock = FakeClock()
  budget = Budget(budget_seconds, clock=clock)
  for step, seconds in enumerate(durations, 1):
    clock.host += compile_s if step == 1 else 0.0
    clock.dispatch(step, seconds)
    budget.stepped(step, step)
    if budget.reached():
      return step, budget.spent()
  raise AssertionError("the budget was never reached")


def test_stops_at_the_first_step_boundary_at_or_after_the_budget():
  for budget_seconds in (0.5, 1.0, 2.5, 4.0, 7.25):
    stop, spent = _run_budget(budget_seconds, [1.0] * 20)
    assert stop == max(2, math.ceil(budget_seconds)), budget_seconds  # the first step is not timed alone
    assert spent == stop * 1.0  # the compile (100 s) is not counted; the first step costs the second's
  # A step four times slower than the one before is seen one step late: within one step.
  stop, spent = _run_budget(5.5, [1.0, 1.0, 1.0, 1.0, 4.0, 1.0, 1.0])
  assert stop in (5, 6) and spent == sum([1.0, 1.0, 1.0, 1.0, 4.0, 1.0][:stop])


def test_paused_work_is_not_counted():
  clock = FakeClock()
  budget = Budget(100.0, clock=clock)
  for step in (1, 2, 3):
    clock.dispatch(step, 2.0)
    budget.stepped(step, step)
  with budget.paused():  # an evaluation: waits for step 3, then 50 s of host time
    assert clock.host == clock.done[3]
    clock.host += 50.0
  clock.dispatch(4, 2.0)
  budget.stepped(4, 4)
  assert budget.spent() == 8.0 and not budget.reached()


class FakeDevice:
  """A trainer's clock on a simulated device: a step runs `step_s` after the one before it (from its
  dispatch), the first dispatch compiles for `compile_s` on the host, an evaluation waits for the
  device and takes `eval_s`."""

  def __init__(self, trainer, step_s=1.0, compile_s=1000.0, eval_s=100.0):
    self.host, self.free, self.done, self.compiled = 0.0, 0.0, {}, False
    train_step, evaluate = trainer.steps.train_step, trainer.evaluate

    def step(*args):
      if not self.compiled:
        self.host, self.compiled = self.host + compile_s, True
      state, metrics = train_step(*args)
      self.free = max(self.host, self.free) + step_s
      self.done[id(metrics)] = self.free
      return state, metrics

    def evaluation(params):
      self.host = max(self.host, self.free) + eval_s
      return evaluate(params)

    trainer.steps.train_step, trainer.evaluate = step, evaluation

  def now(self):
    return self.host

  def sync(self, metrics):
    self.host = max(self.host, self.done[id(metrics)])


def _records(workdir):
  return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


@pytest.mark.slow(seconds=8)
def test_budget_run_stops_records_why_and_resumes_with_its_seconds(tmp_path):
  # 1 s steps, a 1000 s compile and 100 s evaluations (every 4 steps) against a 5.5 s budget: the
  # first boundary at or after it is step 6, though compile and evaluations took far longer.
  cfg = tiny_config(steps=20, time_budget=5.5, eval_every=4, checkpoint_every=4)
  first = Trainer(one_device(cfg), str(tmp_path), memory_data(), log=_quiet)
  summary = first.run(stop_after=3, clock=FakeDevice(first))  # killed after 3 steps (3 s spent)
  assert summary["step"] == 3 and summary["ended_by"] == "preempted" and summary["train_seconds"] == 3.0
  assert Checkpointer(str(tmp_path / "checkpoints")).saved_progress(3) == {"train_seconds": 3.0}
  second = Trainer(one_device(cfg), str(tmp_path), memory_data(), log=_quiet)
  summary = second.run(clock=FakeDevice(second))  # a fresh compile; the 3 s already spent restored
  assert summary["step"] == 6 and summary["ended_by"] == TIME_BUDGET and summary["train_seconds"] == 6.0
  records = _records(tmp_path)
  run = [r for r in records if r["split"] == "run"]
  assert [(r["ended_by"], r["steps"], r["train_seconds"]) for r in run] == [("preempted", 3, 3.0),
                                                                            (TIME_BUDGET, 3, 6.0)]
  assert [r["step"] for r in records if r["split"] == "val"] == [0, 4, 6]  # the end's evaluation at step 6
  # The LR followed the budget's progress (a traced argument of the step): step 6 ran at progress 5/5.5.
  lr = {r["step"]: r["lr"] for r in records if r["split"] == "train"}
  o = cfg.optim
  assert lr[6] == pytest.approx(budget_lr(o, 5, 5 / 5.5), rel=1e-5)
  assert lr[4] == pytest.approx(budget_lr(o, 3, 3 / 5.5), rel=1e-5) and lr[6] < lr[4]
  again = Trainer(one_device(cfg), str(tmp_path), memory_data(), log=_quiet)
  assert again.run(clock=FakeDevice(again))["step"] == 6  # a finished budget run trains no more


@pytest.mark.slow(seconds=4)
def test_budget_under_the_compile_time_still_trains(tmp_path):
  """The real clock: a 1 ms budget is far less than the compile, which is not counted."""
  summary = Trainer(one_device(tiny_config(steps=20, time_budget=1e-3)), str(tmp_path), memory_data(), log=_quiet).run()
  assert summary["step"] == 2 and summary["ended_by"] == TIME_BUDGET
  assert 1e-3 <= summary["train_seconds"] < summary["seconds"]
  assert _records(tmp_path)[-1]["ended_by"] == TIME_BUDGET


def test_several_processes_are_refused_in_one_line(tmp_path, monkeypatch):
  """Each host's clock would give its own LR and stop: refused before anything is written."""
  run = resolve_run(tiny_config(time_budget=60.0))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ConfigError, match=r"config.train.time_budget=60: one process only"):
    Trainer(run, str(tmp_path / "run"), memory_data(), log=_quiet)
  assert not (tmp_path / "run").exists()
