"""Conversation sources and packing: whole conversations per row, the render's loss mask on the
targets, exact resume, mixture weights, and the embedded question set."""
import json

import numpy as np
import pytest

from chat_fixtures import conversations, make_tokenizer, write_jsonl
from lmtiny.chat import conversations as conv_lib
from lmtiny.chat.data import (ChatData, DocumentExample, Examples, load_chat_data, make_chat_eval_iterator,
                              make_chat_train_iterator, render_examples)
from lmtiny.corpus.sources import SourceError
from lmtiny.tokenizer import render_conversation

SEQ = 96


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return make_tokenizer()


@pytest.fixture(scope="module")
def examples(tok):
  return render_examples(conversations(60), tok, SEQ + 1, "test")


def _segments(batch):
  """Per row: [(ids, loss mask over targets)] of each segment, read back from a batch."""
  out = []
  for b in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][b]
    for s in np.unique(seg[seg > 0]):
      idx = np.flatnonzero(seg == s)
      np.testing.assert_array_equal(batch["positions"][b, idx], np.arange(idx.size))
      assert np.all(np.diff(idx) == 1)  # contiguous
      out.append((b, idx, s))
  return out


def _whole(batch, b, idx):
  """A segment's tokens, its last one included when the segment fills its row (it is no input)."""
  ids = tuple(batch["inputs"][b, idx])
  return ids + (batch["targets"][b, -1],) if idx[-1] == batch["inputs"].shape[1] - 1 else ids


def test_packing_keeps_conversations_whole_with_their_mask(tok, examples):
  it = make_chat_train_iterator(ChatData([(examples, 1.0, "x")], Examples([]), tok, None, SEQ + 1),
                                seq_len=SEQ, batch_size=4, seed=0)
  batch = next(it)
  lookup = {tuple(examples[i][0]): examples[i] for i in range(len(examples))}
  found = 0
  for b, idx, s in _segments(batch):
    ids = tuple(batch["inputs"][b, idx])
    if ids not in lookup:  # a segment filling its row to the end: its last token is no input
      assert tuple(batch["inputs"][b, idx]) + (batch["targets"][b, idx[-1]],) in lookup
      continue
    _, want_mask = lookup[ids]
    # loss on predicting token i+1 counts iff the render marked token i+1 (never into the next segment)
    np.testing.assert_array_equal(batch["loss_mask"][b, idx], np.r_[want_mask[1:], 0])
    found += 1
  assert found >= 4
  # Padding has no segment and no loss; nothing trains across a conversation boundary.
  pad = batch["segment_ids"] == 0
  assert not batch["loss_mask"][pad].any()
  boundary = np.zeros_like(pad)
  boundary[:, :-1] = batch["segment_ids"][:, 1:] != batch["segment_ids"][:, :-1]
  assert not batch["loss_mask"][boundary].any()


def test_a_row_holds_at_most_max_per_row_conversations_and_the_same_ones_in_order(tok, examples):
  """data.max_docs_per_row caps SFT rows too: packed attention sizes its per-run state by the cap
  (lmtiny.training.steps.packed_runs), so a row with more runs would merge conversations."""
  data = ChatData([(examples, 1.0, "x")], Examples([]), tok, None, SEQ + 1)
  capped = make_chat_train_iterator(data, seq_len=SEQ, batch_size=4, seed=0, max_per_row=1)
  free = make_chat_train_iterator(data, seq_len=SEQ, batch_size=4, seed=0)
  ids, most = {"capped": [], "free": []}, {"capped": 0, "free": 0}
  for _ in range(3):
    for name, it in (("capped", capped), ("free", free)):
      batch = next(it)
      segments = _segments(batch)
      ids[name] += [_whole(batch, b, idx) for b, idx, _ in segments]
      most[name] = max(most[name], max(np.bincount([b for b, _, _ in segments])))
  assert most == {"capped": 1, "free": 2}  # conversations of 32-67 tokens, rows of 96
  n = len(ids["capped"])
  assert ids["capped"] == ids["free"][:n]  # the same conversations, in the same order


