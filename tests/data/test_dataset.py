"""Tests for lmtiny/data/dataset.py and dataset.ensure_embedded_dataset: the trainer's entry to data."""
import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest

from lmtiny.config import base_config
from lmtiny.corpus import embedded
from lmtiny.corpus.sources import open_source
from lmtiny.data import dataset, pipeline, shard_writer, shards
from lmtiny.data.dataset import load_data
from lmtiny.errors import ConfigError
from lmtiny.tokenizer import Tokenizer, train_tokenizer

MAX_CHARS = 300_000   # a slice of the embedded corpus keeps these tests fast


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """(shard dir, tokenizer dir) for a small embedded slice at vocab 512."""
  root = tmp_path_factory.mktemp("data")
  tok = train_tokenizer(embedded.iter_embedded_documents(MAX_CHARS), 512, str(root / "tok"), seed=0)
  shard_writer.prepare_dataset(open_source(f"embedded?max_chars={MAX_CHARS}"), tok, str(root / "shards"),
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
  train_texts = [d for i, d in enumerate(docs) if not shard_writer.is_validation(i, 0.1)]
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
  real_prepare = shard_writer.prepare_dataset
  winners = []

  def prepare_while_another_run_finishes_first(*args, **kwargs):
    manifest = real_prepare(*args, **kwargs)
    if not winners:   # the other run: starts and finishes while this one is still building
      monkeypatch.setattr(shard_writer, "prepare_dataset", real_prepare)
      winners.append(dataset.ensure_embedded_dataset(str(tmp_path), 512, 120_000))
    return manifest

  monkeypatch.setattr(shard_writer, "prepare_dataset", prepare_while_another_run_finishes_first)
  loser = dataset.ensure_embedded_dataset(str(tmp_path), 512, 120_000)
  assert loser == winners[0] and os.listdir(tmp_path) == [os.path.basename(loser)]   # no temporaries left
  m = shards.load_manifest(loser)
  shards.check_shards(loser, m)
  assert Tokenizer.load(os.path.join(loser, shards.TOKENIZER_DIR)).hash == m["tokenizer_hash"]


# -- weighted mixtures of shard directories ----------------------------------------------------


@pytest.fixture(scope="module")
def second(prepared, tmp_path_factory):
  """Another shard directory made with the same tokenizer: short documents of other text."""
  shard_dir, tok_dir = prepared
  root = tmp_path_factory.mktemp("second")
  with open(root / "notes.jsonl", "w") as f:
    for i in range(60):
      f.write(json.dumps({"text": f"note {i}: the quick brown fox jumps over {i % 7} lazy dogs."}) + "\n")
  shard_writer.prepare_dataset(open_source(f"jsonl:{root / 'notes.jsonl'}"), Tokenizer.load(str(tok_dir)), str(root / "shards"),
                          val_fraction=0.2, workers=1, docs_per_shard=25)
  return root / "shards"


def _keys(docs):
  return [np.asarray(d).tobytes() for d in docs]


def test_a_mixture_holds_every_document_and_the_token_shares_it_was_given(prepared, second):
  shard_dir, _ = prepared
  spec = f"{shard_dir}:0.5,{second}:0.5"
  data = load_data(data_config(shards=spec), vocab_size=512, seq_len=64)
  one, two = (load_data(data_config(shards=str(d)), vocab_size=512, seq_len=64) for d in (shard_dir, second))
  a, b = set(_keys(one.train_docs)), set(_keys(two.train_docs))
  assert not a & b
  epoch = _keys(data.train_docs)
  assert a <= set(epoch) and b <= set(epoch)  # nothing subsampled away
  tokens = {name: sum(len(k) for k in epoch if k in keys) for name, keys in (("a", a), ("b", b))}
  assert tokens["a"] / (tokens["a"] + tokens["b"]) == pytest.approx(0.5, abs=0.01)
  # The web-like source has far more tokens: it is used once, the short notes are repeated.
  assert sum(k in a for k in epoch) == len(one.train_docs) and sum(k in b for k in epoch) > 5 * len(two.train_docs)
  assert re.fullmatch(rf"mixture: {shard_dir} 50% of tokens \([\d,]+ tokens, 1.00 passes per epoch\), "
                      rf"{second} 50% of tokens \([\d,]+ tokens, \d+\.\d\d passes per epoch\)", data.description)
  assert data.directory == spec and data.tokenizer.hash == one.tokenizer.hash
  # Val: no document twice, and the first ones already alternate between the sources.
  val = _keys(data.val_docs)
  assert len(set(val)) == len(val) and set(val) <= set(_keys(one.val_docs)) | set(_keys(two.val_docs))
  head = [k in set(_keys(two.val_docs)) for k in val[:8]]
  assert 0 < sum(head) < 8
  # One process or two grain workers: a mixture pickles (grain sends it to its workers).
  clone = pickle.loads(pickle.dumps(data.train_docs))
  assert _keys(clone) == epoch
  batch = next(pipeline.make_train_iterator(data.train_docs, seq_len=64, batch_size=4, bos_id=data.tokenizer.bos_id,
                                            seed=0))
  assert batch["inputs"].shape == (4, 64)


def test_mixture_counts_repeat_scarce_sources_and_never_repeat_val():
  from lmtiny.data import mixture
  counts = mixture.train_counts([3, 1], documents=[100, 10], tokens=[10_000, 100])
  assert counts[0] == 100 and counts[1] == round(10 * (10_000 / 3) / 100)  # 1/4 of the tokens
  # A source whose share already needs all of it: the other one is repeated instead.
  assert mixture.train_counts([1, 1], [10, 10], [100, 1_000]) == [100, 10]
  assert mixture.val_counts([1, 1], [10, 10], [100, 1_000]) == [10, 1]
  assert mixture.val_counts([1, 1], [0, 10], [0, 100]) == [0, 10]  # a source without val: left out
  docs = mixture.MixedDocs([["a0", "a1"], ["b0"]], [3, 2])
  assert [docs[i] for i in range(len(docs))] == ["a0", "a1", "a0", "b0", "b0"] and docs[-1] == "b0"
  even = mixture.MixedDocs([["a0", "a1", "a2", "a3"], ["b0", "b1"]], [4, 2], interleave=True)
  assert [even[i] for i in range(len(even))] == ["a0", "b0", "a1", "a2", "b1", "a3"]
  with pytest.raises(IndexError):
    docs[5]


@pytest.mark.parametrize("spec, message", [
    ("{a}:0.5,{b}:0", "needs a source and a finite weight > 0"),
    ("{a}:0.5,{b}:-1", "needs a source and a finite weight > 0"),
    ("{a}:0.5,{a}x:0.5", "no such shard directory"),
    ("{a}:1,{b}:nan", "needs a source and a finite weight > 0"),
    ("{a}:1,{b}:1e-300", "the weight 1e-300 of '{b}' is under a millionth of the largest (1); weights must lie "
                         "within a factor of a million of each other"),
    ("{a}:1e308,{b}:1e308", "the weights add up to more than a float holds"),
])
def test_bad_mixtures_name_the_field(prepared, second, spec, message):
  shard_dir, _ = prepared
  with pytest.raises(ConfigError, match=r"^config.data.shards=") as e:
    load_data(data_config(shards=spec.format(a=shard_dir, b=second)), vocab_size=512, seq_len=64)
  assert message.format(a=shard_dir, b=second) in str(e.value)


def test_a_mixture_needs_one_tokenizer(prepared, tmp_path):
  shard_dir, _ = prepared
  other = train_tokenizer(embedded.iter_embedded_documents(100_000), 512, str(tmp_path / "tok"), seed=1)
  shard_writer.prepare_dataset(open_source("embedded?max_chars=100000"), other, str(tmp_path / "shards"),
                          val_fraction=0.1, workers=1)
  with pytest.raises(ConfigError, match=r"a mixture needs one tokenizer"):
    load_data(data_config(shards=f"{shard_dir}:1,{tmp_path / 'shards'}:1"), vocab_size=512, seq_len=64)


def test_a_weight_too_small_for_an_epoch_writes_no_run(prepared, second, tmp_path, capsys):
  # Before: OverflowError from grain (the epoch's length no longer fits an index) after the run
  # directory had been written.
  from lm_fixtures import ROOT
  from lmtiny import train
  shard_dir, _ = prepared
  spec = f"{shard_dir}:1,{second}:1e-300"
  argv = ["train", "--config", os.path.join(ROOT, "configs", "tiny.py"), "--workdir", str(tmp_path / "run"),
          f"--config.data.shards={spec}", "--config.model.vocab_size=512", "--config.train.seq_len=64",
          "--config.train.batch_tokens=512"]
  assert train.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: config.data.shards={spec!r}: the weight 1e-300") and err.count("\n") == 1, err
  assert not os.path.exists(tmp_path / "run")
