"""CORE-style scoring: per-item log-likelihoods against an independent float64 NumPy scorer,
the HF6 task layouts of the fixtures, few-shot selection, and the eval CLI end to end (DCLM CORE
itself: test_tasks_dclm.py)."""
import collections
import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import reference_numpy
from lmtiny import eval as eval_cli
from lmtiny.tasks import hf6
from lmtiny.tasks.model_loading import load_model
from lmtiny.tasks.rows import load_rows
from lmtiny.tasks.scoring import Scorer
from lm_fixtures import ROOT

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "evals")


@pytest.fixture(scope="module")
def run_dir(chat_run, tmp_path_factory):
  copy = str(tmp_path_factory.mktemp("core") / "run")
  shutil.copytree(chat_run, copy)  # the CLI writes eval.json and report.md into it
  return copy


@pytest.fixture(scope="module")
def loaded(run_dir):
  return load_model(run_dir)


def _items(name):
  task = hf6.TASKS[name]
  return task, hf6.convert_rows(name, task, load_rows(name, task.source, FIXTURES))


@pytest.mark.slow(seconds=4)
def test_per_item_log_likelihoods_equal_a_float64_numpy_scorer(loaded):
  params = nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param))
  params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
  rows = []
  for name in hf6.TASKS:
    task, items = _items(name)
    rows += [r for i in range(len(items)) for r in hf6.item_rows(task, items, i, loaded.tokenizer, 128)]
  assert len(rows) > 40 and max(len(r.ids) for r in rows) > 100  # few-shot contexts make long rows
  got = Scorer(loaded.model, loaded.mesh, rows_per_batch=16).score(rows)
  for row, score in zip(rows, got):
    ids = np.asarray(row.ids)
    logits = reference_numpy.forward(params, loaded.cfg.model, ids[None, :-1])[0]
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    targets = ids[1:]
    span = slice(len(targets) - row.n_cont, len(targets))
    nll = -logp[np.arange(len(targets)), targets][span].sum()
    assert score.tokens == row.n_cont
    np.testing.assert_allclose(score.loss_sum, nll, rtol=2e-5, atol=1e-4)
    assert score.greedy_match == bool(np.all(logits[span].argmax(-1) == targets[span]))


def test_task_layouts_and_fewshot_contexts(loaded):
  task, items = _items("winogrande")
  assert items[0].contexts == ("The trophy does not fit in the suitcase because the trophy",
                               "The trophy does not fit in the suitcase because the suitcase")
  assert items[0].choices == ("is too big.",) and items[2].gold == 1
  _, arc = _items("arc_easy")
  assert arc[2].gold == 2 and arc[2].contexts[0].startswith("Question: Which state")
  shots = hf6.fewshot_indices(4, 1, 10)
  assert sorted(shots) == [0, 2, 3] and shots == hf6.fewshot_indices(4, 1, 10)
  task, items = _items("hellaswag")
  rows = hf6.item_rows(task, items, 0, loaded.tokenizer, 128)
  text = loaded.tokenizer.decode(list(rows[0].ids))
  assert text.count("\n\n") == 3 and text.endswith(items[0].choices[0])  # 3 other items as shots
  # Multiple choice scores what follows the options' common prefix: the choice itself.
  assert loaded.tokenizer.decode(list(rows[1].ids[-rows[1].n_cont:])).strip() == items[0].choices[1]


def test_char_norm_scores_each_option_whole(loaded):
  # Options sharing a first word: "token" norm scores what follows it (nanochat), "char" norm must
  # score the whole option, else the loss would miss text that the character count includes.
  task = hf6.TASKS["arc_easy"]
  items = [hf6.Item(("Question: What sat on the mat?\nAnswer:",), ("the cat sat", "the dog ran far"), 0)]
  tok = loaded.tokenizer
  scored = lambda r: tok.decode(list(r.ids[-r.n_cont:])).strip()
  by_token = hf6.item_rows(task, items, 0, tok, 128)
  by_char = hf6.item_rows(task, items, 0, tok, 128, norm="char")
  assert [scored(r) for r in by_char] == list(items[0].choices)
  assert [scored(r) for r in by_token] == ["cat sat", "dog ran far"]
  assert [r.ids for r in by_char] == [r.ids for r in by_token]  # same text, only the span differs
  # The char norm divides by the option's characters, as lm-eval-harness's acc_norm does
  # (len(choice): the delimiter is scored but not counted).
  Score = collections.namedtuple("Score", "loss_sum tokens greedy_match")
  scores = [Score(11.0, 3, False), Score(16.0, 5, False)]
  assert hf6.item_correct(task, items[0], scores, "char")  # 11/11 < 16/15: the gold option
  assert not hf6.item_correct(task, items[0], scores, "token")  # 11/3 > 16/5


