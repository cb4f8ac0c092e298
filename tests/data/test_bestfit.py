"""Tests for lmtiny/data/bestfit.py and data.packing="bestfit": the rows equal those of a plain-Python
reference of nanochat's dataloader (nanochat/dataloader.py at 92d63d4) on the same documents and
tokenizer, the iterator resumes exactly, and bad settings are one-line config errors."""
import json
import random
import types

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmtiny import config as config_lib
from lmtiny.corpus.sources import open_source
from lmtiny.data import bestfit, pipeline, shard_writer
from lmtiny.data.dataset import load_data
from lmtiny.errors import ConfigError
from lmtiny.tokenizer import train_tokenizer
from lmtiny.training import resume
from lmtiny.training.trainer import DocumentBatches

BOS = 1


# -- the reference: nanochat's algorithm, written out plainly ----------------------------------

def nanochat_rows(batches, seq_len, buffer_size):
  """nanochat's BOS-aligned best-fit rows, one at a time. `batches` yields lists of (key, tokens
  with the BOS first), as nanochat's tokenizer batches. Yields (row of seq_len + 1 tokens,
  [(key, tokens kept, document length)] in row order, buffer keys and the batches read so far)."""
  capacity, buffer, read = seq_len + 1, [], 0
  while True:
    row, placed = [], []
    while len(row) < capacity:
      while len(buffer) < buffer_size:
        buffer.extend(next(batches))
        read += 1
      remaining = capacity - len(row)
      best, best_len = -1, 0
      for i, (_, tokens) in enumerate(buffer):   # the largest document that fits, the first of equals
        if best_len < len(tokens) <= remaining:
          best, best_len = i, len(tokens)
      if best < 0:   # nothing fits: the shortest document fills the row and the rest of it is dropped
        best = min(range(len(buffer)), key=lambda i: len(buffer[i][1]))
      key, tokens = buffer.pop(best)
      kept = min(len(tokens), remaining)
      row += tokens[:kept]
      placed.append((key, kept, len(tokens)))
    yield row, placed, [k for k, _ in buffer], read


def stream_batches(tokens_of, bos, size=bestfit.NANOCHAT_REFILL):
  """nanochat's document batches over an endless stream: `size` documents at a time, each
  [BOS] + tokens_of(stream position), keyed by its stream position."""
  position = 0
  while True:
    yield [(k, [bos] + [int(t) for t in tokens_of(k)]) for k in range(position, position + size)]
    position += size


def rows_of(batch, bos=BOS):
  """A batch's full rows of seq_len + 1 tokens, and the lengths of each row's segments; `batch` is
  the pipeline's (inputs, targets, segment_ids) or the best-fit dataset's raw rows."""
  if "tokens" in batch:
    return batch["tokens"], [np.bincount(s)[1:].tolist() for s in batch["segments"]]
  tokens = np.concatenate([batch["inputs"][:, :1], batch["targets"]], axis=1)
  segments = np.concatenate([batch["segment_ids"], batch["segment_ids"][:, -1:]], axis=1)
  # the last token's segment: the one before it, unless a new document starts there
  segments[:, -1] = np.where(tokens[:, -1] == bos, segments[:, -2] + 1, segments[:, -2])
  return tokens, [np.bincount(s)[1:].tolist() for s in segments]


def assert_rows_equal_the_reference(batches, reference, states, batch_size, bos=BOS, read_size=bestfit.NANOCHAT_REFILL):
  """Row by row: tokens, each document's kept length (so the same tokens cropped), and after each
  batch the same buffered documents and documents read."""
  for batch, state in zip(batches, states):
    tokens, lengths = rows_of(batch, bos)
    for r in range(batch_size):
      row, placed, buffered, read = next(reference)
      assert tokens[r].tolist() == row
      assert lengths[r] == [kept for _, kept, _ in placed]
      assert all(kept == length for _, kept, length in placed[:-1])  # only a row's last document is cropped
      if "loss_mask" in batch:   # trained within each document, not into the next one's BOS
        np.testing.assert_array_equal(batch["loss_mask"][r], np.asarray(row[1:]) != bos)
    assert state["buffer"] == buffered
    assert state["next_index"] == read * read_size


# -- the same documents and tokenizer: a parquet file written here, tokenized into shards ------

