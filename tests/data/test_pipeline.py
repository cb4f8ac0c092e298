"""Tests for lmtiny/data/pipeline.py: packing against a plain-Python reference, shuffling, slices, resume."""
import gc
import time

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings, strategies as st

from lm_fixtures import prefetch_threads
from lmtiny.data import pipeline
from lmtiny.errors import ConfigError

BOS = 1


def make_docs(lengths, offset=0):
  """Documents whose tokens say which document they belong to: doc i = [1000*(i+1) + j]."""
  return [np.arange(1000 * (i + 1 + offset), 1000 * (i + 1 + offset) + n, dtype=np.uint16 if n < 999 else np.uint32)
          for i, n in enumerate(lengths)]


def reference_batches(docs, seq_len, batch_size):
  """One pass, the obvious way: concatenate [BOS] + doc, cut rows, label every token by hand."""
  stream = [(tok, d) for d, doc in enumerate(docs) for tok in [BOS] + [int(t) for t in doc]]
  row_len, per_batch = seq_len + 1, batch_size * (seq_len + 1)
  stream += [(0, None)] * (-len(stream) % per_batch)
  batches = []
  for b in range(0, len(stream), per_batch):
    rows = {k: [] for k in pipeline.BATCH_KEYS}
    for r in range(b, b + per_batch, row_len):
      row = stream[r:r + row_len]
      seg, pos, segs, poss = 0, 0, [], []
      for i, (_, d) in enumerate(row):
        if d is None:
          segs.append(0)
          poss.append(0)
          continue
        if i == 0 or row[i - 1][1] != d:
          seg, pos = seg + 1, 0
        segs.append(seg)
        poss.append(pos)
        pos += 1
      toks = [t for t, _ in row]
      rows["inputs"].append(toks[:-1])
      rows["targets"].append(toks[1:])
      rows["segment_ids"].append(segs[:-1])
      rows["positions"].append(poss[:-1])
      rows["loss_mask"].append([float(a == b and a != 0) for a, b in zip(segs[:-1], segs[1:])])
    batches.append({k: np.array(v) for k, v in rows.items()})
  return batches


def documents_of(stream):
  """Splits a BOS-delimited stream back into documents."""
  docs, current = [], None
  for tok in stream:
    if tok == BOS:
      if current is not None:
        docs.append(current)
      current = []
    else:
      current.append(tok)
  if current is not None:
    docs.append(current)
  return docs


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(pipeline.BATCH_KEYS) == set(y)
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=25), seq_len=st.integers(1, 12),
       batch_size=st.integers(1, 3))
def test_eval_batches_match_the_reference_packer(lengths, seq_len, batch_size):
  docs = make_docs(lengths)
  got = list(pipeline.make_eval_iterator(docs, seq_len=seq_len, batch_size=batch_size, bos_id=BOS, num_batches=0))
  want = reference_batches(docs, seq_len, batch_size)
  assert_same_batches(got, want)
  for batch in got:
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    assert batch["segment_ids"].dtype == batch["positions"].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32
    assert batch["inputs"].shape == (batch_size, seq_len)


