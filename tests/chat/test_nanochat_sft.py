"""The `nanochat` SFT source equals nanochat's data path (tests/nanochat_reference_sft.py): each
task's conversations and their render (ids and mask), the mixture's order, the best-fit rows
padded with BOS (inputs, and targets with nanochat's -1s), and one epoch of them (sft.steps=0): the
steps trained and the LR of each, on small local task files."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ml_collections
import nanochat_reference_sft as ref
from chat_fixtures import make_base_run, make_tokenizer
from lmtiny.chat import finetune as ft, nanochat_sft
from lmtiny.chat.data import load_chat_data, make_chat_eval_iterator, make_chat_train_iterator
from lmtiny.chat.warm_start import epoch_lr_scale
from lmtiny.corpus.sources import SourceError
from lmtiny.errors import ConfigError
from lmtiny.runs.config_file import read_run_config
from lmtiny.tokenizer import render_conversation
from lmtiny.training import epoch

SEQ = 48


def _smoltalk(n, seed):
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    turns = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
    for _ in range(1 + i % 3):
      a, b = (int(x) for x in rng.integers(0, 99, 2))
      turns += [{"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}." + " Indeed." * int(rng.integers(0, 4))}]
    rows.append({"messages": turns})
  return rows


def _mmlu(n, seed):
  rng = np.random.default_rng(seed)
  return [{"question": f"Which number is {k}?", "subject": "math", "choices": [str(k + j) for j in range(4)],
           "answer": int(rng.integers(0, 4))} for k in range(n)]


# Annotations as GSM8K has them, and the edge cases of nanochat's split: two '=', none, adjacent, at the start.
_ANSWERS = ["He pays 3*4 = <<3*4=12>>12 dollars.\n#### 12", "<<2+2=4>>4 apples, then <<4*2=8>><<8-1=7>>7.\n#### 7",
            "So x = <<a=b=5>>5 and <<noequals>> too.\n#### 5", "No tool here.\n#### 1"]


def _gsm8k(n):
  return [{"question": f"Question {k}: how many?", "answer": _ANSWERS[k % len(_ANSWERS)]} for k in range(n)]


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("nanochat_tasks")
  _jsonl(d / "smoltalk_train.jsonl", _smoltalk(37, 0))
  _jsonl(d / "smoltalk_test.jsonl", _smoltalk(9, 1))
  pq.write_table(pa.Table.from_pylist(_mmlu(21, 2)), d / "mmlu_auxiliary_train.parquet")
  _jsonl(d / "mmlu.jsonl", _mmlu(7, 3))
  _jsonl(d / "gsm8k_train.jsonl", _gsm8k(11))
  _jsonl(d / "gsm8k.jsonl", _gsm8k(5))
  return d


@pytest.fixture(scope="module")
def tok():
  return make_tokenizer()


def _read(path):
  if path.suffix == ".parquet":
    return pq.read_table(path).to_pylist()
  return [json.loads(line) for line in path.read_text().splitlines()]


def _reference_mixture(task_dir, tasks):
  """nanochat's TaskMixture over [(file, convert, stop)]: a list of conversations in mixture order."""
  loaded = []
  for name, convert, stop in tasks:
    rows = _read(next(task_dir.glob(name + ".*")))
    loaded.append([convert(rows[int(i)]) for i in ref.shuffled(len(rows), stop)])
  return [loaded[t][i] for t, i in ref.mixture_pairs([len(x) for x in loaded])]


def _train_reference(task_dir):
  return _reference_mixture(task_dir, [("smoltalk_train", ref.smoltalk, None)] + [("mmlu_auxiliary_train", ref.mmlu, None)] * 3
                            + [("gsm8k_train", ref.gsm8k, None)] * 4)


def test_mixtures_render_as_nanochat_renders_them(task_dir, tok):
  train, val = nanochat_sft.load_mixtures(f"nanochat?data_dir={task_dir}")
  want_val = _reference_mixture(task_dir, [("smoltalk_test", ref.smoltalk, None), ("mmlu", ref.mmlu, 5200),
                                           ("gsm8k", ref.gsm8k, 420)])
  kinds = set()
  for got, want in ((train, _train_reference(task_dir)), (val, want_val)):
    assert len(got) == len(want)
    for i, conversation in enumerate(want):
      assert got[i] == conversation["messages"]  # the same conversation at the same mixture position
      ids, mask = render_conversation(tok, got[i], max_len=nanochat_sft.MAX_TOKENS)
      assert (ids, mask) == ref.render(tok, conversation)
      kinds.add(conversation["messages"][0]["role"])
  assert kinds == {"system", "user"}
  assert train.counts() == {"smoltalk_train": 37, "mmlu_auxiliary_train": 63, "gsm8k_train": 44}
  parts = [p for c in train for m in c if isinstance(m["content"], list) for p in m["content"]]
  assert {"text": "a=b", "type": "python"} in parts and {"text": "noequals", "type": "python"} in parts


