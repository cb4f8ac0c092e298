"""Running a sweep: its children in order, each a normal training run in WORKDIR/<child>.

  cfgs = child_configs(base_cfg, children)        # every child checked before any trains
  ran = run_children(cfgs, workdir, part=(1, 1))  # trains what is not done; resumes what was cut

A child is a training run like `python -m lmtiny.train` makes (resolve_run, load_data, Trainer,
the report card), in this process: it takes its run directory's lock, and resumes from its newest
checkpoint. Its status is read from its directory alone (so hosts running other parts of the
sweep need share nothing else): `done` when its newest checkpoint is its last step (never trained
again, nothing in it rewritten), `partial` when a checkpoint is older (resumed), `diverged` when
its training diverged (WORKDIR/<child>/sweep_failed.json holds the error; remove the file to try
again), else `pending`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable

from etils import epath

from lmtiny.data.dataset import load_data
from lmtiny.errors import UserError
from lmtiny.fs import outputs
from lmtiny.fs.atomic import atomic_write_json
from lmtiny.research.plan import apply_overrides, Child
from lmtiny.runs import card
from lmtiny.runs.directory import checkpoint_steps
from lmtiny.training.loop import TrainingDiverged
from lmtiny.training.resolved import resolve_run, ResolvedRun
from lmtiny.training.trainer import Trainer

FAILED_FILE = "sweep_failed.json"
STATUSES = ("done", "partial", "diverged", "pending")


@dataclasses.dataclass(frozen=True)
class ChildRun:
  child: Child
  run: ResolvedRun  # checked and resolved: total_steps is its horizon


def child_dir(workdir: str, name: str) -> str:
  return str(epath.Path(workdir) / name)


def child_configs(base_cfg, children: list[Child], resolve: Callable = resolve_run) -> list[ChildRun]:
  """Every child's config, checked and resolved (a bad one: its error, naming the child)."""
  out = []
  for child in children:
    try:
      out.append(ChildRun(child, resolve(apply_overrides(base_cfg, child.overrides))))
    except UserError as e:
      raise type(e)(f"sweep child {child.name}: {e}") from None
  return out


def status(workdir: str, child: ChildRun) -> str:
  """done | partial | diverged | pending, from the child's directory (module docstring)."""
  root = child_dir(workdir, child.child.name)
  if (epath.Path(root) / FAILED_FILE).exists():
    return "diverged"
  steps = checkpoint_steps(root)
  if not steps:
    return "pending"
  return "done" if steps[-1] >= child.run.total_steps else "partial"


def train_child(run: ResolvedRun, workdir: str, data, log: Callable[[str], None] = print,
                stop_after: int | None = None) -> dict:
  """One child trained as lmtiny.train trains a run: returns the trainer's summary."""
  outputs.check_output_dir(workdir, "--workdir")
  summary = Trainer(run, workdir, data, log=log).run(stop_after)
  card.update_for(workdir)
  return summary


def _data_key(cfg) -> str:
  return json.dumps([cfg.data.to_dict(), cfg.model.vocab_size, cfg.train.seq_len], sort_keys=True)


def run_children(runs: list[ChildRun], workdir: str, *, load: Callable = load_data,
                 log: Callable[[str], None] = print, stop_after: dict[str, int] | None = None) -> dict:
  """Trains `runs` (this host's part) in order, skipping done and diverged ones: {name: what
  happened} ("done already", "trained", "diverged", "stopped"). A stopped child (SIGTERM, or
  `stop_after` {name: step}, as a preemption would) ends the sweep there: re-run to resume."""
  data_cache, happened = {}, {}
  for i, child in enumerate(runs, 1):
    name, cfg = child.child.name, child.run.cfg
    was = status(workdir, child)
    if was in ("done", "diverged"):
      log(f"== {i}/{len(runs)} {name}: {was} already")
      happened[name] = f"{was} already"
      continue
    log(f"== {i}/{len(runs)} {name}: {'resuming' if was == 'partial' else 'training'} "
        f"({child.run.total_steps} steps)")
    key = _data_key(cfg)
    if key not in data_cache:
      data_cache[key] = load(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=cfg.train.seq_len)
    root = child_dir(workdir, name)
    try:
      summary = train_child(child.run, root, data_cache[key], log, (stop_after or {}).get(name))
    except TrainingDiverged as e:  # recorded, and the sweep goes on (a failed save stops it: exit 1)
      atomic_write_json(epath.Path(root) / FAILED_FILE, {"error": str(e)})
      log(f"== {name}: failed: {e} (recorded in {root}/{FAILED_FILE}; remove it to try again)")
      happened[name] = "diverged"
      continue
    if summary["preempted"]:
      log(f"== {name}: stopped at step {summary['step']}: re-run the same command to resume the sweep")
      happened[name] = "stopped"
      return happened
    last = summary["val"][-1] if summary["val"] else None  # (step, loss, bpb) of this segment's last evaluation
    log(f"== {name}: done, {summary['step']} steps" + (f" | val loss {last[1]:.4f}, bpb {last[2]:.4f}" if last else ""))
    happened[name] = "trained"
  return happened
