"""Tests for lmtiny/data/dataset.py and embedded.ensure_embedded_dataset: the trainer's entry to data."""
import os
import shutil

import numpy as np
import pytest

from lmtiny.config import ConfigError, base_config
from lmtiny.data import embedded, pipeline, prepare, shards
from lmtiny.data.dataset import load_data
from lmtiny.data.sources import open_source
from lmtiny.tokenizer import Tokenizer, train_tokenizer

MAX_CHARS = 300_000   # a slice of the embedded corpus keeps these tests fast


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """(shard dir, tokenizer dir) for a small embedded slice at vocab 512."""
  root = tmp_path_factory.mktemp("data")
  tok = train_tokenizer(embedded.iter_embedded_documents(MAX_CHARS), 512, str(root / "tok"), seed=0)
  prepare.prepare_dataset(open_source(f"embedded?max_chars={MAX_CHARS}"), tok, str(root / "shards"),
                          val_fraction=0.1, workers=1, docs_per_shard=10)
  return root / "shards", root / "tok"


def data_config(**overrides):
  cfg = base_config().data
  cfg.update(overrides)
  return cfg


def test_load_data_opens_checked_shards(prepared):
  shard_dir, tok_dir = prepared
  data = load_data(data_config(shards=str(shard_dir), tokenizer=str(tok_dir)), vocab_size=512, seq_len=64)
  m = data.manifest
  assert len(data.train_docs) == m["splits"]["train"]["documents"] > 0
  assert len(data.val_docs) == m["splits"]["val"]["documents"] > 0
  assert data.tokenizer.hash == m["tokenizer_hash"] and data.token_bytes.shape == (512,)
  # Without data.tokenizer the shards' own copy is used.
  same = load_data(data_config(shards=str(shard_dir)), vocab_size=512, seq_len=64)
  assert same.tokenizer.hash == data.tokenizer.hash
  # Documents decode to the corpus, and the pipeline takes them as they are.
  docs = list(embedded.iter_embedded_documents(MAX_CHARS))
  train_texts = [d for i, d in enumerate(docs) if not prepare.is_validation(i, 0.1)]
  assert data.tokenizer.decode(data.train_docs[3]) == train_texts[3]
  batch = next(pipeline.make_train_iterator(data.train_docs, seq_len=64, batch_size=4, bos_id=data.tokenizer.bos_id,
                                            seed=0))
  assert batch["inputs"].shape == (4, 64) and batch["inputs"].max() < 512


def test_tokenizer_hash_mismatch(prepared, tmp_path):
  shard_dir, _ = prepared
  other = train_tokenizer(embedded.iter_embedded_documents(100_000), 512, str(tmp_path / "other"), seed=0)
  with pytest.raises(ConfigError, match=rf"^config.data.tokenizer='.*other': tokenizer {other.hash[:12]} is not the "
                                        r"one the shards in .* were made with"):
    load_data(data_config(shards=str(shard_dir), tokenizer=str(tmp_path / "other")), vocab_size=512, seq_len=64)


def test_vocab_mismatch_names_model_vocab_size(prepared):
  shard_dir, _ = prepared
  with pytest.raises(ConfigError, match=r"^config.model.vocab_size=1024: the shards in .* were made with a "
                                        r"512-token vocab; set model.vocab_size=512"):
    load_data(data_config(shards=str(shard_dir)), vocab_size=1024, seq_len=64)


def test_shard_problems_name_data_shards(prepared, tmp_path):
  shard_dir, _ = prepared
  with pytest.raises(ConfigError, match=r"^config.data.shards='.*nowhere': .*no such shard directory$"):
    load_data(data_config(shards=str(tmp_path / "nowhere")), vocab_size=512, seq_len=64)
  copy = tmp_path / "copy"
  shutil.copytree(shard_dir, copy)
  victim = copy / "train-00001.array_record"
  victim.write_bytes(victim.read_bytes()[:1000])
  with pytest.raises(ConfigError, match=r"^config.data.shards=.*train-00001.array_record: truncated or altered shard"):
    load_data(data_config(shards=str(copy)), vocab_size=512, seq_len=64)
  with pytest.raises(ConfigError, match=r"fewer than one row of config.train.seq_len=100000000"):
    load_data(data_config(shards=str(shard_dir)), vocab_size=512, seq_len=100_000_000)


def test_embedded_dataset_is_built_once_and_cached(tmp_path):
  cfg = data_config(cache_dir=str(tmp_path / "cache"), embedded_max_chars=150_000)
  data = load_data(cfg, vocab_size=512, seq_len=32)
  key = f"embedded-{embedded.embedded_fingerprint(150_000)}-v512"
  assert data.directory == str(tmp_path / "cache" / key)
  assert os.listdir(tmp_path / "cache") == [key]   # no temporary directory left
  assert data.tokenizer.vocab_size == 512 and len(data.val_docs) > 0
  assert sorted(os.listdir(os.path.join(data.directory, shards.TOKENIZER_DIR))) == [
      "report.json", "token_bytes.npy", "tokenizer.model", "tokenizer.vocab"]
  stamp = os.path.getmtime(os.path.join(data.directory, shards.MANIFEST_FILE))
  again = load_data(cfg, vocab_size=512, seq_len=32)
  assert os.path.getmtime(os.path.join(again.directory, shards.MANIFEST_FILE)) == stamp
  text = "".join(embedded.iter_embedded_documents(150_000))
  assert data.tokenizer.decode(data.val_docs[0]) in text
  np.testing.assert_array_equal(again.train_docs[0], data.train_docs[0])


def test_a_build_that_loses_the_race_uses_the_winner(tmp_path, monkeypatch):
  real_prepare = prepare.prepare_dataset
  winners = []

  def prepare_while_another_run_finishes_first(*args, **kwargs):
    manifest = real_prepare(*args, **kwargs)
    if not winners:   # the other run: starts and finishes while this one is still building
      monkeypatch.setattr(prepare, "prepare_dataset", real_prepare)
      winners.append(embedded.ensure_embedded_dataset(str(tmp_path), 512, 120_000))
    return manifest

  monkeypatch.setattr(prepare, "prepare_dataset", prepare_while_another_run_finishes_first)
  loser = embedded.ensure_embedded_dataset(str(tmp_path), 512, 120_000)
  assert loser == winners[0] and os.listdir(tmp_path) == [os.path.basename(loser)]   # no temporaries left
  m = shards.load_manifest(loser)
  shards.check_shards(loser, m)
  assert Tokenizer.load(os.path.join(loser, shards.TOKENIZER_DIR)).hash == m["tokenizer_hash"]
