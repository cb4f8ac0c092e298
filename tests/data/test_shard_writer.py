"""Tests for lmtiny/data/shard_writer.py: text -> shards -> batches, resuming, sources, the CLI's errors."""
import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from array_record.python import array_record_module
from hypothesis import given, settings, strategies as st

from lmtiny.corpus.embedded import iter_embedded_documents
from lmtiny.corpus.sources import open_source, SourceError
from lmtiny.data import pipeline, prepare, shard_writer, shards
from lmtiny.data.shards import DataError
from lmtiny.tokenizer import train_tokenizer
from lm_fixtures import ROOT

LONG = "".join(iter_embedded_documents(60_000))   # > 2 pieces' worth: encoded in pieces
TEXTS = ["Hello, world.\n", "naïve café — 東京 🙂\n\tindented\n\n", "x" * 5000,
         "def f(a, b):\n    return a + b\n",
         "The quick brown fox jumps over the lazy dog. " * 40, LONG, "1234567 + 89 = 1234656", "\n", "last one"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tokenizer") / "tok")
  train_tokenizer(iter_embedded_documents(300_000), 512, path, seed=0)
  return path


@pytest.fixture(scope="module")
def tok(tok_dir):
  from lmtiny.tokenizer import Tokenizer
  return Tokenizer.load(tok_dir)


def write_texts(directory, texts):
  os.makedirs(directory, exist_ok=True)
  for i, text in enumerate(texts):
    with open(os.path.join(directory, f"{i:03d}.txt"), "w", encoding="utf-8") as f:
      f.write(text)
  return f"txt:{directory}/*.txt"


def all_records(directory, split):
  manifest = shards.load_manifest(str(directory))
  docs = shards.open_split(str(directory), manifest, split)
  return [docs[i].tolist() for i in range(len(docs))]


def run_cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "lmtiny.data.prepare", *args], capture_output=True, text=True,
                        env=env, timeout=120)


def test_text_to_shards_to_batches_round_trip(tmp_path, tok):
  spec = write_texts(tmp_path / "txt", TEXTS)
  out = tmp_path / "out"
  manifest = shard_writer.prepare_dataset(open_source(spec), tok, str(out), val_fraction=0.25, workers=1, docs_per_shard=3)
  is_val = [shard_writer.is_validation(i, 0.25) for i in range(len(TEXTS))]
  assert is_val == [True, False, False, False, True, False, False, False, True]
  for split, want_val in (("train", False), ("val", True)):
    texts = [t for t, v in zip(TEXTS, is_val) if v == want_val]
    assert all_records(out, split) == [tok.encode(t) for t in texts]   # independent reference: encode
    entry = manifest["splits"][split]
    assert entry["documents"] == len(texts)
    assert entry["tokens"] == sum(len(tok.encode(t)) for t in texts)
    assert entry["bytes"] == sum(len(t.encode()) for t in texts)
  assert [s["file"] for s in manifest["splits"]["train"]["shards"]] == [
      "train-00000.array_record", "train-00001.array_record", "train-00002.array_record"]
  assert manifest["dtype"] == "uint16" and manifest["tokenizer_hash"] == tok.hash
  assert sorted(os.listdir(out)) == ["manifest.json", "tokenizer", "train-00000.array_record",
                                     "train-00001.array_record", "train-00002.array_record",
                                     "val-00000.array_record", "val-00001.array_record", "val-00002.array_record"]
  # The shards' documents come back out of the pipeline whole and in order.
  docs = shards.open_split(str(out), shards.load_manifest(str(out)), "train")
  batches = pipeline.make_eval_iterator(docs, seq_len=64, batch_size=2, bos_id=tok.bos_id, num_batches=0)
  stream = np.concatenate([np.append(b["inputs"][r, :1], b["targets"][r]) for b in batches for r in range(2)])
  real = manifest["splits"]["train"]["tokens"] + manifest["splits"]["train"]["documents"]   # + a BOS each
  assert not stream[real:].any()   # the rest is padding
  stream = stream[:real]
  starts = np.flatnonzero(stream == tok.bos_id)
  texts = [tok.decode(part[1:]) for part in np.split(stream, starts[1:])]
  assert texts == [t for t, v in zip(TEXTS, is_val) if not v]


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=" \n\tab▁é1", max_size=300), size=st.integers(1, 20))
def test_split_for_encoding_cuts_only_before_a_lone_space(text, size):
  pieces = shard_writer.split_for_encoding(text, size)
  assert "".join(pieces) == text and (all(pieces) or pieces == [""])
  for piece in pieces[1:]:
    assert piece[0] == " " and not piece[1].isspace()
  for piece in pieces[:-1]:
    assert not piece[-1].isspace()


