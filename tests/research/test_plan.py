"""lmtiny.research.plan: overrides, the grid x list expansion, child names, the recorded plan, parts."""
import json
import os

import pytest

from lmtiny.config import base_config
from lmtiny.errors import ConfigError
from lmtiny.research import plan


def test_grid_crossed_with_runs_in_order_and_named_by_overrides():
  grid = plan.parse_grid(["train.flops_budget=1e12,3e12"])
  runs = [plan.parse_run("model.num_layers=1,model.d_model=64"), plan.parse_run("model.num_layers=2,model.d_model=96")]
  children = plan.expand(grid, runs)
  assert [c.name for c in children] == [
      "num_layers-1_d_model-64_flops_budget-1e12", "num_layers-1_d_model-64_flops_budget-3e12",
      "num_layers-2_d_model-96_flops_budget-1e12", "num_layers-2_d_model-96_flops_budget-3e12"]
  assert children[3].overrides == {"model.num_layers": "2", "model.d_model": "96", "train.flops_budget": "3e12"}


def test_names_use_longer_paths_where_two_fields_share_a_last_part():
  children = plan.expand(plan.parse_grid(["optim.lr=0.01", "sft.lr=0.1,0.2"]), [])
  assert [c.name for c in children] == ["optim.lr-0.01_sft.lr-0.1", "optim.lr-0.01_sft.lr-0.2"]


def test_overrides_are_typed_by_the_config_and_unknown_fields_refused():
  cfg = plan.apply_overrides(base_config(), {"model.num_layers": "3", "train.flops_budget": "1e12",
                                             "model.qk_norm": "true", "optim.name": "muon"})
  assert (cfg.model.num_layers, cfg.train.flops_budget, cfg.model.qk_norm, cfg.optim.name) == (3, 1e12, True, "muon")
  assert base_config().model.num_layers == 4  # a copy: the base is left as it was
  with pytest.raises(ConfigError, match=r"config.model.num_layer: no such field \(did you mean model.num_layers\?\)"):
    plan.apply_overrides(base_config(), {"model.num_layer": "2"})
  with pytest.raises(ConfigError, match=r"config.model.num_layers='two': not a int"):
    plan.apply_overrides(base_config(), {"model.num_layers": "two"})


@pytest.mark.parametrize("args, message", [
    (dict(grid=["model.num_layers"]), "--grid=model.num_layers: expected FIELD=VALUE"),
    (dict(grid=["model.num_layers=1,,2"]), "an empty value"),
    (dict(grid=["model.num_layers=1,1"]), "listed twice"),
    (dict(grid=["model.num_layers=1", "model.num_layers=2"]), "already a grid axis"),
    (dict(runs=["model.num_layers=1,model.num_layers=2"]), "set twice"),
    (dict(runs=["model.num_layers=1", "model.num_layers=1"]), "the same overrides"),
    (dict(runs=["model.num_layers=1"], grid=["model.num_layers=2"]), "--run and --grid both set model.num_layers"),
])
def test_bad_sweeps_are_one_line_errors(args, message):
  with pytest.raises(ConfigError, match=message):
    plan.expand(plan.parse_grid(args.get("grid", [])), [plan.parse_run(r) for r in args.get("runs", [])])


def test_runs_file(tmp_path):
  path = tmp_path / "runs.txt"
  path.write_text("# depth and width together\nmodel.num_layers=1,model.d_model=64\n\nmodel.num_layers=2  # deeper\n")
  assert plan.read_runs_file(str(path)) == [{"model.num_layers": "1", "model.d_model": "64"}, {"model.num_layers": "2"}]
  (tmp_path / "empty.txt").write_text("# nothing\n")
  with pytest.raises(ConfigError, match="no runs in it"):
    plan.read_runs_file(str(tmp_path / "empty.txt"))


def test_plan_recorded_once_resumed_when_equal_refused_when_not(tmp_path):
  workdir = str(tmp_path / "sweep")
  children = plan.expand(plan.parse_grid(["model.num_layers=1,2"]), [])
  first = plan.make_plan(base_config(), children, "configs/tiny.py")
  assert plan.record_plan(workdir, first) is True
  before = os.stat(os.path.join(workdir, plan.PLAN_FILE)).st_mtime_ns
  assert plan.record_plan(workdir, json.loads(json.dumps(first))) is False  # a resume
  other = plan.make_plan(base_config(), plan.expand(plan.parse_grid(["model.num_layers=1,3"]), []))
  with pytest.raises(ConfigError, match=r"holds another sweep \(children .*num_layers-2.*num_layers-3"):
    plan.record_plan(workdir, other)
  changed = base_config()
  changed.train.seq_len = 512
  with pytest.raises(ConfigError, match=r"another base config \(train.seq_len: 1024 -> 512"):
    plan.record_plan(workdir, plan.make_plan(changed, children))
  assert os.stat(os.path.join(workdir, plan.PLAN_FILE)).st_mtime_ns == before  # never rewritten
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("mine")
  with pytest.raises(ConfigError, match="holds no sweep.json: not a sweep this command made"):
    plan.record_plan(str(tmp_path / "other"), first)
  assert os.listdir(tmp_path / "other") == ["notes.txt"]


def test_parts_split_the_children_between_hosts():
  children = plan.expand(plan.parse_grid(["model.num_layers=1,2,3,4,5"]), [])
  parts = [plan.part_of(children, plan.parse_part(f"{k}/2")) for k in (1, 2)]
  assert [[c.overrides["model.num_layers"] for c in p] for p in parts] == [["1", "3", "5"], ["2", "4"]]
  assert plan.parse_part("auto", {"LMTINY_PROCESS_ID": "2", "LMTINY_NUM_PROCESSES": "4"}) == (3, 4)
  assert plan.parse_part("auto", {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}) == (1, 2)
  assert plan.parse_part("auto", {}) == (1, 1)
  for bad in ("0/2", "3/2", "1", "a/b"):
    with pytest.raises(ConfigError, match=f"--part={bad}: expected K/N"):
      plan.parse_part(bad)
