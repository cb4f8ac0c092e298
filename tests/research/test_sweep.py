"""lmtiny.research.sweep with real tiny training runs: the horizon from a FLOPs budget, a finished
child never trained again, an interrupted one resumed, a diverged one recorded; bad sweeps refused."""
import json
import os

import pytest

from lm_fixtures import ROOT, memory_data, one_device, tiny_config
from lmtiny import sweep as sweep_verb
from lmtiny.plan import counts
from lmtiny.research import plan, sweep
from lmtiny.runs import metrics


def _load(*_, **__):
  return memory_data()


def _quiet(_):
  pass


def _budget(cfg, steps):
  """The FLOPs budget that trains `steps` steps of cfg."""
  return steps * cfg.train.batch_tokens * counts.train_flops_per_token(cfg.model, cfg.train.seq_len)


def _snapshot(root):
  """Every file under `root` with its mtime and contents."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[path] = (os.stat(path).st_mtime_ns, f.read())
  return out


@pytest.mark.slow(seconds=6)
def test_finished_children_are_left_alone_an_interrupted_one_resumes_a_diverged_one_is_skipped(tmp_path):
  base = tiny_config(eval_every=100, eval_batches=0)
  two, four = f"{_budget(base, 2):g}", f"{_budget(base, 4):g}"
  children = plan.expand([], [plan.parse_run(f"model.init_std=1e30,train.flops_budget={two}"),
                              plan.parse_run(f"train.flops_budget={two}"), plan.parse_run(f"train.flops_budget={four}")])
  runs = sweep.child_configs(base, children, one_device)
  assert [r.run.total_steps for r in runs] == [2, 2, 4]  # the horizon comes from the budget
  workdir = str(tmp_path / "sweep")
  diverged, short, long = (c.name for c in children)
  happened = sweep.run_children(runs, workdir, load=_load, log=_quiet, stop_after={long: 2})
  assert happened == {diverged: "diverged", short: "trained", long: "stopped"}  # the sweep went on past it
  with open(os.path.join(workdir, diverged, sweep.FAILED_FILE)) as f:
    assert "loss=" in json.load(f)["error"]
  assert [sweep.status(workdir, r) for r in runs] == ["diverged", "done", "partial"]
  finished = _snapshot(sweep.child_dir(workdir, short))

  lines = []
  happened = sweep.run_children(runs, workdir, load=_load, log=lines.append)
  assert happened == {diverged: "diverged already", short: "done already", long: "trained"}
  assert _snapshot(sweep.child_dir(workdir, short)) == finished  # not one file touched
  assert "resumed from checkpoint at step 2" in lines
  records = metrics.read_metrics(sweep.child_dir(workdir, long))
  assert [r["segment"] for r in records if r["split"] == "run"] == [0, 2]
  assert [r["step"] for r in records if r["split"] == "train"] == [2, 4]
  assert [sweep.status(workdir, r) for r in runs] == ["diverged", "done", "done"]


def _main(args, capsys):
  status = sweep_verb.main(["lmtiny.sweep", "--config", os.path.join(ROOT, "configs", "tiny.py")] + args)
  return status, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--grid", "train.flops_budget=1e12,-1"], "error: sweep child flops_budget--1: config.train.flops_budget=-1.0: "
                                               "must be a finite number >= 0"),
    (["--grid", "train.flops_budget=1e12", "--config.train.tokens_per_param=20"],
     "config.train.flops_budget=1000000000000.0: sets the horizon, as train.tokens_per_param=20.0 does"),
    (["--grid", "model.num_layer=1,2"], "did you mean model.num_layers?"),
    ([], "error: nothing to sweep"),
    (["--grid", "model.num_layers=1", "--part", "2/1"], "error: --part=2/1: expected K/N"),
])
def test_bad_sweeps_stop_in_one_line_with_nothing_written(tmp_path, capsys, args, message):
  workdir = str(tmp_path / "sweep")
  status, err = _main(["--workdir", workdir] + args, capsys)
  assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err
  assert not os.path.exists(workdir)


def test_another_plan_on_a_sweep_directory_is_refused(tmp_path, capsys):
  workdir = tmp_path / "sweep"
  workdir.mkdir()
  recorded = plan.make_plan(tiny_config(), plan.expand(plan.parse_grid(["model.num_layers=1"]), []))
  (workdir / plan.PLAN_FILE).write_text(json.dumps(recorded))
  status, err = _main(["--workdir", str(workdir), "--grid", "model.num_layers=1,2"], capsys)
  assert status == 2 and "holds another sweep (children ['num_layers-1'] -> ['num_layers-1', 'num_layers-2']" in err
  assert os.listdir(workdir) == [plan.PLAN_FILE]
  status, err = _main(["--workdir", str(workdir), "--summarize"], capsys)
  assert status == 2 and "--summarize reads the plan from WORKDIR/sweep.json: give it --workdir alone" in err