def test_pieces_encode_like_the_whole(tok):
  for size in (40, 1000):
    pieces = shard_writer.split_for_encoding(LONG, size)
    assert len(pieces) > 10
    assert [i for p in pieces for i in tok.encode(p)] == tok.encode(LONG)


def test_validation_split_is_evenly_spaced():
  for fraction, n in ((0.1, 1000), (0.01, 10_000), (0.3, 77), (0.05, 1155)):
    picked = [i for i in range(n) if shard_writer.is_validation(i, fraction)]
    assert picked[0] == 0 and len(picked) == int(np.floor((n - 1) * fraction)) + 1
    gaps = np.diff(picked)
    assert gaps.max() - gaps.min() <= 1
  assert not any(shard_writer.is_validation(i, 0.0) for i in range(100))


class Interrupted(Exception):
  pass


class FlakySource:
  """Wraps a source and fails after `fail_after` documents, like a job killed mid-way."""

  def __init__(self, source, fail_after):
    self.source, self.fail_after, self.name = source, fail_after, source.name

  @property
  def undecodable(self):
    return self.source.undecodable

  def iter_documents(self):
    for i, doc in enumerate(self.source.iter_documents()):
      if i == self.fail_after:
        raise Interrupted
      yield doc


def test_rerun_finishes_an_interrupted_job(tmp_path, tok, monkeypatch):
  monkeypatch.setattr(shard_writer, "_TASK_DOCS", 3)   # tokenize 3 documents at a time, so a crash finds work done
  texts = [f"document {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(23)]
  spec = write_texts(tmp_path / "txt", texts)
  kw = dict(val_fraction=0.2, workers=1, docs_per_shard=4)
  reference = shard_writer.prepare_dataset(open_source(spec), tok, str(tmp_path / "ref"), **kw)

  out = tmp_path / "out"
  with pytest.raises(Interrupted):
    shard_writer.prepare_dataset(FlakySource(open_source(spec), fail_after=10), tok, str(out), **kw)
  assert not (out / shards.MANIFEST_FILE).exists()
  progress = json.loads((out / shards.PROGRESS_FILE).read_text())
  assert progress["documents"] == 8 and progress["chunks"] == 2   # two whole chunks of 4 survive
  assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # the unfinished chunk was dropped
  assert not (out / "train-00002.array_record").exists()
  (out / ".train-00002.array_record.tmp").write_bytes(b"left by a killed process")

  with pytest.raises(DataError, match=r"progress.json: an unfinished job with other settings "
                                     r"\(docs_per_shard: 4 then, 5 now\)"):
    shard_writer.prepare_dataset(open_source(spec), tok, str(out), **dict(kw, docs_per_shard=5))
  resumed = shard_writer.prepare_dataset(open_source(spec), tok, str(out), **kw)
  assert resumed == reference
  for split in shards.SPLITS:
    assert all_records(out, split) == all_records(tmp_path / "ref", split)
  assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "ref"))   # no progress.json, no .tmp
  # Finished: running again changes nothing; other settings are refused.
  assert shard_writer.prepare_dataset(open_source(spec), tok, str(out), **kw) == reference
  with pytest.raises(DataError, match="already holds a finished dataset made with other settings"):
    shard_writer.prepare_dataset(open_source(spec), tok, str(out), **dict(kw, val_fraction=0.1))


def test_undecodable_bytes_are_counted_and_replaced(tmp_path, tok):
  (tmp_path / "a.txt").write_bytes(b"good text\n")
  (tmp_path / "b.txt").write_bytes(b"bad \xff\xfe bytes \xc3")
  manifest = shard_writer.prepare_dataset(open_source(f"txt:{tmp_path}/*.txt"), tok, str(tmp_path / "out"),
                                     val_fraction=0.0, workers=1)
  assert manifest["undecodable"] == 3
  assert all_records(tmp_path / "out", "train")[1] == tok.encode(b"bad \xff\xfe bytes \xc3".decode("utf-8", "replace"))
  assert "3 undecodable byte sequences" in shard_writer.summary(manifest)