def test_render_mask_trains_only_on_assistant_text(tok, examples):
  ids, mask = examples[1]
  end = tok.special_id("assistant_end")
  want_ids, want_mask = render_conversation(tok, conversations(60)[1], max_len=SEQ + 1)
  assert list(ids) == want_ids and list(mask) == want_mask
  assert mask[list(ids).index(end)] == 1 and mask[0] == 0
  assert tok.decode([i for i, m in zip(ids, mask) if m and i != end]).startswith(
      conversations(60)[1][1]["content"])


def test_resume_from_state_gives_the_same_batches(tok, examples):
  data = ChatData([(examples, 1.0, "x")], Examples([]), tok, None, SEQ + 1)
  it = make_chat_train_iterator(data, seq_len=SEQ, batch_size=2, seed=3)
  for _ in range(7):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(4)]
  again = make_chat_train_iterator(data, seq_len=SEQ, batch_size=2, seed=3)
  again.set_state(json.loads(json.dumps(state)))
  for a, b in zip(want, [next(again) for _ in range(4)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_mixture_follows_the_weights_and_documents_train_everywhere(tok, examples):
  docs = [np.arange(5, 5 + n, dtype=np.int32) for n in (10, 12, 14)]
  data = ChatData([(examples, 3.0, "chat"), (docs, 1.0, "pretrain")], Examples([]), tok, None, SEQ + 1)
  it = make_chat_train_iterator(data, seq_len=SEQ, batch_size=8, seed=0)
  n_doc = n_all = 0
  for _ in range(6):
    batch = next(it)
    for b, idx, s in _segments(batch):
      n_all += 1
      if batch["inputs"][b, idx[0]] == tok.bos_id and batch["inputs"][b, idx[1]] == 5:
        n_doc += 1
        assert batch["loss_mask"][b, idx[:-1]].all()  # a document trains on every token
  assert 0.15 < n_doc / n_all < 0.35  # weight 1 of 4
  ids, mask = DocumentExample(0, 8)(np.arange(1, 20))
  assert list(ids) == [0, 1, 2, 3, 4, 5, 6, 7] and list(mask) == [0] + [1] * 7


def test_eval_iterator_covers_every_held_out_conversation_once(tok, examples):
  batches = list(make_chat_eval_iterator(examples, seq_len=SEQ, batch_size=4, num_batches=40))
  assert len(batches) == 40
  total = sum(float(b["loss_mask"].sum()) for b in batches)
  want = sum(float(examples[i][1][1:].sum()) for i in range(len(examples)))
  assert total == want


def test_load_chat_data_reads_jsonl_with_held_out_rows_and_limits(tok, tmp_path):
  path = write_jsonl(str(tmp_path / "c.jsonl"), conversations(120))
  data = load_chat_data(f"{path}:2,{path}?limit=10:1", tok, SEQ)
  (a, wa, _), (b, wb, _) = data.train
  assert (len(a), wa, len(b), wb) == (117, 2.0, 10, 1.0)  # every 50th held out of the first
  assert len(data.val_docs) == 3 and len(data.train_docs) == 127


@pytest.mark.parametrize("line, message", [
    ("{not json", "c.jsonl:1: invalid JSON"),
    ('{"text": "x"}', "c.jsonl:1: no field 'messages'"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "c.jsonl:1: each message needs a role"),
])
def test_bad_conversation_files_name_file_and_line(tok, tmp_path, line, message):
  (tmp_path / "c.jsonl").write_text(line + "\n")
  with pytest.raises(SourceError, match=message):
    load_chat_data(str(tmp_path / "c.jsonl"), tok, SEQ)


def test_parquet_messages_column(tok, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  convs = conversations(5)
  pq.write_table(pa.table({"messages": convs}), str(tmp_path / "c.parquet"))
  assert list(conv_lib.iter_conversations(str(tmp_path / "c.parquet"))) == convs
  with pytest.raises(SourceError, match="not a conversation source"):
    list(conv_lib.iter_conversations("txt:foo"))


def test_toy_arithmetic_source_teaches_replies_that_the_rl_reward_accepts(tok):
  from lmtiny.tasks.gsm8k import reward
  from lmtiny.tasks.toy import toy_rows
  convs, rows = list(conv_lib.iter_conversations("toy_arithmetic?n=20&seed=1")), toy_rows(20, seed=1)
  assert [c[0]["content"] for c in convs] == [r["question"] for r in rows]
  for conv, row in zip(convs, rows):
    ids, mask = render_conversation(tok, conv)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])  # what SFT teaches the model to write
    assert reward(trained, row["answer"]) == 1.0
    assert tok.special_id("python_start") in ids and tok.special_id("output_start") in ids  # the calculator call
  data = load_chat_data("toy_arithmetic:1,toy_arithmetic?limit=10:1", tok, SEQ)
  assert [len(items) for items, _, _ in data.train] == [1960, 10] and len(data.val_docs) == 40
  with pytest.raises(SourceError, match=r"toy_arithmetic\?n=x: n must be an integer >= 1"):
    list(conv_lib.iter_conversations("toy_arithmetic?n=x"))


def test_mixture_spec_parsing():
  assert conv_lib.parse_mixture("embedded_chat:1.0, pretrain:0.2,hf:a/b?pattern=x:0.5,f.jsonl") == [
      ("embedded_chat", 1.0), ("pretrain", 0.2), ("hf:a/b?pattern=x", 0.5), ("f.jsonl", 1.0)]
  assert conv_lib.split_limit("jsonl:x?limit=5&field=m") == ("jsonl:x?field=m", 5)
  for bad in ("", "a:0", "a:-1"):
    with pytest.raises(SourceError, match="config.sft.sources"):
      conv_lib.parse_mixture(bad)


def test_embedded_set_is_deterministic_with_disjoint_held_out_questions(monkeypatch, tmp_path):
  from lmtiny.data import dataset
  from lmtiny.corpus import embedded
  files = embedded.stdlib_source_files()
  monkeypatch.setattr(embedded, "stdlib_source_files", lambda: files[:60])
  monkeypatch.setattr(dataset, "DEFAULT_CACHE_DIR", str(tmp_path))
  conv_lib.stdlib_entries.cache_clear()
  try:
    train, val = conv_lib.embedded_conversations("train"), conv_lib.embedded_conversations("val")
    assert train == conv_lib.embedded_conversations("train")
    asked = lambda convs: {m["content"] for c in convs for m in c if m["role"] == "user"}
    assert val and not asked(val) & asked(train)
    entries = {f"{e['module']}.{e['name']}": e for e in conv_lib.stdlib_entries()}
    for c in val:
      answer = c[1]["content"]
      assert any(answer.endswith(e["summary"]) and name in answer for name, e in entries.items())
  finally:
    conv_lib.stdlib_entries.cache_clear()
  assert conv_lib.summary("One.  Two\nlines.\n\nMore.") == "One. Two lines."


def test_stdlib_entries_cache_gives_the_parsed_entries_and_survives_a_torn_file(monkeypatch, tmp_path):
  from lmtiny.data import dataset
  from lmtiny.corpus import embedded
  files = embedded.stdlib_source_files()[:40]
  monkeypatch.setattr(embedded, "stdlib_source_files", lambda: files)
  monkeypatch.setattr(dataset, "DEFAULT_CACHE_DIR", str(tmp_path))
  parse, parses = conv_lib._parse_stdlib_entries, []
  monkeypatch.setattr(conv_lib, "_parse_stdlib_entries", lambda f: parses.append(len(f)) or parse(f))
  entries = conv_lib.stdlib_entries.__wrapped__
  parsed = parse(files)
  assert len(parsed) > 20
  assert entries() == parsed and entries() == parsed and parses == [40]  # parsed once, then read back
  (cached,) = tmp_path.glob("stdlib-entries-*.json")
  cached.write_text(cached.read_text()[:100])  # torn
  assert entries() == parsed and parses == [40, 40]
  assert json.loads(cached.read_text()) == parsed  # rewritten whole
  monkeypatch.setattr(embedded, "stdlib_source_files", lambda: files[:39])  # other files: another key
  assert entries() == parse(files[:39]) and len(list(tmp_path.glob("stdlib-entries-*.json"))) == 2