def test_char_norm_picks_what_lm_eval_acc_norm_picks():
  # Options "a" and "bb": lm-eval divides by 1 and 2 (1.0 > 0.95: "bb"); dividing by the
  # delimiter too (1.0/2 < 1.9/3) would pick "a".
  task = hf6.TASKS["arc_easy"]
  item = hf6.Item(("Question: q\nAnswer:",), ("a", "bb"), 1)
  Score = collections.namedtuple("Score", "loss_sum tokens greedy_match")
  scores = [Score(1.0, 1, False), Score(1.9, 1, False)]
  assert [s.loss_sum / len(c) for s, c in zip(scores, item.choices)] == [1.0, 0.95]
  assert hf6.item_correct(task, item, scores, "char")
  assert hf6.item_pick(task, item, scores, "none") == 0  # lm-eval's acc: the likeliest option, undivided


def test_harness_norms_tokenize_the_pair_as_lm_eval_does(loaded):
  # lm-eval moves the context's trailing whitespace into the continuation and scores the whole
  # text's tokens after the context's own: here the context's space and the delimiter's.
  tok, task = loaded.tokenizer, hf6.TASKS["arc_easy"]
  items = [hf6.Item(("The capital of France is ",), ("Paris.", "Rome"), 0)]
  rows = hf6.item_rows(dataclasses.replace(task, shots=0), items, 0, tok, 128, norm="none")
  context = [tok.bos_id] + tok.encode("The capital of France is")
  for row, option in zip(rows, items[0].choices):
    assert list(row.ids[:len(context)]) == context
    assert tok.decode(list(row.ids[-row.n_cont:])) == "  " + option


@pytest.mark.slow(seconds=4)
def test_eval_cli_writes_results_and_the_report(run_dir, capsys):
  args = ["--workdir", run_dir, "--tasks", "hf6,gsm8k", "--data-dir", FIXTURES, "--max-new-tokens", "8"]
  assert eval_cli.main(args) == 0
  out = json.load(open(os.path.join(run_dir, "eval.json")))
  assert set(out["results"]) == set(hf6.TASKS) | {"gsm8k"}
  for name in hf6.TASKS:
    r = out["results"][name]
    assert r["centered"] == pytest.approx((r["accuracy"] - hf6.TASKS[name].chance) / (1 - hf6.TASKS[name].chance))
  assert out["hf6"] == pytest.approx(np.mean([out["results"][n]["centered"] for n in hf6.TASKS]))
  assert "core" not in out  # the six tasks' mean is not CORE (lmtiny.tasks.dclm is)
  assert out["results"]["gsm8k"]["items"] == 2
  printed = capsys.readouterr().out
  assert "HF6 mean " in printed and "CORE" not in printed
  assert "| **HF6 mean** (not CORE) |" in open(os.path.join(run_dir, "report.md")).read()


def test_eval_quantized_scores_close_to_full_precision_and_kept_apart(run_dir):
  args = ["--workdir", run_dir, "--tasks", "arc_easy,piqa", "--data-dir", FIXTURES]
  assert eval_cli.main(args) == 0 and eval_cli.main(args + ["--quantize", "int8"]) == 0
  full = json.load(open(os.path.join(run_dir, "eval.json")))["results"]
  int8 = json.load(open(os.path.join(run_dir, "eval_int8.json")))["results"]
  for name in ("arc_easy", "piqa"):  # per-channel int8 barely moves the choice log-likelihoods
    assert int8[name]["items"] == full[name]["items"]
    assert abs(int8[name]["accuracy"] - full[name]["accuracy"]) <= 1 / full[name]["items"] + 1e-9


@pytest.mark.slow(seconds=7)
def test_a_lora_run_evaluates_as_its_merged_model(lora_run, chat_run):
  # eval loads a LoRA run (adapters only) through the one loader: its base with the adapters folded in.
  lora_dir, merged_dir = lora_run
  args = lambda d: eval_cli.parse_args(["--workdir", d, "--tasks", "core", "--data-dir", FIXTURES])
  lora_out, merged_out = (eval_cli.evaluate(args(d)) for d in (lora_dir, merged_dir))
  for out in (lora_out, merged_out):
    for r in out["results"].values():
      r.pop("seconds")
  assert lora_out == merged_out and lora_out["step"] == 3
  models = {d: load_model(d) for d in (lora_dir, merged_dir, chat_run)}
  task, items = _items("hellaswag")
  rows = [r for i in range(len(items)) for r in hf6.item_rows(task, items, i, models[chat_run].tokenizer, 128)]
  losses = {d: np.array([s.loss_sum for s in Scorer(m.model, m.mesh, rows_per_batch=16).score(rows)])
            for d, m in models.items()}
  np.testing.assert_allclose(losses[lora_dir], losses[merged_dir], rtol=1e-5, atol=1e-5)
  assert np.abs(losses[lora_dir] - losses[chat_run]).max() > 1e-2  # the adapters change the model