WORDS = ("the of and a to in is was he for it with as his on be at by had are but from or have an they which "
         "one you were all we her she there would their will when who him been has more if no out do so can "
         "what up said about other into than its time only could new them man some these then two first").split()


@pytest.fixture(scope="module")
def parquet_corpus(tmp_path_factory):
  """(parquet path, tokenizer, Data): 300 documents of 1 to 160 words in a parquet file (as
  ClimbMix and nanochat keep them), a 512-token tokenizer trained on them, and their shards."""
  root = tmp_path_factory.mktemp("bestfit")
  rng = random.Random(0)
  texts = [" ".join(rng.choice(WORDS) for _ in range(rng.choice([rng.randint(1, 12), rng.randint(1, 160)])))
           for _ in range(300)]
  path = str(root / "docs.parquet")
  pq.write_table(pa.table({"text": texts}), path)
  tokenizer = train_tokenizer(iter(texts), 512, str(root / "tok"), seed=0)
  shard_writer.prepare_dataset(open_source(f"parquet:{path}?column=text"), tokenizer, str(root / "shards"),
                               val_fraction=0.0, workers=1, docs_per_shard=128)
  cfg = config_lib.base_config().data
  cfg.shards = str(root / "shards")
  return path, tokenizer, load_data(cfg, vocab_size=512, seq_len=128)


@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2)])
def test_rows_equal_nanochats_on_the_same_documents_and_tokenizer(parquet_corpus, process_index, process_count):
  path, tokenizer, data = parquet_corpus
  seq_len, batch_size, seed = 128, 4, 7
  it = pipeline.make_train_iterator(data.train_docs, seq_len=seq_len, batch_size=batch_size, bos_id=tokenizer.bos_id,
                                    seed=seed, process_index=process_index, process_count=process_count,
                                    packing="bestfit")
  batches, states = [], []
  for _ in range(12):
    batches.append(next(it))
    states.append(it.get_state())
  # nanochat's loader reads the parquet's text column and encodes each text with a BOS in front;
  # it is fed the documents in the order the pipeline streams this process's slice.
  texts = pq.read_table(path).column("text").to_pylist()
  assert len(data.train_docs) == len(texts)
  order = pipeline.train_stream(list(range(len(texts))), seed, process_index, process_count)
  batches_of_text = stream_batches(lambda position: tokenizer.encode(texts[order[position]]), tokenizer.bos_id)
  reference = nanochat_rows(batches_of_text, seq_len, bestfit.NANOCHAT_BUFFER)
  assert_rows_equal_the_reference(batches, reference, states, batch_size, tokenizer.bos_id)
  # Documents longer than a row were in play, and every row starts with a BOS.
  assert max(len(tokenizer.encode(t)) for t in texts) > seq_len + 1
  assert all(np.all(b["inputs"][:, 0] == tokenizer.bos_id) for b in batches)


# -- the algorithm at other sizes, documents in memory -------------------------------------------

def make_docs(lengths):
  """Documents whose tokens say which document they belong to: doc i = [1000*(i+1) + j]."""
  return [np.arange(1000 * (i + 1), 1000 * (i + 1) + n, dtype=np.int32) for i, n in enumerate(lengths)]


def bestfit_rows(rows_dataset, n):
  it = iter(rows_dataset)
  batches, states = [], []
  for _ in range(n):
    batches.append(next(it))
    states.append(it.get_state())
  return batches, states


@pytest.mark.parametrize("buffer_size,refill,seq_len,batch_size", [(1, 1, 8, 3), (16, 5, 16, 2), (7, 128, 5, 1)])
def test_rows_equal_the_reference_at_any_buffer_and_refill(buffer_size, refill, seq_len, batch_size):
  lengths = np.random.default_rng(buffer_size).integers(0, 3 * seq_len, 40).tolist()   # 0: a lone BOS
  docs = make_docs(lengths)
  rows = bestfit.BestFitRowsDataset(grain.MapDataset.source(docs).repeat(None), seq_len=seq_len,
                                    batch_size=batch_size, bos_id=BOS, buffer_size=buffer_size, refill=refill)
  batches, states = bestfit_rows(rows, 10)
  reference = nanochat_rows(stream_batches(lambda k: docs[k % len(docs)], BOS, refill), seq_len, buffer_size)
  assert_rows_equal_the_reference(batches, reference, states, batch_size, read_size=refill)


