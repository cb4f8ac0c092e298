"""train.trackers=wandb (lmtiny.runs.tracking) in offline mode: the W&B run's own files, read back,
hold the scalars metrics.jsonl holds, the config, the group, the sample texts; a resume continues
the same W&B run. Skips without wandb (the "track" extra; .ci/run's second step installs it)."""
import glob
import json
import struct
import time

import pytest

wandb = pytest.importorskip("wandb")

from wandb.proto import wandb_internal_pb2  # noqa: E402  (after the importorskip)

from lm_fixtures import memory_data, one_device, tiny_config  # noqa: E402
from lmtiny.errors import UserError  # noqa: E402
from lmtiny.runs import metrics, tracking  # noqa: E402
from lmtiny.training.trainer import Trainer  # noqa: E402

BLOCK = 32768


def wandb_records(path: str):
  """The Record protos of a run-<id>.wandb file: W&B's transaction log, a LevelDB-style log (a
  7-byte ":W&B" header, then 32 KiB blocks of chunks, each <crc32, length, type> + payload; types
  1 full, 2 first, 3 middle, 4 last; a block's tail shorter than a chunk header is padding)."""
  data = open(path, "rb").read()
  assert struct.unpack("<4sHB", data[:7])[:2] == (b":W&B", 0xBEE1)
  pos, pending = 7, b""
  while pos + 7 <= len(data):
    if BLOCK - pos % BLOCK < 7:
      pos += BLOCK - pos % BLOCK
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0:  # zero padding to the block's end
      pos += BLOCK - pos % BLOCK
      continue
    chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
    pending = chunk if kind in (1, 2) else pending + chunk
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      yield record


def _finished(path: str) -> bool:
  return any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path))


def offline_runs(workdir, count: int) -> list[dict]:
  """Each of the `count` offline run directories' run record (id, group, job type, config) and
  history rows, oldest first. wandb's own process writes the file: run.finish() can return before
  it has (measured: 5 ms, the file still its 7-byte header), so this waits for each run's exit record."""
  paths, deadline = [], time.time() + 60
  while time.time() < deadline:
    paths = sorted(glob.glob(str(workdir / "wandb" / "offline-run-*" / "run-*.wandb")))
    if len(paths) == count and all(_finished(p) for p in paths):
      break
    time.sleep(0.2)
  assert len(paths) == count, paths
  out = []
  for path in paths:
    run, history = None, []
    for r in wandb_records(path):
      kind = r.WhichOneof("record_type")
      if kind == "run":
        run = r.run
      elif kind == "history":
        history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    out.append({"id": run.run_id, "group": run.run_group, "job_type": run.job_type, "project": run.project,
                "config": {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"},
                "history": history})
  return out


def _scalars(rows) -> dict:
  """{(split/field, step): value} of the numbers in W&B rows (the last row of a step wins, as a
  resumed run's rewritten steps do in metrics.jsonl)."""
  out = {}
  for row in rows:
    for key, value in row.items():
      if "/" in key and isinstance(value, (int, float)):
        out[(key, row["step"])] = value
  return out


@pytest.mark.slow(seconds=7)
def test_offline_wandb_run_holds_the_metrics_config_and_group_and_a_resume_continues_it(tmp_path):
  cfg = tiny_config(steps=6, eval_every=3, checkpoint_every=3, trackers="tensorboard,wandb", wandb_mode="offline",
                    tracker_group="sweep-lr")
  Trainer(one_device(cfg), str(tmp_path), memory_data(), log=lambda _: None).run(stop_after=3)
  Trainer(one_device(cfg), str(tmp_path), memory_data(), log=lambda _: None).run()  # resumes at 3
  runs = offline_runs(tmp_path, 2)
  assert runs[0]["id"] == runs[1]["id"] == json.load(open(tmp_path / "tracking.json"))["wandb_id"]
  assert {(r["group"], r["job_type"], r["project"]) for r in runs} == {("sweep-lr", "train", "lmtiny")}
  assert runs[1]["config"] == json.load(open(tmp_path / "config.json"))
  records = metrics.read_metrics(str(tmp_path))
  expected = {(f"{r['split']}/{k}", r["step"]): v for r in records for k, v in r.items()
              if k not in ("step", "split") and isinstance(v, (int, float))}
  logged = _scalars(runs[0]["history"] + runs[1]["history"])
  assert {"train/loss", "train/lr", "val/loss", "val/bpb", "run/seconds"} <= {key for key, _ in expected}
  assert logged == pytest.approx(expected)
  assert (tmp_path / "tensorboard").is_dir()  # beside TensorBoard, not instead of it


def test_sample_texts_and_records_reach_wandb_as_the_metrics_writer_writes_them(tmp_path):
  cfg = tiny_config(trackers="wandb", wandb_mode="offline", wandb_project="lmtiny-test")
  writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False,
                                 trackers=tracking.open_trackers(cfg, str(tmp_path), "sft"))
  writer.write(5, "sample", {"prompt": "def ", "text": "def f(x):"})
  writer.write(5, "chat", {"arc_easy": 0.25, "items": 8, "skipped": None})
  writer.close()
  (run,) = offline_runs(tmp_path, 1)
  assert (run["job_type"], run["project"], run["group"]) == ("sft", "lmtiny-test", "")
  rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in run["history"]]
  assert rows == [{"step": 5, "sample/prompt": "def ", "sample/text": "def f(x):"},
                  {"step": 5, "chat/arc_easy": 0.25, "chat/items": 8}]
  assert not (tmp_path / "tensorboard").exists()


def test_wandb_online_without_a_login_is_one_line_naming_the_way_out(tmp_path, monkeypatch):
  for name in ("WANDB_API_KEY", "WANDB_MODE"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home"))
  monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
  cfg = tiny_config(trackers="wandb", wandb_mode="online")
  with pytest.raises(UserError, match=r"^config.train.trackers='wandb': Weights & Biases did not start \(.*\); "
                                      r"`wandb login`, or --config.train.wandb_mode=offline$"):
    tracking.open_trackers(cfg, str(tmp_path), "train")
