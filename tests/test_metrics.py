"""Metrics: chip detection for MFU, bits per byte, metrics.jsonl on resume."""
import json
import math
from types import SimpleNamespace

import pytest

from lmtiny import metrics


@pytest.mark.parametrize("kind,chip", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                       ("TPU v5 lite", "v5e"), ("TPU v5", "v5p"), ("TPU v6 lite", "v6e"),
                                       ("TPU v4", "v4"), ("cpu", "cpu"), ("NVIDIA A10G", None)])
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


def test_disabled_writer_writes_nothing(tmp_path):
  metrics.MetricsWriter(str(tmp_path), enabled=False).write(1, "train", {"loss": 1.0})
  assert not (tmp_path / "metrics.jsonl").exists()