def test_a_worker_process_packs_every_nth_document_of_the_stream():
  docs = make_docs(np.random.default_rng(1).integers(0, 30, 25).tolist())
  rows = bestfit.BestFitRowsDataset(grain.MapDataset.source(docs).repeat(None), seq_len=12, batch_size=2,
                                    bos_id=BOS, buffer_size=9, refill=4)
  rows.set_slice(slice(1, None, 3))   # what grain does in worker 1 of 3
  batches, states = bestfit_rows(rows, 6)
  reference = nanochat_rows(stream_batches(lambda k: docs[(1 + 3 * k) % len(docs)], BOS, 4), 12, 9)
  assert_rows_equal_the_reference(batches, reference, states, 2, read_size=4)


def test_training_rows_resume_exactly_from_a_saved_state():
  docs = make_docs(np.random.default_rng(2).integers(0, 12, 150).tolist())
  kw = dict(seq_len=16, batch_size=3, bos_id=BOS, seed=5, packing="bestfit", bestfit_buffer=20, prefetch=2)
  it = pipeline.make_train_iterator(docs, **kw)
  for _ in range(4):
    next(it)
  state = json.loads(json.dumps(it.get_state()))   # as a checkpoint stores it
  assert len(state["buffer"]) >= 20
  want = [next(it) for _ in range(12)]   # the reads cross into the second epoch
  for resumed in (pipeline.make_train_iterator(docs, **kw), it):   # a fresh iterator, and the used one rewound
    resumed.set_state(state)
    for a, b in zip([next(resumed) for _ in range(12)], want):
      for key in pipeline.BATCH_KEYS:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  it.close()


def test_layouts_with_and_without_the_document_mask():
  docs = make_docs([3, 9, 1, 14, 0, 6, 22, 5] * 20)   # grain's shuffle is slow per read on tiny datasets
  kw = dict(seq_len=20, batch_size=4, bos_id=BOS, seed=1, packing="bestfit", bestfit_buffer=6)
  masked = next(pipeline.make_train_iterator(docs, **kw))
  plain = next(pipeline.make_train_iterator(docs, **kw, document_mask=False))
  np.testing.assert_array_equal(masked["inputs"], plain["inputs"])
  # Masked: each document its own segment, positions from 0 at its BOS, no loss into the next BOS.
  starts = masked["inputs"] == BOS
  assert starts[:, 0].all() and masked["segment_ids"].min() == 1
  np.testing.assert_array_equal(masked["positions"] == 0, starts)
  np.testing.assert_array_equal(np.cumsum(starts, axis=1), masked["segment_ids"])
  np.testing.assert_array_equal(masked["loss_mask"] == 0, masked["targets"] == BOS)
  assert (masked["segment_ids"].max(axis=1) > 1).any()
  # Unmasked: nanochat's layout, one causal sequence, every target trained.
  assert np.all(plain["segment_ids"] == 1) and np.all(plain["loss_mask"] == 1)
  np.testing.assert_array_equal(plain["positions"], np.broadcast_to(np.arange(20), (4, 20)))