@pytest.mark.parametrize("args, message", [
    (["--tasks", "nope"], "--tasks: unknown task 'nope'"),
    (["--tasks", "bpb", "--group-size", "32"], "--group-size=32: only applies with --quantize"),
    (["--tasks", "arc_easy", "--data-dir", "/nonexistent"], "--data-dir=/nonexistent: no arc_easy"),
    (["--tasks", "arc_easy"], "offline (HF_HUB_OFFLINE is set); point --data-dir at a directory holding arc_easy.jsonl"),
])
def test_bad_input_is_one_line_and_exit_2(run_dir, capsys, monkeypatch, args, message):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  from lmtiny.tasks import model_loading as loading  # the data is read before the weights load: errors come in seconds
  monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model loaded before the data"))
  assert eval_cli.main(["--workdir", run_dir, *args]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_parquet_task_files_read_as_whole_rows(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  rows = load_rows("arc_easy", "", FIXTURES)
  pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "arc_easy.parquet"))
  assert load_rows("arc_easy", "", str(tmp_path)) == rows
  assert load_rows("arc_easy", "", str(tmp_path), limit=2) == rows[:2]


@pytest.mark.parametrize("text", ['{"step": 30, "res', '{"name": "my notes"}', "[1, 2]"])
def test_an_eval_json_lmtiny_did_not_write_is_refused_before_the_model_loads(run_dir, tmp_path, capsys,
                                                                            monkeypatch, text):
  # Before: a user's eval.json (or a damaged one) was replaced by this evaluation's results.
  from lmtiny.tasks import model_loading as loading
  monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
  run = tmp_path / "run"
  shutil.copytree(run_dir, run)
  (run / "eval.json").write_text(text)
  assert eval_cli.main(["--workdir", str(run), "--tasks", "bpb"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {run / 'eval.json'}: not an evaluation file lmtiny wrote") and err.count("\n") == 1
  assert (run / "eval.json").read_text() == text


def test_eval_json_keeps_every_step_and_keys_it_did_not_write(tmp_path):
  # Before: evaluating another step dropped the earlier step's results, and a user's extra keys.
  path = tmp_path / "eval.json"
  path.write_text(json.dumps({"step": 30, "results": {"bpb": {"bpb": 1.5}}, "my_note": "baseline"}))  # an older file
  eval_cli.save(str(tmp_path), {"step": 40, "results": {"bpb": {"bpb": 1.25}}})
  eval_cli.save(str(tmp_path), {"step": 40, "results": {"gsm8k": {"accuracy": 0.5, "items": 2}}})
  saved = json.loads(path.read_text())
  assert saved["format"] == eval_cli.EVAL_FORMAT and saved["step"] == 40 and saved["my_note"] == "baseline"
  assert set(saved["results"]) == {"bpb", "gsm8k"}  # the same step merges
  assert saved["steps"] == {"30": {"step": 30, "results": {"bpb": {"bpb": 1.5}}}}
  eval_cli.save(str(tmp_path), {"step": 30, "results": {"gsm8k": {"accuracy": 0.25, "items": 2}}})
  saved = json.loads(path.read_text())  # step 30 again: its earlier results come back to the top, merged
  assert saved["step"] == 30 and set(saved["results"]) == {"bpb", "gsm8k"} and set(saved["steps"]) == {"40"}


@pytest.mark.parametrize("flag, value, message", [
    ("--eval-batches", "-1", "--eval-batches=-1: must be >= 0 (0: the run's train.eval_batches)"),
    ("--max-items", "-2", "--max-items=-2: must be >= 0 (0: every item)"),
    ("--batch", "0", "--batch=0: must be >= 1"),
    ("--max-new-tokens", "0", "--max-new-tokens=0: must be >= 1"),
    ("--step", "-1", "--step=-1: must be >= 0"),
    ("--group-size", "-8", "--group-size=-8: must be >= 0 (0: one group per output channel)"),
])
def test_every_numeric_flag_is_checked_first(tmp_path, capsys, flag, value, message):
  # Before the run is read or anything is written: a run directory is not even needed.
  args = ["--workdir", str(tmp_path / "run"), "--tasks", "bpb", flag, value]
  assert eval_cli.main(args + (["--quantize", "int8"] if flag == "--group-size" else [])) == 2
  assert capsys.readouterr().err == f"error: {message}\n"
  assert os.listdir(tmp_path) == []
