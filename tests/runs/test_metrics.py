"""Metrics: chip detection for MFU, bits per byte, metrics.jsonl on resume."""
import json
import math
from types import SimpleNamespace

import pytest

from lmtiny.runs import metrics


@pytest.mark.parametrize("kind,chip", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                       ("TPU v5 lite", "v5e"), ("TPU v5", "v5p"), ("TPU v6 lite", "v6e"),
                                       ("TPU v4", "v4"), ("cpu", "cpu"), ("NVIDIA A10G", None),
                                       ("NVIDIA A100-SXM4-40GB", "a100_40"), ("NVIDIA A100-SXM4-80GB", "a100"),
                                       ("NVIDIA GeForce RTX 4090", "rtx4090"), ("NVIDIA GeForce RTX 3080", "rtx3080"),
                                       ("NVIDIA GeForce RTX 3080 Ti", None), ("NVIDIA GeForce RTX 3090", "rtx3090")])
def test_chip_from_device_kind(kind, chip):
  assert metrics.chip_name(SimpleNamespace(device_kind=kind)) == chip


def test_bits_per_byte_is_nats_over_bytes_in_bits():
  assert metrics.bits_per_byte(loss_nats_sum=math.log(2) * 300, num_bytes=100) == pytest.approx(3.0)


def test_resumed_run_replaces_records_after_its_checkpoint(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path))
  for step in (10, 20, 30):
    writer.write(step, "train", {"loss": 1.0 / step})
  writer.close()
  # The run died after step 30 but its last checkpoint was step 20: steps 21.. will be redone.
  writer = metrics.MetricsWriter(str(tmp_path), resume_step=20)
  writer.write(30, "train", {"loss": 0.5})
  writer.close()
  records = metrics.read_metrics(str(tmp_path))
  assert [(r["step"], r["loss"]) for r in records] == [(10, 0.1), (20, 0.05), (30, 0.5)]
  assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["split"] == "train"


def test_a_torn_last_line_is_skipped_and_dropped_on_resume(tmp_path):
  # Power loss mid-append leaves half a record: reading skips it, and the resumed writer rewrites
  # the file without it (before, json.loads raised and the run could not resume).
  writer = metrics.MetricsWriter(str(tmp_path))
  writer.write(10, "train", {"loss": 1.0})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 20, "split": "tr')
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [10]
  writer = metrics.MetricsWriter(str(tmp_path), resume_step=10)
  writer.write(20, "train", {"loss": 0.5})
  writer.close()
  assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [10, 20]


def test_wall_seconds_counts_a_segment_that_a_kill_ended():
  records = [
      {"step": 10, "split": "train", "seconds": 30.0, "segment": 0},
      {"step": 20, "split": "train", "seconds": 55.0, "segment": 0},   # killed here: no "run" record
      {"step": 20, "split": "val", "seconds": 999.0, "segment": 0},    # not a clock reading
      {"step": 30, "split": "train", "seconds": 25.0, "segment": 20},
      {"step": 30, "split": "run", "seconds": 28.0, "segment": 20},
      {"step": 31, "split": "rl", "seconds": 4.0, "segment": 30},
  ]
  assert metrics.wall_seconds(records) == 55.0 + 28.0 + 4.0
  legacy = [{"step": 5, "split": "train", "loss": 1.0}, {"step": 5, "split": "run", "seconds": 7.0},
            {"step": 9, "split": "run", "seconds": 3.0}]
  assert metrics.wall_seconds(legacy) == 10.0


def test_disabled_writer_writes_nothing(tmp_path):
  metrics.MetricsWriter(str(tmp_path), enabled=False).write(1, "train", {"loss": 1.0})
  assert not (tmp_path / "metrics.jsonl").exists()
