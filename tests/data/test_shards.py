"""Tests for lmtiny/data/shards.py: writing, reading back, and every way a shard directory can be wrong."""
import json
import os
import pickle

import numpy as np
import pytest

from lmtiny.data import shards
from lmtiny.data.shards import DataError
from lmtiny.errors import ConfigError
from lmtiny.fs.atomic import atomic_write_json


def write_dataset(directory, docs_by_split, vocab_size=512, dtype=None):
  """A minimal complete dataset written with the module's own writer."""
  dtype = dtype or shards.dtype_for_vocab(vocab_size)
  os.makedirs(directory, exist_ok=True)
  splits = {}
  for split in shards.SPLITS:
    records = []
    for k, docs in enumerate(docs_by_split.get(split, [])):
      w = shards.ShardWriter(str(directory), shards.shard_name(split, k), dtype)
      for d in docs:
        w.write(d, num_bytes=3 * len(d))
      records.append(w.finish())
    splits[split] = shards.split_totals(records)
  manifest = dict(format=shards.FORMAT, tokenizer_hash="ab" * 32, vocab_size=vocab_size, dtype=dtype,
                  splits=splits)
  atomic_write_json(os.path.join(directory, shards.MANIFEST_FILE), manifest)
  return manifest


def rng_docs(n, vocab=512, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, rng.integers(1, 60)).astype(np.int64) for _ in range(n)]


def test_dtype_follows_the_vocab():
  assert shards.dtype_for_vocab(65536) == "uint16"
  assert shards.dtype_for_vocab(65537) == "uint32"


@pytest.mark.parametrize("vocab_size", [512, 100_000])
def test_round_trip_across_shards(tmp_path, vocab_size):
  train = [rng_docs(7, vocab_size, 1), rng_docs(5, vocab_size, 2), rng_docs(9, vocab_size, 3)]
  val = [rng_docs(3, vocab_size, 4)]
  manifest = write_dataset(tmp_path, {"train": train, "val": val}, vocab_size)
  assert manifest["dtype"] == ("uint16" if vocab_size <= 65536 else "uint32")
  loaded = shards.load_manifest(str(tmp_path))
  assert loaded == manifest
  shards.check_shards(str(tmp_path), loaded)
  docs = shards.open_split(str(tmp_path), loaded, "train")
  flat = [d for shard in train for d in shard]
  assert len(docs) == 21 == loaded["splits"]["train"]["documents"]
  assert loaded["splits"]["train"]["tokens"] == sum(d.size for d in flat)
  for i in (0, 6, 7, 11, 12, 20, -1):
    np.testing.assert_array_equal(docs[i], flat[i])
    assert docs[i].dtype == np.dtype(manifest["dtype"])
  with pytest.raises(IndexError):
    docs[21]
  copy = pickle.loads(pickle.dumps(docs))   # grain worker processes receive a pickled copy
  np.testing.assert_array_equal(copy[20], flat[20])


def test_a_shard_appears_only_when_finished(tmp_path):
  w = shards.ShardWriter(str(tmp_path), "train-00000.array_record", "uint16")
  w.write(np.arange(5), 5)
  assert os.listdir(tmp_path) == [".train-00000.array_record.tmp"]
  record = w.finish()
  assert os.listdir(tmp_path) == ["train-00000.array_record"]
  assert record == {"file": "train-00000.array_record", "documents": 1, "tokens": 5, "bytes": 5,
                    "file_bytes": os.path.getsize(tmp_path / "train-00000.array_record")}
  w = shards.ShardWriter(str(tmp_path), "train-00001.array_record", "uint16")
  w.write(np.arange(5), 5)
  w.abort()
  assert os.listdir(tmp_path) == ["train-00000.array_record"]


def test_data_error_is_a_config_error():
  assert issubclass(DataError, ConfigError)


def test_missing_directory_and_manifest(tmp_path):
  with pytest.raises(DataError, match=r"nowhere: no such shard directory$"):
    shards.load_manifest(str(tmp_path / "nowhere"))
  with pytest.raises(DataError, match=r"manifest.json: missing \(make one with `python -m lmtiny.data.prepare`\)"):
    shards.load_manifest(str(tmp_path))
  (tmp_path / shards.PROGRESS_FILE).write_text("{}")
  with pytest.raises(DataError, match=r"unfinished `lmtiny.data.prepare` job: re-run it to finish"):
    shards.load_manifest(str(tmp_path))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format="other/9"), "not an lmtiny manifest"),
    (lambda m: m.update(dtype="int8"), "dtype 'int8' is not one of uint16, uint32"),
    (lambda m: m.update(vocab_size=70000), "dtype uint16 cannot hold ids of vocab_size 70000"),
    (lambda m: m.pop("tokenizer_hash"), "field 'tokenizer_hash' missing"),
    (lambda m: m["splits"].pop("val"), "split 'val' missing"),
    (lambda m: m["splits"]["train"]["shards"][0].pop("tokens"), "bad shard record in split 'train'"),
])
def test_bad_manifests_are_one_line(tmp_path, edit, message):
  manifest = write_dataset(tmp_path, {"train": [rng_docs(3)], "val": [rng_docs(1)]})
  edit(manifest)
  (tmp_path / shards.MANIFEST_FILE).write_text(json.dumps(manifest))
  with pytest.raises(DataError, match=message) as e:
    shards.load_manifest(str(tmp_path))
  assert "\n" not in str(e.value)
  (tmp_path / shards.MANIFEST_FILE).write_text("{not json")
  with pytest.raises(DataError, match="unreadable manifest"):
    shards.load_manifest(str(tmp_path))