# Rows of 161 tokens hold every conversation (36 to 151 tokens) as nanochat renders it (cut at 2,048);
# rows of 49 are shorter than some, which lmtiny cuts at the row (nanochat would never place them).
@pytest.mark.parametrize("document_mask,seq", [(False, 160), (True, SEQ)])
def test_rows_are_nanochats_bestfit_rows_padded_with_bos(task_dir, tok, document_mask, seq):
  data = load_chat_data(f"nanochat?data_dir={task_dir}", tok, seq)
  assert "best-fit rows padded with BOS" in data.describe()
  it = make_chat_train_iterator(data, seq_len=seq, batch_size=4, seed=0, document_mask=document_mask)
  cut = min(seq + 1, 2048)
  want = ref.sft_batches(_train_reference(task_dir), lambda c: ref.render(tok, c, cut), tok.bos_id, 4, seq)
  padded = 0
  for step in range(8):  # 144 conversations, 100 buffered: past the first wrap-around
    if step == 3:  # resume from the state after three batches: the same rows follow
      state = it.get_state()
      it = make_chat_train_iterator(data, seq_len=seq, batch_size=4, seed=0, document_mask=document_mask)
      it.set_state(state)
    batch, (inputs, targets) = next(it), next(want)
    np.testing.assert_array_equal(batch["inputs"], inputs)
    np.testing.assert_array_equal(np.where(batch["loss_mask"] > 0, batch["targets"], -1), targets)
    pad = batch["segment_ids"] == 0
    assert np.all(batch["inputs"][pad] == tok.bos_id)
    padded += int(pad.sum())
    if not document_mask:
      assert batch["segment_ids"].max() == 1
  assert padded > 0 or seq == SEQ  # short rows: the cut conversations fill rows exactly


def test_validation_rows_start_over_each_time(task_dir, tok):
  data = load_chat_data(f"nanochat?data_dir={task_dir}", tok, SEQ)
  want = ref.sft_batches(data.val_docs, lambda c: ref.render(tok, {"messages": c}, SEQ + 1), tok.bos_id, 2, SEQ)
  for _ in range(2):
    batches = list(make_chat_eval_iterator(data.val_docs, seq_len=SEQ, batch_size=2, num_batches=3, data=data,
                                           document_mask=False))
    assert len(batches) == 3
  ref_first = next(want)
  np.testing.assert_array_equal(batches[0]["inputs"], ref_first[0])


def test_nanochat_own_download_reads_as_the_same_rows(task_dir, tmp_path):
  """DIR/task_data/<org--name>/<subset>/<split>/ (nanochat's cache): shards in manifest order."""
  for name, (slug, subset, split) in nanochat_sft.NANOCHAT_CACHE.items():
    rows, shard_dir = _read(next(task_dir.glob(name + ".*"))), tmp_path / "task_data" / slug / subset / split
    shard_dir.mkdir(parents=True)
    half = len(rows) // 2
    for shard, part in (("b.parquet", rows[:half]), ("a.parquet", rows[half:])):  # the manifest's order, not sorted
      pq.write_table(pa.Table.from_pylist(part), shard_dir / shard)
    (shard_dir / "manifest.json").write_text(json.dumps(["b.parquet", "a.parquet"]))
  for got, want in zip(nanochat_sft.load_mixtures(f"nanochat?data_dir={tmp_path}"),
                       nanochat_sft.load_mixtures(f"nanochat?data_dir={task_dir}")):
    assert list(got) == list(want)


def test_nanochat_spec_errors(task_dir, tok):
  with pytest.raises(SourceError, match="cannot be mixed"):
    load_chat_data(f"nanochat?data_dir={task_dir}:1.0,embedded_chat:1.0", tok, SEQ)
  with pytest.raises(SourceError, match="unknown option epochs"):
    load_chat_data("nanochat?epochs=2", tok, SEQ)
  with pytest.raises(Exception, match="no smoltalk_train.jsonl or smoltalk_train.parquet"):
    load_chat_data(f"nanochat?data_dir={task_dir / 'none'}", tok, SEQ)


def _epoch_progress(it):
  """What the trainer reads from a OneEpoch: the progress after each step it trains, to the end."""
  got = []
  while not it.exhausted():
    next(it)
    got.append(it.progress())
  return got


# (rows per step, micro-steps, row length, this process of how many): nanochat's micro-batch is the
# step's first rows / micro-steps; one case cuts conversations at the row, one counts as rank 1 of 2.
@pytest.mark.parametrize("rows, accum, seq, process", [(4, 1, 160, (0, 1)), (4, 2, 160, (0, 1)),
                                                       (6, 3, SEQ, (0, 1)), (4, 2, 160, (1, 2))])
