"""Experiment trackers beside metrics.jsonl: train.trackers names them (lmtiny.config.TRACKERS).

- tensorboard: RUN/tensorboard/ event files (lmtiny.runs.tensorboard; the metrics writer's own).
- wandb: a Weights & Biases run (`pip install -e ".[track]"`) that gets every record the metrics
  writer writes, as `<split>/<field>` against the step (the same scalars TensorBoard gets, and the
  sample texts as strings), and the run's config (config.json). Its files go under RUN/wandb/. The
  run's W&B id is kept in RUN/tracking.json, so a resumed run continues the same W&B run (the steps
  after the checkpoint are logged again, as metrics.jsonl rewrites them). Fields: train.wandb_project,
  train.tracker_group (the W&B group: a sweep names one for its runs), train.wandb_mode ("offline"
  writes locally, no network or login; `wandb sync RUN/wandb/offline-run-*` uploads later; "" lets
  WANDB_MODE decide). The job type is the run's kind (train, sft, rl).
Only the main process tracks (the metrics writer is silent elsewhere).
"""
from __future__ import annotations

import json
import os
import uuid

from etils import epath

from lmtiny.config import tracker_names
from lmtiny.errors import first_line, UserError
from lmtiny.fs.atomic import atomic_write_json

STATE_FILE = "tracking.json"


def uses_tensorboard(train_cfg) -> bool:
  return "tensorboard" in tracker_names(train_cfg)


def open_trackers(cfg, workdir: str, kind: str) -> list:
  """The writers train.trackers asks for besides metrics.jsonl and TensorBoard (which the metrics
  writer keeps itself)."""
  return [WandbWriter(cfg, workdir, kind)] if "wandb" in tracker_names(cfg.train) else []


def _run_id(workdir: epath.Path) -> str:
  """The W&B run id of this run directory: made once, then read back (a resume continues that run)."""
  path = workdir / STATE_FILE
  state = json.loads(path.read_text()) if path.exists() else {}
  if "wandb_id" not in state:
    state["wandb_id"] = uuid.uuid4().hex[:12]
    atomic_write_json(path, state)
  return state["wandb_id"]


def run_name(workdir: str) -> str:
  """runs/tiny -> "runs/tiny"; /abs/runs/tiny/sft -> "tiny/sft": the directory and its parent."""
  parts = os.path.normpath(str(workdir)).split(os.sep)
  return "/".join(p for p in parts[-2:] if p)


class WandbWriter:
  """One W&B run per run directory; write(step, split, values) logs `split/key` with `step` as the x axis."""

  def __init__(self, cfg, workdir: str, kind: str):
    import wandb  # pylint: disable=g-import-not-at-top  (optional: the "track" extra; lmtiny.config checks it)
    t, path = cfg.train, epath.Path(workdir)
    run_id = _run_id(path)
    try:
      self.run = wandb.init(project=t.wandb_project, group=t.tracker_group or None, job_type=kind,
                            name=run_name(workdir), id=run_id, resume="allow", dir=str(path),
                            mode=t.wandb_mode or None, config=json.loads(cfg.to_json_best_effort()))
    except Exception as e:  # pylint: disable=broad-except  (no login, no network, a bad project name)
      raise UserError(f"config.train.trackers={t.trackers!r}: Weights & Biases did not start ({first_line(e)}); "
                      "`wandb login`, or --config.train.wandb_mode=offline") from None
    # every record carries its training step; W&B's own counter only orders them, so the steps a
    # resume writes again are kept too
    self.run.define_metric("step")
    self.run.define_metric("*", step_metric="step")

  def write(self, step: int, split: str, values: dict) -> None:
    row = {f"{split}/{k}": v for k, v in values.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    if row:
      self.run.log({"step": step, **row})

  def close(self) -> None:
    self.run.finish()