def test_packing_keeps_documents_apart_and_loses_nothing():
  docs = make_docs([5, 300, 17, 1, 64, 2, 129, 40])   # some longer than a row: split across rows
  batches = list(pipeline.make_eval_iterator(docs, seq_len=32, batch_size=4, bos_id=BOS, num_batches=0))
  for b in batches:
    owner = np.where(b["inputs"] == BOS, -1, b["inputs"] // 1000)   # doc id of each input token
    for r in range(b["inputs"].shape[0]):
      for s in set(b["segment_ids"][r].tolist()) - {0}:
        ids = set(owner[r][b["segment_ids"][r] == s].tolist()) - {-1}
        assert len(ids) <= 1, "a segment mixes documents"
        pos = b["positions"][r][b["segment_ids"][r] == s]
        np.testing.assert_array_equal(pos, np.arange(pos.size))
    # Training pairs never cross a document boundary.
    same = (b["inputs"] // 1000 == b["targets"] // 1000) | (b["inputs"] == BOS)
    assert np.all(same[b["loss_mask"] > 0]) and np.all(b["targets"][b["loss_mask"] > 0] != BOS)
  rows = [np.append(b["inputs"][r, :1], b["targets"][r]) for b in batches for r in range(4)]
  stream = np.concatenate(rows)
  want = np.concatenate([np.concatenate([[BOS], d]) for d in docs])
  np.testing.assert_array_equal(stream[:want.size], want)
  assert not stream[want.size:].any()   # only padding after the last document


def test_train_epochs_are_permutations_that_differ():
  docs = make_docs([3] * 30)
  it = pipeline.make_train_iterator(docs, seq_len=7, batch_size=2, bos_id=BOS, seed=3)
  # Each document is 4 tokens with its BOS: 2 rows of 8 tokens = 4 documents per batch.
  batches = take(it, 15)
  rows = [np.append(b["inputs"][r, :1], b["targets"][r]) for b in batches for r in range(2)]
  firsts = [int(d[0]) // 1000 - 1 for d in documents_of(np.concatenate(rows).tolist())]
  epoch1, epoch2 = firsts[:30], firsts[30:60]
  assert sorted(epoch1) == sorted(epoch2) == list(range(30))
  assert epoch1 != epoch2 and epoch1 != list(range(30))


def test_same_seed_same_batches_other_seed_other_order():
  docs = make_docs(np.random.default_rng(0).integers(1, 50, 60).tolist())
  kw = dict(seq_len=16, batch_size=3, bos_id=BOS)
  a = take(pipeline.make_train_iterator(docs, seed=1, **kw), 6)
  b = take(pipeline.make_train_iterator(docs, seed=1, **kw), 6)
  c = take(pipeline.make_train_iterator(docs, seed=2, **kw), 6)
  assert_same_batches(a, b)
  assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])


def test_process_slices_are_disjoint_and_cover():
  docs = make_docs([2] * 25)
  seen = []
  for index in range(3):
    it = pipeline.make_train_iterator(docs, seq_len=5, batch_size=1, bos_id=BOS, seed=0,
                                      process_index=index, process_count=3)
    # 3 tokens per document, 6 per row: 2 documents per batch; slices hold 9, 8, 8 documents.
    n = len(range(index, 25, 3))
    rows = [np.append(b["inputs"][0, :1], b["targets"][0]) for b in take(it, (n + 1) // 2)]
    ids = [d[0] // 1000 - 1 for d in documents_of(np.concatenate(rows).tolist())][:n]
    assert sorted(ids) == list(range(index, 25, 3))
    seen.extend(ids)
  assert sorted(seen) == list(range(25))


def test_eval_iterator_is_deterministic_finite_and_pads_to_num_batches():
  docs = make_docs([10, 20, 30])
  kw = dict(seq_len=8, batch_size=2, bos_id=BOS)
  one_pass = list(pipeline.make_eval_iterator(docs, num_batches=0, **kw))
  assert len(one_pass) == 4   # 63 tokens in rows of 9, 2 rows a batch
  assert_same_batches(one_pass, list(pipeline.make_eval_iterator(docs, num_batches=0, **kw)))
  fixed = list(pipeline.make_eval_iterator(docs, num_batches=6, **kw))
  assert_same_batches(fixed[:4], one_pass)
  assert len(fixed) == 6 and all(b["loss_mask"].sum() == 0 and b["inputs"].shape == (2, 8) for b in fixed[4:])
  assert len(list(pipeline.make_eval_iterator(docs, num_batches=2, **kw))) == 2
  # Two processes: disjoint documents, the same number of batches each.
  parts = [list(pipeline.make_eval_iterator(docs, num_batches=3, process_index=i, process_count=2, **kw))
           for i in range(2)]
  assert [len(p) for p in parts] == [3, 3]
  assert_same_batches(parts[1][:1], reference_batches([docs[1]], 8, 2)[:1])


def test_no_documents_for_a_process_is_a_config_error():
  with pytest.raises(ConfigError, match="no training documents for process 2 of 3"):
    pipeline.make_train_iterator(make_docs([4, 4]), seq_len=4, batch_size=1, bos_id=BOS, seed=0,
                                 process_index=2, process_count=3)


@pytest.mark.parametrize("lengths", [[7] * 40, [200, 5, 300, 9, 1000, 3]], ids=["short", "longer-than-a-batch"])
def test_get_state_set_state_resumes_identically(lengths):
  docs = make_docs(lengths)
  kw = dict(seq_len=16, batch_size=4, bos_id=BOS, seed=5)
  it = pipeline.make_train_iterator(docs, **kw)
  take(it, 3)
  state = it.get_state()
  want = take(it, 8)   # crosses an epoch boundary
  fresh = pipeline.make_train_iterator(docs, **kw)
  fresh.set_state(state)
  assert_same_batches(take(fresh, 8), want)


def test_state_survives_an_orbax_checkpoint(tmp_path):
  docs = make_docs([11, 250, 3, 40, 77, 5, 19])
  kw = dict(seq_len=32, batch_size=2, bos_id=BOS, seed=9)
  it = pipeline.make_train_iterator(docs, **kw)
  take(it, 5)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  want = take(it, 6)
  restored = pipeline.make_train_iterator(docs, **kw)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(mngr.latest_step(), args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(restored)))
  assert_same_batches(take(restored, 6), want)


def test_worker_processes_deliver_every_document_and_restore_state():
  docs = make_docs([9] * 24)
  it = pipeline.make_train_iterator(docs, seq_len=9, batch_size=2, bos_id=BOS, seed=4, num_workers=2)
  try:
    first = take(it, 12)   # a document (with its BOS) fills a row: 12 batches = one epoch
    state = it.get_state()
    want = take(it, 3)
    it.set_state(state)    # the workers restart from the saved state (one start-up, to keep this fast)
    again = take(it, 3)
  finally:
    it.close()
  rows = [np.append(b["inputs"][r, :1], b["targets"][r]) for b in first for r in range(2)]
  ids = [d[0] // 1000 - 1 for d in documents_of(np.concatenate(rows).tolist())]
  assert sorted(ids) == list(range(24))
  assert_same_batches(again, want)


def first_doc_ids(batches):
  rows = [np.append(b["inputs"][r, :1], b["targets"][r]) for b in batches for r in range(b["inputs"].shape[0])]
  return [d[0] // 1000 - 1 for d in documents_of(np.concatenate(rows).tolist())]


def test_map_train_state_is_exact_at_an_epoch_boundary():
  docs = make_docs([3] * 24)   # 4 tokens with the BOS; rows of 8 hold 2 documents
  kw = dict(seq_len=7, batch_size=1, bos_id=BOS, seed=2)
  saved = []
  for i in range(2):   # 12 documents each: 6 batches are exactly one epoch
    it = pipeline.make_train_iterator(docs, process_index=i, process_count=2, **kw)
    take(it, 6)
    saved.append(it.get_state())
  seen = []
  for j in range(3):   # 8 documents each after the change
    state, note = pipeline.map_train_state(saved, len(docs), j, 3)
    assert note == "data position mapped exactly: epoch 1 starts on every process"
    resumed = pipeline.make_train_iterator(docs, process_index=j, process_count=3, **kw)
    resumed.set_state(state)
    fresh = pipeline.make_train_iterator(docs, process_index=j, process_count=3, **kw)
    take(fresh, 4)   # epoch 0 of the new slice
    got = take(resumed, 4)
    assert_same_batches(got, take(fresh, 4))
    seen += first_doc_ids(got)
  assert sorted(seen) == list(range(24))


def test_map_train_state_mid_epoch_rewinds_and_warns():
  docs = make_docs([3] * 24)
  kw = dict(seq_len=8, batch_size=1, bos_id=BOS, seed=2)   # rows of 9: documents get split
  saved = []
  for i in range(2):
    it = pipeline.make_train_iterator(docs, process_index=i, process_count=2, **kw)
    take(it, 7)   # 63 tokens: 15 documents and 3 tokens of the 16th; 12 make an epoch
    saved.append(it.get_state())
  assert saved[0] == {"parent": {"next_index": 15}, "offset": 3}
  state, note = pipeline.map_train_state(saved, len(docs), 0, 1)
  assert state == {"parent": {"next_index": 24}, "offset": 0}   # epoch 1 of the single 24-document slice
  assert note == ("warning: data position mapped to the start of epoch 1; "
                  "6 documents of the interrupted epoch will be seen again")


def test_map_train_state_handles_worker_states():
  def worker_state(*positions):
    return {"next_index_in_cycle": 0, "next_index_in_datasets": len(positions),
            "iterators_in_use_indices": list(range(len(positions))),
            "iterators_in_use_states": [{"parent": {"next_index": k}, "offset": 0} for k in positions],
            "exhausted": [0] * len(positions), "future_states": {}}

  # 2 processes x 2 workers, 13 and 12 documents each: epoch 1 ends after 7+6 and 6+6.
  saved = [worker_state(7, 6), worker_state(6, 6)]
  state, note = pipeline.map_train_state(saved, 25, 0, 1)
  assert state == {"parent": {"next_index": 25}, "offset": 0} and note.startswith("data position mapped exactly")
  it = pipeline.make_train_iterator(make_docs([3] * 25), seq_len=7, batch_size=1, bos_id=BOS, seed=0, num_workers=3)
  try:
    template = it.get_state()   # a fresh iterator's state; no worker has started yet
  finally:
    it.close()
  state, note = pipeline.map_train_state(saved, 25, 0, 1, template=template)
  assert [p["parent"]["next_index"] for p in state["iterators_in_use_states"]] == [9, 8, 8]   # 25 = 9 + 8 + 8
  assert {k: v for k, v in state.items() if k != "iterators_in_use_states"} == {
      k: v for k, v in template.items() if k != "iterators_in_use_states"}
  # One worker behind: rewinds to epoch 0.
  state, note = pipeline.map_train_state([worker_state(7, 5), worker_state(6, 6)], 25, 0, 1)
  assert state["parent"]["next_index"] == 0 and note.startswith("warning: data position mapped to the start of epoch 0")


# -- a cap on documents per row, rows without the document mask, and the prefetch thread ----------

def reference_capped_batches(docs, seq_len, batch_size, cap):
  """One pass with at most `cap` segments per row, the obvious way: fill rows token by token."""
  row_len = seq_len + 1
  rows, row, segs = [], [], 0
  for d, doc in enumerate(docs):
    piece = [BOS] + [int(t) for t in doc]
    while piece:
      if not row:
        segs = 0
      segs += 1
      take_n = min(len(piece), row_len - len(row))
      row += [(t, segs, i) for i, t in enumerate(piece[:take_n])]
      piece = piece[take_n:]
      if len(row) == row_len or (not piece and segs == cap):
        rows.append(row + [(0, 0, 0)] * (row_len - len(row)))
        row = []
  if row:
    rows.append(row + [(0, 0, 0)] * (row_len - len(row)))
  rows += [[(0, 0, 0)] * row_len] * (-len(rows) % batch_size)
  batches = []
  for b in range(0, len(rows), batch_size):
    tok, seg, pos = (np.array([[x[k] for x in r] for r in rows[b:b + batch_size]]) for k in range(3))
    batches.append({"inputs": tok[:, :-1], "targets": tok[:, 1:], "segment_ids": seg[:, :-1],
                    "positions": pos[:, :-1],
                    "loss_mask": ((seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)).astype(np.float32)})
  return batches


def runs_per_row(segment_ids):
  return (np.diff(segment_ids, axis=1) != 0).sum(axis=1) + 1


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=25), seq_len=st.integers(1, 12),
       batch_size=st.integers(1, 3), cap=st.integers(1, 4))
def test_capped_rows_match_the_reference_packer(lengths, seq_len, batch_size, cap):
  docs = make_docs(lengths)
  got = list(pipeline.make_eval_iterator(docs, seq_len=seq_len, batch_size=batch_size, bos_id=BOS, num_batches=0,
                                         max_docs_per_row=cap))
  assert_same_batches(got, reference_capped_batches(docs, seq_len, batch_size, cap))


def row_stream(batches):
  """The tokens of the rows one after another, padding left out (it only ever ends a row)."""
  stream = []
  for b in batches:
    rows = np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
    for row in rows:
      stream += row[row != 0].tolist()  # no document token is 0
  return stream


def test_capped_training_rows_hold_at_most_cap_documents_and_lose_nothing():
  docs = make_docs([3, 1, 30, 2, 5, 0, 8, 4, 61, 2, 2, 7] * 3)
  kw = dict(seq_len=16, batch_size=4, bos_id=BOS, seed=3)
  capped = take(pipeline.make_train_iterator(docs, **kw, max_docs_per_row=3), 12)
  for b in capped:
    assert b["segment_ids"].max() <= 3 and np.all(runs_per_row(b["segment_ids"]) <= 3 + 1)
    padding = b["segment_ids"] == 0
    assert np.all(b["loss_mask"][padding] == 0) and np.all(b["inputs"][padding] == 0)
  assert sum(int((b["segment_ids"] == 0).sum()) for b in capped) > 20
  # The same documents in the same order as without the cap (which loses and repeats nothing),
  # each token once: only padding was added.
  stream = row_stream(capped)
  plain = row_stream(take(pipeline.make_train_iterator(docs, **kw), 12))
  assert len(stream) > sum(1 + d.size for d in docs) and stream == plain[:len(stream)]  # past an epoch


@pytest.mark.parametrize("lengths", [[7] * 40, [200, 5, 300, 9, 1000, 3], [3, 1, 9, 0, 2] * 8],
                         ids=["short", "longer-than-a-batch", "many-per-row"])
def test_capped_iterator_resumes_identically(lengths):
  docs = make_docs(lengths)
  kw = dict(seq_len=16, batch_size=4, bos_id=BOS, seed=5, max_docs_per_row=2)
  it = pipeline.make_train_iterator(docs, **kw)
  take(it, 3)
  state = it.get_state()
  want = take(it, 8)
  fresh = pipeline.make_train_iterator(docs, **kw)
  fresh.set_state(state)
  assert_same_batches(take(fresh, 8), want)


def test_no_cap_packs_as_before_and_a_large_cap_changes_nothing():
  docs = make_docs([5, 3, 8, 2, 9, 1, 4] * 3)
  kw = dict(seq_len=12, batch_size=3, bos_id=BOS, seed=1)
  plain = take(pipeline.make_train_iterator(docs, **kw), 6)
  assert_same_batches(take(pipeline.make_train_iterator(docs, **kw, max_docs_per_row=13 + 1), 6), plain)


def test_without_the_document_mask_rows_are_one_causal_sequence():
  docs = make_docs([5, 3, 8, 2, 9, 1, 4] * 3)
  kw = dict(seq_len=12, batch_size=3, bos_id=BOS, seed=1)
  masked = take(pipeline.make_train_iterator(docs, **kw), 4)
  merged = take(pipeline.make_train_iterator(docs, **kw, document_mask=False), 4)
  for a, b in zip(masked, merged):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["targets"], b["targets"])
    assert np.all(b["segment_ids"] == 1) and np.all(b["loss_mask"] == 1)
    np.testing.assert_array_equal(b["positions"], np.broadcast_to(np.arange(12), (3, 12)))
  # With a cap and at the end of evaluation there is padding: segment 0, no loss, positions still 0..T-1.
  capped = next(pipeline.make_train_iterator(docs, **kw, max_docs_per_row=1, document_mask=False))
  padding = capped["segment_ids"] == 0
  assert padding.any() and set(np.unique(capped["segment_ids"])) == {0, 1}
  assert np.all(capped["loss_mask"][padding] == 0)
  assert np.all(runs_per_row(capped["segment_ids"]) <= 2)
  last = list(pipeline.make_eval_iterator(docs[:2], seq_len=12, batch_size=2, bos_id=BOS, num_batches=2,
                                          document_mask=False))
  assert np.all(last[1]["segment_ids"] == 0) and np.all(last[1]["loss_mask"] == 0)
  np.testing.assert_array_equal(last[1]["positions"], np.broadcast_to(np.arange(12), (2, 12)))


def test_max_runs_per_row():
  assert pipeline.max_runs_per_row(0) == 0 and pipeline.max_runs_per_row(4) == 4
  assert pipeline.max_runs_per_row(0, document_mask=False) == 1 == pipeline.max_runs_per_row(4, False)


def test_prefetch_delivers_the_same_batches_and_saves_the_consumed_position():
  before = prefetch_threads()
  docs = make_docs([200, 5, 300, 9, 1000, 3, 17, 40])
  kw = dict(seq_len=16, batch_size=4, bos_id=BOS, seed=5)
  plain = pipeline.make_train_iterator(docs, **kw)
  ahead = pipeline.make_train_iterator(docs, **kw, prefetch=3)
  try:
    for _ in range(6):
      assert_same_batches([next(ahead)], [next(plain)])
      assert ahead.get_state() == plain.get_state()  # the last batch handed out, not the ones made ahead
    state = ahead.get_state()
    want = take(plain, 5)
    resumed = pipeline.make_train_iterator(docs, **kw, prefetch=2)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 5), want)
    ahead.set_state(state)  # a running thread is stopped, its batches dropped
    assert_same_batches(take(ahead, 5), want)
    resumed.close()
  finally:
    ahead.close()
  assert not prefetch_threads() - before