def test_one_epoch_ends_and_schedules_as_nanochats_sft(task_dir, tok, rows, accum, seq, process):
  data = load_chat_data(f"nanochat?data_dir={task_dir}", tok, seq)
  size = len(data.train[0][0])

  def one_epoch():
    it = make_chat_train_iterator(data, seq_len=seq, batch_size=rows, seed=0, process_index=process[0],
                                  process_count=process[1])
    return epoch.OneEpoch(it, size, rows // accum, *process)

  want = ref.sft_epoch(_train_reference(task_dir), lambda c: ref.render(tok, c, min(seq + 1, 2048)), rows // accum,
                       seq, accum, rank=process[0], world=process[1])
  assert 3 < len(want) < 40
  got = _epoch_progress(one_epoch())
  assert got == pytest.approx([min(p, 1.0) for p in want])  # one value per trained step, and as many steps
  assert want[-1] > 1.0 or process[1] > 1 or accum > 1  # nanochat's last step reads the count past the end
  # Resumed from the state after three steps: the same steps follow.
  it = one_epoch()
  for _ in range(3):
    next(it)
  resumed = one_epoch()
  resumed.set_state(it.get_state())
  assert got[:3] + _epoch_progress(resumed) == pytest.approx(got)
  assert len(got) <= epoch.step_bound(size // process[1], rows)


def test_lr_over_the_epoch_is_nanochats_multiplier():
  cfg = ml_collections.ConfigDict({"optim": {"lr": 0.02, "warmup_steps": 0, "schedule": "warmdown",
                                             "decay_fraction": 0.5, "min_lr_ratio": 0.0},
                                   "sft": {"init_lr_frac": 0.8}})
  scale = epoch_lr_scale(cfg)
  for progress in (0.0, 0.3, 0.5, 0.5001, 0.75, 0.99, 1.0):
    assert scale(7, progress) == pytest.approx(0.8 * ref.lr_multiplier(progress))


@pytest.mark.slow(seconds=20)
def test_sft_trains_one_epoch_at_nanochats_lrs_and_resumes_exactly(task_dir, tok, tmp_path):
  base = make_base_run(str(tmp_path), tok)
  cfg = read_run_config(base)
  cfg.optim.update(schedule="warmdown", decay_fraction=0.5, min_lr_ratio=0.0)
  cfg.sft.update(sources=f"nanochat?data_dir={task_dir}", steps=0, warmup_steps=0, lr=3e-3, init_lr_frac=0.8)
  cfg.train.update(eval_every=1000, eval_batches=0, checkpoint_every=3, log_every=5)
  cfg = ft.sft_config(cfg, base, None)
  lines = []
  trainer, full = ft.finetune(cfg, str(tmp_path / "full"), log=lines.append)
  t = trainer.cfg.train
  seq, rows = t.seq_len, trainer.process_batch
  want = ref.sft_epoch(_train_reference(task_dir), lambda c: ref.render(tok, c, seq + 1), trainer.micro_batch, seq,
                       rows // trainer.micro_batch)
  assert full["step"] == len(want) and full["ended_by"] == "epoch"
  assert any(f"one epoch of the data ended after step {len(want)}" in line for line in lines)
  assert any(f"{t.steps} steps at most (one epoch of the data)" in line for line in lines)
  records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  lrs = {r["step"]: r["lr"] for r in records if r["split"] == "train"}
  assert sorted(lrs) == [5, 10, 15][:len(want) // 5] + [len(want)]  # every log_every, and the last step
  for step, lr in lrs.items():
    assert lr == pytest.approx(3e-3 * 0.8 * ref.lr_multiplier(min(want[step - 1], 1.0)), rel=1e-5)
  _, first = ft.finetune(cfg, str(tmp_path / "split"), log=lambda _: None, stop_after=4)
  _, second = ft.finetune(cfg, str(tmp_path / "split"), log=lambda _: None)
  assert [loss for _, loss in first["train_loss"] + second["train_loss"]] == [loss for _, loss in full["train_loss"]]
  assert second["ended_by"] == "epoch"
  lines.clear()
  _, again = ft.finetune(cfg, str(tmp_path / "split"), log=lines.append)  # a finished epoch, re-run
  assert again["step"] == len(want) and again["ended_by"] == "epoch"
  assert f"the epoch of the data ended before step {len(want) + 1}: nothing to train" in lines


def test_one_epoch_needs_the_nanochat_source(tok, tmp_path):
  base = make_base_run(str(tmp_path), tok)
  cfg = read_run_config(base)
  cfg.sft.update(sources="embedded_chat:1.0", steps=0)
  with pytest.raises(ConfigError, match=r"^config.sft.steps=0: one epoch is counted on the nanochat source"):
    ft.sft_config(cfg, base, None)
