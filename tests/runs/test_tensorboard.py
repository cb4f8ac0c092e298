"""lmtiny.runs.tensorboard's event files, read back by TensorBoard itself (the test extra installs it)."""
import os

import pytest

from lmtiny.runs import metrics, tensorboard

event_multiplexer = pytest.importorskip("tensorboard.backend.event_processing.event_multiplexer")


def _scalars(logdir, tag):
  acc = event_multiplexer.EventMultiplexer().AddRunsFromDirectory(str(logdir)).Reload().GetAccumulator(".")
  return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_crc32c_check_value():
  assert tensorboard.crc32c(b"123456789") == 0xE3069283  # CRC-32C (Castagnoli)'s published check value
  assert tensorboard.crc32c(b"") == 0


def test_tensorboard_reads_the_scalars_and_drops_what_a_resume_writes_again(tmp_path):
  first = metrics.MetricsWriter(str(tmp_path), resume_step=0)
  for step in range(1, 6):
    first.write(step, "train", {"loss": 10.0 - step, "lr": 0.5, "note": "not a number", "skipped": None})
  first.write(5, "val", {"loss": 4.25})
  first.close()  # killed after step 5; its checkpoint is step 3
  resumed = metrics.MetricsWriter(str(tmp_path), resume_step=3)
  for step in range(4, 7):
    resumed.write(step, "train", {"loss": 20.0 - step})
  resumed.close()
  assert _scalars(tmp_path / "tensorboard", "train/loss") == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 16.0), (5, 15.0), (6, 14.0)]
  assert _scalars(tmp_path / "tensorboard", "train/lr") == [(1, 0.5), (2, 0.5), (3, 0.5)]
  assert _scalars(tmp_path / "tensorboard", "val/loss") == []  # step 5's, after the checkpoint


def test_a_run_started_over_drops_every_earlier_point(tmp_path):
  for loss in (3.0, 2.0):  # the second attempt starts from scratch (no checkpoint)
    writer = metrics.MetricsWriter(str(tmp_path), resume_step=0)
    writer.write(0, "val", {"loss": loss})
    writer.close()
  assert _scalars(tmp_path / "tensorboard", "val/loss") == [(0, 2.0)]


@pytest.mark.parametrize("flush_s", [0.0, 3600.0])
def test_object_store_logdir_gets_new_files_in_order(tmp_path, monkeypatch, flush_s):
  """An object store cannot append: each flush is a new event file, and TensorBoard reads the
  parts in name order (every write with flush_s=0, all at close with 3600)."""
  monkeypatch.setattr(tensorboard.EventWriter, "remote", True)  # the local directory stands in for gs://
  writer = tensorboard.EventWriter(str(tmp_path), remote_flush_s=flush_s)
  for step in range(1, 4):
    writer.scalars(step, {"loss": float(step)})
  writer.close()
  files = sorted(os.listdir(tmp_path))
  assert len(files) == (4 if flush_s == 0 else 2), files  # the header goes out at once
  assert _scalars(tmp_path, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0)]