def test_evaluation_rows_use_every_document_once_then_pad():
  lengths = [3, 30, 1, 14, 0, 6, 22, 5, 11]
  docs = make_docs(lengths)
  batches = list(pipeline.make_eval_iterator(docs, seq_len=12, batch_size=2, bos_id=BOS, num_batches=0,
                                             packing="bestfit", bestfit_buffer=4))
  tokens = np.concatenate([np.concatenate([b["inputs"][:, :1], b["targets"]], axis=1) for b in batches])
  starts = [t for t in tokens.reshape(-1).tolist()]
  assert starts.count(BOS) == len(docs)   # each document once: whole, or its head where it was cropped
  owners = sorted({t // 1000 for t in tokens.reshape(-1).tolist() if t > BOS})
  assert owners == [i + 1 for i, n in enumerate(lengths) if n]
  last = batches[-1]
  assert last["segment_ids"][-1, -1] == 0 and last["loss_mask"][-1, -1] == 0   # the tail is padding
  fixed = list(pipeline.make_eval_iterator(docs, seq_len=12, batch_size=2, bos_id=BOS, num_batches=len(batches) + 2,
                                           packing="bestfit", bestfit_buffer=4))
  assert len(fixed) == len(batches) + 2 and all(b["loss_mask"].sum() == 0 for b in fixed[-2:])


def test_map_train_state_restarts_best_fit_rows_at_an_epoch_start():
  docs = make_docs([4] * 240)
  kw = dict(seq_len=9, batch_size=1, bos_id=BOS, seed=2, packing="bestfit", bestfit_buffer=5)
  saved = []
  for i in range(2):   # 120 documents each
    it = pipeline.make_train_iterator(docs, process_index=i, process_count=2, **kw)
    for _ in range(61):   # 2 documents a row: 122 used, the buffer in epoch 1
      next(it)
    saved.append(it.get_state())
  assert min(saved[0]["buffer"]) >= 120
  state, note = pipeline.map_train_state(saved, len(docs), 0, 1)
  assert state == {"next_index": 240, "buffer": []}   # epoch 1 of the single 240-document slice
  assert note.startswith("warning: data position mapped to the start of epoch 1")
  resumed = pipeline.make_train_iterator(docs, **kw)
  resumed.set_state(state)
  assert next(resumed)["inputs"][0, 0] == BOS
  assert resumed.get_state()["next_index"] == 240 + bestfit.NANOCHAT_REFILL   # read on from epoch 1's start


# -- settings --------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("packing", "best-fit", "config.data.packing='best-fit': must be one of concat, bestfit"),
    ("bestfit_buffer", 0, "config.data.bestfit_buffer=0: must be an integer >= 1"),
    ("bestfit_buffer", -3, "config.data.bestfit_buffer=-3: must be an integer >= 1"),
])
def test_bad_packing_settings_name_the_field(field, value, message):
  cfg = config_lib.base_config()
  cfg.data[field] = value
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
    config_lib.validate(cfg)


def test_a_cap_on_documents_per_row_is_refused_with_best_fit_rows():
  cfg = config_lib.base_config()
  cfg.data.update(packing="bestfit", max_docs_per_row=4)
  with pytest.raises(ConfigError, match=r"config\.data\.max_docs_per_row=4: must be 0 with data\.packing=bestfit"):
    config_lib.validate(cfg)
  cfg.data.max_docs_per_row = 0
  config_lib.validate(cfg)
  with pytest.raises(ValueError, match="packing='first-fit'"):
    pipeline.make_train_iterator(make_docs([3]), seq_len=4, batch_size=1, bos_id=BOS, seed=0, packing="first-fit")


def test_resuming_a_run_with_the_other_packing_is_refused(tmp_path):
  cfg = config_lib.load_file("configs/tiny.py")
  (tmp_path / "config.json").write_text(cfg.to_json_best_effort())   # a run recorded with concat rows
  assert cfg.data.packing == "concat" and resume.config_changes(str(tmp_path), cfg) == {}
  cfg.data.packing = "bestfit"
  with pytest.raises(ConfigError, match=r"config\.data\.packing='bestfit': .* trained with data\.packing='concat'"):
    resume.config_changes(str(tmp_path), cfg)


def test_the_2026_recipes_pack_best_fit_rows_and_the_cpu_demo_concatenates():
  for name in ("d12_2026", "d24_2026"):
    cfg = config_lib.load_file(f"configs/{name}.py")
    assert cfg.data.packing == "bestfit" and cfg.data.bestfit_buffer == bestfit.NANOCHAT_BUFFER, name
    config_lib.validate(cfg)
  assert config_lib.load_file("configs/tiny_2026.py").data.packing == "concat"  # 88% cropped at 256 (docs/data.md)


def test_the_trainer_packs_as_the_config_says():
  cfg = config_lib.load_file("configs/tiny_2026.py")
  cfg.data.packing = "bestfit"
  cfg.data.bestfit_buffer = 8
  docs = make_docs([30, 200, 7, 90, 400, 12] * 30)
  data = types.SimpleNamespace(train_docs=docs, val_docs=docs, tokenizer=types.SimpleNamespace(bos_id=BOS))
  rows = DocumentBatches(cfg, data)
  train = rows.train_iterator(2)
  batch = next(train)
  train.close()
  assert np.all(batch["inputs"][:, 0] == BOS) and len(train.get_state()["buffer"]) >= 8
  evaluation = next(rows.eval_iterator(2, 1))
  assert np.all(evaluation["inputs"][:, 0] == BOS)
  np.testing.assert_array_equal(evaluation["inputs"][0, :202], [BOS, *range(2000, 2200), BOS])   # best fit: doc 1 first