def test_missing_truncated_and_corrupt_shards(tmp_path):
  write_dataset(tmp_path, {"train": [rng_docs(400, seed=5), rng_docs(50)], "val": [rng_docs(2)]})
  manifest = shards.load_manifest(str(tmp_path))
  path = tmp_path / "train-00000.array_record"
  data = path.read_bytes()

  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(DataError, match=r"train-00000.array_record: truncated or altered shard "
                                     r"\(\d+ bytes, manifest says \d+\)"):
    shards.check_shards(str(tmp_path), manifest)

  os.remove(path)
  with pytest.raises(DataError, match=r"train-00000.array_record: missing shard \(listed in manifest.json\)"):
    shards.check_shards(str(tmp_path), manifest)

  # Same size, garbage inside: a set this small is read whole by the check (before, the damage
  # was found only when a batch reached the record: after a run had written its directory).
  garbled = bytearray(data)
  garbled[200:260] = bytes(60)
  path.write_bytes(bytes(garbled))
  with pytest.raises(DataError, match=r"train-00000.array_record: corrupt shard \(") as e:
    shards.check_shards(str(tmp_path), manifest)
  assert "\n" not in str(e.value)
  docs = shards.open_split(str(tmp_path), manifest, "train")  # a larger set: found when the record is read
  with pytest.raises(DataError, match=r"train-00000.array_record: corrupt shard \(") as e:
    for i in range(len(docs)):
      docs[i]
  assert "\n" not in str(e.value)

  # A garbled index (the file ends in zero padding; the index is just before it).
  end = len(data.rstrip(b"\0"))
  garbled = bytearray(data)
  garbled[end - 64:end] = bytes(64)
  path.write_bytes(bytes(garbled))
  with pytest.raises(DataError, match=r"train-00000.array_record: corrupt shard \("):
    shards.check_shards(str(tmp_path), manifest)
    docs = shards.open_split(str(tmp_path), manifest, "train")
    for i in range(len(docs)):
      docs[i]


def test_record_count_must_match_the_manifest(tmp_path):
  manifest = write_dataset(tmp_path, {"train": [rng_docs(4)], "val": []})
  manifest["splits"]["train"]["shards"][0]["documents"] = 5
  with pytest.raises(DataError, match=r"corrupt shard \(4 records, manifest says 5\)"):
    shards.check_shards(str(tmp_path), manifest)


def test_a_record_with_a_partial_id_is_reported(tmp_path):
  w = shards.ShardWriter(str(tmp_path), "odd.array_record", "uint8")
  w.write(np.arange(3), 3)
  docs = shards.TokenDocs(str(tmp_path), [w.finish()], "uint32")
  with pytest.raises(DataError, match=r"odd.array_record: corrupt shard \(record of 3 bytes is not a whole "
                                     r"number of uint32 ids\)"):
    docs[0]


@pytest.mark.parametrize("written, claimed", [("uint16", "uint32"), ("uint32", "uint16")])
def test_a_manifest_dtype_that_the_data_does_not_have_is_caught_at_open(tmp_path, written, claimed):
  # Even token counts: every record divides into ids of either width, so only the manifest's
  # token counts tell the dtypes apart (records of odd length used to be the only clue).
  even = [np.arange(2 * (k + 1)) % 512 for k in range(6)]
  manifest = write_dataset(tmp_path, {"train": [even, even[:3]], "val": [even[:2]]}, dtype=written)
  shards.check_shards(str(tmp_path), manifest)
  manifest["dtype"] = claimed
  (tmp_path / shards.MANIFEST_FILE).write_text(json.dumps(manifest))
  manifest = shards.load_manifest(str(tmp_path))  # its structure is fine
  val = manifest["splits"]["val"]["shards"][0]  # the smallest shard is the one read
  held = val["tokens"] * np.dtype(written).itemsize
  with pytest.raises(DataError) as e:
    shards.check_shards(str(tmp_path), manifest)
  assert str(e.value) == (f"{tmp_path / shards.MANIFEST_FILE}: field 'dtype' is {claimed!r}, but val-00000.array_record "
                          f"holds {held} bytes for its {val['tokens']} tokens, not "
                          f"{val['tokens'] * np.dtype(claimed).itemsize} (the data is {written})")
