"""A sweep's table: one row per child with its final metrics, written as CSV and Markdown.

  rows = collect(workdir, runs)        # runs: lmtiny.research.sweep.child_configs(...)
  write_table(workdir, rows)           # WORKDIR/results.csv, WORKDIR/results.md

Columns: the child's name and overrides, its status (lmtiny.research.sweep.status), parameters
(all, lmtiny.plan.counts.count_params), steps trained, tokens (steps x train.batch_tokens),
training FLOPs (tokens x lmtiny.plan.counts.train_flops_per_token, causal-half), the FLOPs budget
(train.flops_budget, 0 when the horizon is set another way), the last logged train loss, the last
validation loss and bits per byte, and wall seconds over every segment. Metrics come from each
child's metrics.jsonl (lmtiny.runs.metrics); a child not trained yet has empty cells.
"""
from __future__ import annotations

import csv
import io

from etils import epath

from lmtiny.fs.atomic import atomic_write
from lmtiny.plan import counts
from lmtiny.research.sweep import child_dir, ChildRun, status
from lmtiny.runs import metrics

COLUMNS = ("name", "status", "params", "steps", "tokens", "flops", "budget", "train_loss", "val_loss", "val_bpb",
           "seconds")


def child_row(workdir: str, child: ChildRun) -> dict:
  cfg = child.run.cfg
  m, t = cfg.model, cfg.train
  records = metrics.read_metrics(child_dir(workdir, child.child.name))
  train = [r for r in records if r.get("split") == "train" and "loss" in r]
  val = [r for r in records if r.get("split") == "val" and "loss" in r]
  steps = max([r["step"] for r in records if r.get("split") in ("train", "run")], default=0)
  tokens = steps * t.batch_tokens
  return {"name": child.child.name, "overrides": dict(child.child.overrides), "status": status(workdir, child),
          "params": counts.count_params(m), "steps": steps, "total_steps": child.run.total_steps, "tokens": tokens,
          "flops": tokens * counts.train_flops_per_token(m, t.seq_len), "budget": float(t.flops_budget),
          "train_loss": train[-1]["loss"] if train else None, "val_loss": val[-1]["loss"] if val else None,
          "val_bpb": val[-1].get("bpb") if val else None,
          "seconds": round(metrics.wall_seconds(records), 1) if records else None}


def collect(workdir: str, runs: list[ChildRun]) -> list[dict]:
  return [child_row(workdir, child) for child in runs]


def _cell(value) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}" if abs(value) >= 1e5 else f"{value:.4f}".rstrip("0").rstrip(".")
  return str(value)


def override_fields(rows: list[dict]) -> list[str]:
  return list(dict.fromkeys(k for r in rows for k in r["overrides"]))


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
  """(header, cells) shared by the CSV and the Markdown table: name, each override, the metrics."""
  fields = override_fields(rows)
  header = ["name"] + fields + list(COLUMNS[1:])
  cells = [[r["name"]] + [r["overrides"].get(f, "") for f in fields] + [_cell(r[c]) for c in COLUMNS[1:]]
           for r in rows]
  return header, cells


def markdown_table(rows: list[dict]) -> str:
  header, cells = table_rows(rows)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(c) + " |" for c in cells]
  return "\n".join(lines) + "\n"


def write_table(workdir: str, rows: list[dict]) -> tuple[str, str]:
  """WORKDIR/results.csv and results.md (atomic writes); returns their paths."""
  header, cells = table_rows(rows)
  text = io.StringIO()
  writer = csv.writer(text, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(cells)
  root = epath.Path(workdir)
  atomic_write(root / "results.csv", text.getvalue().encode())
  atomic_write(root / "results.md", ("# Sweep results\n\n" + markdown_table(rows)).encode())
  return str(root / "results.csv"), str(root / "results.md")