def test_an_empty_train_split_is_reported(tmp_path, tok):
  (tmp_path / "one.txt").write_text("a single document")
  manifest = shard_writer.prepare_dataset(open_source(f"txt:{tmp_path}/one.txt"), tok, str(tmp_path / "out"),
                                     val_fraction=0.01, workers=1)
  assert manifest["splits"]["train"]["documents"] == 0 and manifest["splits"]["val"]["documents"] == 1
  assert "warning: the train split is empty" in shard_writer.summary(manifest)
  (tmp_path / "two.txt").write_text("another one")
  manifest = shard_writer.prepare_dataset(open_source(f"txt:{tmp_path}/*.txt"), tok, str(tmp_path / "out2"),
                                     val_fraction=0.01, workers=1)
  assert "warning" not in shard_writer.summary(manifest)


def test_parquet_source(tmp_path, tok):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"id": list(range(len(TEXTS))), "content": TEXTS}), tmp_path / "part-0.parquet")
  out = tmp_path / "out"
  shard_writer.prepare_dataset(open_source(f"parquet:{tmp_path}/*.parquet?column=content"), tok, str(out),
                          val_fraction=0.0, workers=1)
  assert all_records(out, "train") == [tok.encode(t) for t in TEXTS if t]
  with pytest.raises(SourceError, match=r"part-0.parquet: no column 'text' \(columns: id, content\)"):
    open_source(f"parquet:{tmp_path}/*.parquet")


def test_parquet_null_rows_are_counted_and_reported(tmp_path, tok):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": ["one", None, "two", None, None]}), tmp_path / "p.parquet")
  manifest = shard_writer.prepare_dataset(open_source(f"parquet:{tmp_path}/p.parquet"), tok, str(tmp_path / "out"),
                                     val_fraction=0.0, workers=1)
  assert manifest["null_rows"] == 3 and manifest["splits"]["train"]["documents"] == 2
  assert "3 null rows skipped" in shard_writer.summary(manifest)


