"""Where training figures go: stdout, metrics.jsonl, TensorBoard events and a loss-curve PNG.

MFU (model FLOPs utilisation) = achieved training FLOP/s / (chips x dense bf16 peak), with
training FLOPs per token from `lmtiny.plan.counts.train_flops_per_token`:
    6 * N_matmul + 6 * L * T * H * Dh
(N_matmul: every weight matrix that multiplies, lm_head included, the embedding lookup
excluded; the attention term counts the causal half of the score matrix, MaxText's convention,
half of nanochat's 12 * L * T * H * Dh). The trainer and lmtiny.bench print both, each named:
"causal-half" (6 * L * T * H * Dh) and "nanochat" (12 * L * T * H * Dh).
"""
from __future__ import annotations

import json
import math
from typing import Sequence

import jax
from etils import epath  # local paths and gs:// alike

from lmtiny.fs.atomic import atomic_write
from lmtiny.parallel.chips import chip_of_device_kind
from lmtiny.plan.counts import PEAK_FLOPS
from lmtiny.runs import tensorboard as tensorboard_lib
from lmtiny.runs.figures import new_figure, save_figure

def chip_name(device=None) -> str | None:
  return chip_of_device_kind((device or jax.devices()[0]).device_kind)


def chip_count() -> int:
  """Chips in the job; CPU counts as one host however many emulated devices."""
  return 1 if chip_name() == "cpu" else jax.device_count()


def peak_flops_total() -> float | None:
  """Dense bf16 peak of all chips in the job."""
  name = chip_name()
  return None if name is None else PEAK_FLOPS[name] * chip_count()


def mfu(flops_per_token: float, tokens_per_second: float) -> float | None:
  peak = peak_flops_total()
  return None if peak is None else flops_per_token * tokens_per_second / peak


def bits_per_byte(loss_nats_sum: float, num_bytes: float) -> float:
  return loss_nats_sum / (math.log(2) * max(num_bytes, 1.0))


class MetricsWriter:
  """Writes only on the main process; every other process gets a silent writer. `tensorboard`:
  TensorBoard event files too; `trackers`: more writers given every record, write(step, split,
  values) and close() (lmtiny.runs.tracking: Weights & Biases)."""

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None,
               tensorboard: bool = True, trackers: Sequence = ()):
    self.enabled = enabled
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.tb, self.trackers = None, list(trackers)
    if not enabled:
      return
    if resume_step is not None:
      self._truncate_after(resume_step)
    if tensorboard:  # the steps after the checkpoint are written again (all of them from scratch: step 0 included)
      self.tb = tensorboard_lib.EventWriter(str(epath.Path(workdir) / "tensorboard"),
                                            drop_from=None if resume_step is None else (resume_step + 1 if resume_step else 0))

  def _truncate_after(self, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: drop their old records (all of
    them when it starts over from step 0)."""
    if not self.path.exists():
      return
    keep = [json.dumps(r) + "\n" for r in parse_records(self.path.read_text())  # from scratch (0): none
            if step > 0 and r.get("step", 0) <= step]
    atomic_write(self.path, "".join(keep).encode())

  def write(self, step: int, split: str, values: dict) -> None:
    if not self.enabled:
      return
    values = {k: v for k, v in values.items() if v is not None}
    record = {"step": step, "split": split, **values}
    line = json.dumps(record) + "\n"
    if "://" in str(self.path):  # object stores cannot append: rewrite the whole (small) file
      old = self.path.read_text() if self.path.exists() else ""
      atomic_write(self.path, (old + line).encode())
    else:
      with self.path.open("a") as f:
        f.write(line)
    if self.tb is not None:
      self.tb.scalars(step, {f"{split}/{k}": v for k, v in values.items() if isinstance(v, (int, float))})
    for tracker in self.trackers:
      tracker.write(step, split, values)

  def close(self) -> None:
    for tracker in self.trackers:
      tracker.close()
    if self.tb is not None:
      self.tb.close()


def parse_records(text: str) -> list[dict]:
  """metrics.jsonl's records. A line that does not parse is skipped: the torn end of an append
  that a power loss cut short (the next resume rewrites the file without it)."""
  records = []
  for line in text.splitlines():
    try:
      record = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict):
      records.append(record)
  return records


def read_metrics(workdir: str) -> list[dict]:
  path = epath.Path(workdir) / "metrics.jsonl"
  return parse_records(path.read_text()) if path.exists() else []


def wall_seconds(records: list[dict]) -> float:
  """Wall time over a run's segments (each start or resume restarts its clock; records carry
  `seconds` on that clock and `segment`, the step the segment started from). A segment counts up
  to its last kept record, so one that a kill -9 ended (it wrote no "run" record) still counts.
  Records from before `segment` existed: their "run" records' seconds."""
  segments, legacy = {}, 0.0
  for r in records:
    if r.get("split") not in ("train", "rl", "run") or "seconds" not in r:
      continue
    if "segment" in r:
      segments[r["segment"]] = max(segments.get(r["segment"], 0.0), r["seconds"])
    elif r["split"] == "run":
      legacy += r["seconds"]
  return legacy + sum(segments.values())


def plot_loss_curve(workdir: str) -> str | None:
  """loss.png: train loss and validation loss / bpb against step."""
  records = read_metrics(workdir)
  train = [(r["step"], r["loss"]) for r in records if r["split"] == "train" and "loss" in r]
  val = [(r["step"], r["loss"], r.get("bpb")) for r in records if r["split"] == "val"]
  if not train and not val:
    return None
  fig, ax = new_figure(7, 4)
  if train:
    ax.plot(*zip(*train), label="train loss", lw=1)
  if val:
    ax.plot([v[0] for v in val], [v[1] for v in val], "o-", label="val loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.grid(alpha=0.3)
  if val and all(v[2] is not None for v in val):
    ax2 = ax.twinx()
    ax2.plot([v[0] for v in val], [v[2] for v in val], "s--", color="tab:red", label="val bpb")
    ax2.set_ylabel("bits per byte")
    ax2.legend(loc="upper center")
  ax.legend(loc="upper right")
  return save_figure(fig, epath.Path(workdir) / "loss.png")
