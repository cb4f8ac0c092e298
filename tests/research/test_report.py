"""lmtiny.research.report over a sweep whose children's final losses follow a known law: the table,
the plots, and a report with every fit (and, with too few budgets, the reason instead of a number)."""
import csv
import json
import os


from lm_fixtures import tiny_config
from lmtiny import sweep as sweep_verb
from lmtiny.plan import counts
from lmtiny.research import plan, report, sweep

SIZES = ("32", "64", "96")


def _fake_sweep(workdir, budgets):
  """A sweep directory whose children look finished: a last checkpoint and metrics.jsonl records
  with a Chinchilla-style loss 1.7 + 60 / N^0.3 + 40 / D^0.3 of each child's own N and D."""
  base = tiny_config()
  children = plan.expand(plan.parse_grid([f"model.d_model={','.join(SIZES)}",
                                          "train.flops_budget=" + ",".join(f"{b:g}" for b in budgets)]), [])
  plan.record_plan(workdir, plan.make_plan(base, children))
  runs = sweep.child_configs(base, children)
  for child in runs:
    root, cfg, steps = sweep.child_dir(workdir, child.child.name), child.run.cfg, child.run.total_steps
    os.makedirs(os.path.join(root, "checkpoints", str(steps), "state"))
    n, d = counts.count_params(cfg.model), steps * cfg.train.batch_tokens
    loss = 1.7 + 60 / n ** 0.3 + 40 / d ** 0.3
    with open(os.path.join(root, "metrics.jsonl"), "w") as f:
      for record in ({"step": steps, "split": "train", "loss": loss + 0.05, "seconds": 1.0, "segment": 0},
                     {"step": steps, "split": "val", "loss": loss, "bpb": loss / 2}):
        f.write(json.dumps(record) + "\n")
  return runs


def test_summary_writes_table_plots_and_every_fit(tmp_path):
  workdir = str(tmp_path / "sweep")
  fpt = counts.train_flops_per_token(tiny_config().model, 32) * 512
  runs = _fake_sweep(workdir, [fpt * s for s in (8, 24, 72, 216)])
  lines = report.summarize(workdir, runs)
  assert lines[1].startswith("frontier: L(C) = ")
  with open(os.path.join(workdir, "results.csv")) as f:
    table = list(csv.DictReader(f))
  assert len(table) == 12 and {r["status"] for r in table} == {"done"}
  assert [r["model.d_model"] for r in table[:4]] == ["32"] * 4 and table[0]["val_loss"] and table[0]["flops"]
  text = open(os.path.join(workdir, "report.md")).read()
  assert "Loss fitted: final validation loss" in text and "L(C) = E + A·C^-alpha over 4 frontier points" in text
  assert text.count("exponent") == 4  # approach 1's a and b, approach 2's a and b
  assert "Not fitted" not in text and "not fitted" not in text
  for name in ("loss_vs_flops.png", "frontier.png", "isoflop.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 1000 and f"![{name}]({name})" in text


def test_too_few_budgets_are_said_not_fitted(tmp_path, capsys):
  workdir = str(tmp_path / "sweep")
  fpt = counts.train_flops_per_token(tiny_config().model, 32) * 512
  _fake_sweep(workdir, [fpt * 8, fpt * 24])
  assert sweep_verb.main(["lmtiny.sweep", "--workdir", workdir, "--summarize"]) == 0
  out = capsys.readouterr().out
  assert "frontier: not fitted: 2 frontier points" in out
  text = open(os.path.join(workdir, "report.md")).read()
  assert "N_opt ~ C^a: not fitted: 2 FLOPs budgets with a frontier point: a power law with an error" in text
  assert "N* ~ C^a: not fitted: 2 FLOPs budgets with an IsoFLOP minimum" in text


def test_train_loss_is_fitted_when_a_child_has_no_validation(tmp_path):
  workdir = str(tmp_path / "sweep")
  fpt = counts.train_flops_per_token(tiny_config().model, 32) * 512
  runs = _fake_sweep(workdir, [fpt * 8, fpt * 24])
  path = os.path.join(sweep.child_dir(workdir, runs[0].child.name), "metrics.jsonl")
  with open(path) as f:
    records = [json.loads(line) for line in f if '"val"' not in line]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  rows = report.results.collect(workdir, runs)
  points, which = report.fit_points(rows)
  assert which.startswith("final train loss") and rows[0]["val_loss"] is None
  assert [p["loss"] for p in points] == [r["train_loss"] for r in rows]