def test_tfds_source(tmp_path, tok):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyLmtinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, text in enumerate(TEXTS):
        yield i, {"text": text}

  TinyLmtinyText(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
  records = tfds.data_source("tiny_lmtiny_text", split="train", data_dir=str(tmp_path / "tfds"))
  in_order = [records[i]["text"].decode() for i in range(len(records))]   # TFDS shuffles when it writes
  out = tmp_path / "out"
  shard_writer.prepare_dataset(open_source(f"tfds:tiny_lmtiny_text?data_dir={tmp_path / 'tfds'}"), tok, str(out),
                          val_fraction=0.0, workers=1)
  assert sorted(in_order) == sorted(TEXTS)
  assert all_records(out, "train") == [tok.encode(t) for t in in_order]


def test_cli_with_worker_processes_matches_the_library(tmp_path, tok, tok_dir):
  texts = [f"text {i} " + "alpha beta gamma " * (i % 5) for i in range(40)]
  spec = write_texts(tmp_path / "txt", texts)
  reference = shard_writer.prepare_dataset(open_source(spec), tok, str(tmp_path / "ref"), val_fraction=0.1, workers=1,
                                      docs_per_shard=16)
  result = run_cli("--source", spec, "--tokenizer", tok_dir, "--out", str(tmp_path / "out"), "--val-fraction", "0.1",
                   "--workers", "2", "--docs-per-shard", "16", "--no-progress")
  assert result.returncode == 0, result.stderr
  assert "train" in result.stdout and "MB/s of text" in result.stdout
  assert shards.load_manifest(str(tmp_path / "out")) == reference
  for split in shards.SPLITS:
    assert all_records(tmp_path / "out", split) == all_records(tmp_path / "ref", split)


def test_cli_error_exits_2_with_one_line(tmp_path, tok_dir):
  result = run_cli("--source", f"txt:{tmp_path}/missing/*.txt", "--tokenizer", tok_dir, "--out", str(tmp_path / "o"))
  assert result.returncode == 2
  assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: txt:")
  assert "no files match" in result.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("case, message", [
    ("missing-files", "no files match"),
    ("empty-source", "no documents (the source is empty)"),
    ("parquet-without-column", "no column 'text'"),
    ("missing-tokenizer", "cannot read tokenizer model"),
    ("bad-val-fraction", "--val-fraction 1.5: must be in [0, 1)"),
    ("out-not-empty", "exists and is not an empty directory"),
])
def test_cli_bad_inputs(tmp_path, tok_dir, capsys, case, message):
  import pyarrow as pa
  import pyarrow.parquet as pq
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "other.txt").write_text("someone's file")
  pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
  good = write_texts(tmp_path / "txt", ["a document"])
  flags = dict(source=good, tokenizer=tok_dir, out=str(tmp_path / "out"), workers="1")
  flags.update({"missing-files": dict(source=f"txt:{tmp_path}/nothing*.txt"),
                "empty-source": dict(source=f"txt:{tmp_path}/empty.txt"),
                "parquet-without-column": dict(source=f"parquet:{tmp_path}/p.parquet"),
                "missing-tokenizer": dict(tokenizer=str(tmp_path / "no-tok")),
                "bad-val-fraction": {"val-fraction": "1.5"},
                "out-not-empty": dict(out=str(tmp_path / "busy"))}[case])
  argv = [x for k, v in flags.items() for x in (f"--{k}", v)]
  assert prepare.main(argv + ["--no-progress"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
  assert not (tmp_path / "out").exists()   # nothing half-written
  assert os.listdir(tmp_path / "busy") == ["other.txt"]


_REAL_WRITER = array_record_module.ArrayRecordWriter


class _FullDiskWriter:
  """array_record's writer on a disk that fills after `budget` records, failing as riegeli does:
  the write raises, and so does every close after it."""
  budget = 0

  def __init__(self, path, options):
    self._real, self._failed = _REAL_WRITER(path, options), False

  def write(self, data):
    if _FullDiskWriter.budget <= 0:
      self._failed = True
      raise RuntimeError("write() failed: No space left on device; writing shard; at byte 0")
    _FullDiskWriter.budget -= 1
    self._real.write(data)

  def close(self):
    self._real.close()
    if self._failed:
      raise RuntimeError("write() failed: No space left on device; Failed to close chunk_writer")


@pytest.mark.parametrize("where", ["shard", "progress", "manifest"])
def test_a_full_disk_is_one_line_and_the_rerun_finishes(tmp_path, tok_dir, capsys, monkeypatch, where):
  # Before: a RuntimeError (or OSError) traceback, exit 1, and the unfinished shard's temporary left.
  spec = write_texts(tmp_path / "txt", [f"document {i}: " + "lorem ipsum " * (i % 5 + 1) for i in range(30)])
  argv = ["--source", spec, "--tokenizer", tok_dir, "--workers", "1", "--docs-per-shard", "4", "--no-progress"]
  assert prepare.main(argv + ["--out", str(tmp_path / "ref")]) == 0
  capsys.readouterr()
  out = tmp_path / "out"
  if where == "shard":  # riegeli's own failure: the 11th document does not fit
    _FullDiskWriter.budget = 10
    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", _FullDiskWriter)
  else:  # the OS's: progress.json after the second chunk, or the final manifest
    real, calls = shard_writer.atomic_write_json, []

    def full(path, obj):
      calls.append(path)
      if (len(calls) == 3) if where == "progress" else path.endswith(shards.MANIFEST_FILE):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
      real(path, obj)
    monkeypatch.setattr(shard_writer, "atomic_write_json", full)
  assert prepare.main(argv + ["--out", str(out)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  kept = {"shard": 2, "progress": 1, "manifest": 8}[where]
  assert err == [f"error: {out}: disk full (No space left on device) while writing shards; the {kept} "
                 "finished shard pair(s) are kept: free space and re-run the same command to continue"]
  assert not [f for f in os.listdir(out) if f.endswith(".tmp")] and not (out / shards.MANIFEST_FILE).exists()
  monkeypatch.undo()  # space freed
  assert prepare.main(argv + ["--out", str(out)]) == 0
  assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "ref"))
  for split in shards.SPLITS:
    assert all_records(out, split) == all_records(tmp_path / "ref", split)