def test_prefetch_state_survives_an_orbax_checkpoint_and_restores_without_prefetch(tmp_path):
  docs = make_docs([11, 250, 3, 40, 77, 5, 19])
  kw = dict(seq_len=32, batch_size=2, bos_id=BOS, seed=9)
  it = pipeline.make_train_iterator(docs, **kw, prefetch=2)
  take(it, 5)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  want = take(it, 6)
  it.close()
  restored = pipeline.make_train_iterator(docs, **kw)  # the state does not depend on prefetch
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(mngr.latest_step(), args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(restored)))
  assert_same_batches(take(restored, 6), want)


class _Broken:
  """Documents whose read of index `bad` fails, as a corrupt shard would."""

  def __init__(self, docs, bad):
    self.docs, self.bad = docs, bad

  def __len__(self):
    return len(self.docs)

  def __getitem__(self, i):
    if i == self.bad:
      raise OSError(f"cannot read document {i}")
    return self.docs[i]


def test_prefetch_raises_the_threads_error_and_a_dropped_iterator_stops_its_thread():
  before = prefetch_threads()
  it = pipeline.make_train_iterator(_Broken(make_docs([30] * 6), bad=4), seq_len=16, batch_size=1, bos_id=BOS,
                                    seed=0, prefetch=2)
  with pytest.raises(OSError, match="cannot read document 4"):
    take(it, 20)
  it.close()
  it = pipeline.make_train_iterator(make_docs([30] * 6), seq_len=16, batch_size=1, bos_id=BOS, seed=0, prefetch=2)
  next(it)
  assert len(prefetch_threads() - before) == 1
  del it
  gc.collect()
  deadline = time.monotonic() + 5
  while prefetch_threads() - before and time.monotonic() < deadline:
    time.sleep(0.01)
  assert not prefetch_threads() - before
