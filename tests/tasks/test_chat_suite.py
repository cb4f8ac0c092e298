"""The chat suite (nanochat's chat_eval): rows in their sources' layouts (fixtures), the
multiple-choice rendering and letter scoring with rigged scorers, the generative tasks with a
scripted sampler (HumanEval through the sandbox, spelling), ChatCORE, and the tiny model end to end."""
import json
import os
import time
from types import SimpleNamespace

import pytest

from lm_fixtures import ROOT
from lmtiny import eval as eval_cli
from lmtiny.errors import UserError
from lmtiny.model.sampling import Generation
from lmtiny.tasks import chat_suite, humaneval, spelling
from lmtiny.tasks.chat_suite import Choice
from lmtiny.tasks.rows import EvalDataError
from lmtiny.tasks.scoring import RowScore
from lmtiny.tokenizer import render_for_completion

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "evals", "chat")
ALL = list(chat_suite.TASKS)


@pytest.fixture(scope="module")
def tok(chat_run):
  from lmtiny.tokenizer import Tokenizer
  return Tokenizer.load(chat_run + "/tokenizer.model")


@pytest.fixture(scope="module")
def rows():
  return chat_suite.load_chat_rows(ALL, FIXTURES)


def _fixture(name):
  with open(os.path.join(FIXTURES, name + ".jsonl")) as f:
    return [json.loads(line) for line in f]


# -- rows ---------------------------------------------------------------------------------------

def test_rows_load_from_the_fixtures_in_their_sources_layouts(rows):
  assert {n: len(r) for n, r in rows.items()} == {"arc_easy": 4, "arc_challenge": 3, "mmlu": 4, "gsm8k": 2,
                                                 "humaneval": 3, "spelling": spelling.TEST_ITEMS}
  assert chat_suite.choice_item("arc_easy", rows["arc_easy"][3]) == Choice(
      "Water freezes into what?", ("1", "2", "3", "4"), ("steam", "ice", "smoke", "dust"), "2")
  assert chat_suite.choice_item("mmlu", rows["mmlu"][1]).answer == "C"
  assert len(chat_suite.choice_item("arc_challenge", rows["arc_challenge"][1]).letters) == 5
  limited = chat_suite.load_chat_rows(["mmlu", "spelling"], FIXTURES, limit=2)
  assert len(limited["mmlu"]) == 2 and len(limited["spelling"]) == 2


def test_task_names():
  assert chat_suite.chat_task_names("all", "--chat-tasks") == ALL
  assert chat_suite.chat_task_names("mmlu, spelling,mmlu", "--chat-tasks") == ["mmlu", "spelling"]
  with pytest.raises(UserError, match=r"^--chat-tasks='mmlu,hellaswag': unknown chat task hellaswag"):
    chat_suite.chat_task_names("mmlu,hellaswag", "--chat-tasks")


def test_missing_or_malformed_data_is_one_line_naming_the_flag(tmp_path, monkeypatch):
  with pytest.raises(EvalDataError, match=rf"^--data-dir={tmp_path}: no mmlu.jsonl or mmlu.parquet$"):
    chat_suite.load_chat_rows(["mmlu"], str(tmp_path))
  with pytest.raises(EvalDataError, match=rf"^config.sft.chat_eval_data_dir={tmp_path}: no words_alpha.txt"):
    chat_suite.load_chat_rows(["spelling"], str(tmp_path), flag="config.sft.chat_eval_data_dir")
  (tmp_path / "arc_easy.jsonl").write_text(json.dumps({"question": "q", "choices": {"text": ["a"], "label": ["A"]},
                                                        "answerKey": "B"}) + "\n")
  with pytest.raises(EvalDataError, match=rf"^{tmp_path}/arc_easy.jsonl: row 0 is not in the source's layout \(ValueError"):
    chat_suite.load_chat_rows(["arc_easy"], str(tmp_path))
  (tmp_path / "humaneval.jsonl").write_text(json.dumps({"prompt": "def f():\n", "test": "x"}) + "\n")
  with pytest.raises(EvalDataError, match=rf"^{tmp_path}/humaneval.jsonl: row 0 has no text field entry_point$"):
    chat_suite.load_chat_rows(["humaneval"], str(tmp_path))


def _first_row_changed(tmp_path, name, change):
  """DATA_DIR/<name>.jsonl: the fixture with `change` applied to its first row."""
  rows = _fixture(name)
  change(rows[0])
  (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("name, change, message", [
    # Before, scored as if valid: MMLU_LETTERS[-1] is "D"; zip() dropped the texts without a label
    ("mmlu", lambda r: r.update(answer=-1), "row 0 is not in the source's layout (ValueError: answer -1 is not "
     "the index of one of the 4 choices)"),
    ("mmlu", lambda r: r.update(answer=4), "row 0 is not in the source's layout (ValueError: answer 4 is not "),
    ("arc_easy", lambda r: r["choices"]["label"].pop(), "row 0 is not in the source's layout (ValueError: 3 labels "
     "for 4 texts)"),
    ("arc_challenge", lambda r: r["choices"]["text"].pop(), "row 0 is not in the source's layout (ValueError: 4 "
     "labels for 3 texts)"),
    # Before, scored 0 whatever the reply (the reference has no answer to match)
    ("gsm8k", lambda r: r.update(answer="7 apples"), "row 0: the answer has no '#### <number>' line, so no "
     "reply could score (1 of 2 rows lack one)"),
    ("gsm8k", lambda r: r.update(answer=7), "row 0 has no text field answer"),
])
def test_a_row_that_would_be_scored_wrongly_is_one_line_naming_the_file_and_row(tmp_path, name, change, message):
  _first_row_changed(tmp_path, name, change)
  with pytest.raises(EvalDataError) as e:
    chat_suite.load_chat_rows([name], str(tmp_path))
  assert str(e.value).startswith(f"{tmp_path / name}.jsonl: {message}"), str(e.value)


def test_a_file_that_is_not_utf8_or_is_a_directory_is_one_line_naming_it(tmp_path):
  # Before, a UnicodeDecodeError / IsADirectoryError traceback (every jsonl task: one shared reader).
  text = open(os.path.join(FIXTURES, "mmlu.jsonl"), "rb").read()
  (tmp_path / "mmlu.jsonl").write_bytes(text.replace(b"Mercury", b"Merc\xfcry"))
  with pytest.raises(EvalDataError, match=rf"^{tmp_path}/mmlu.jsonl:2: not UTF-8 text \(byte 0xfc at column \d+\)$"):
    chat_suite.load_chat_rows(["mmlu"], str(tmp_path))
  (tmp_path / "gsm8k.jsonl").mkdir()
  with pytest.raises(EvalDataError, match=rf"^{tmp_path}/gsm8k.jsonl: cannot read \(Is a directory\)$"):
    chat_suite.load_chat_rows(["gsm8k"], str(tmp_path))
  (tmp_path / "words_alpha.txt").mkdir()  # the spelling task's word list
  with pytest.raises(EvalDataError, match=rf"^{tmp_path}/words_alpha.txt: cannot read \(Is a directory\)$"):
    spelling.load_words(str(tmp_path))


def test_offline_without_a_data_dir_is_one_line_naming_the_flag(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(UserError, match=r"^mmlu\?|hf:cais/mmlu.*offline.*--data-dir") as e:
    chat_suite.load_chat_rows(["mmlu"])
  assert "\n" not in str(e.value)
  monkeypatch.setattr(spelling, "probe", lambda host, port: f"cannot resolve {host}")
  with pytest.raises(EvalDataError, match=r"^spelling: no network \(cannot resolve raw.githubusercontent.com\); "
                                          r"point --data-dir at a directory holding words_alpha.txt"):
    spelling.load_words(None, "--data-dir", cache_dir=str(tmp_path))


# -- multiple choice ----------------------------------------------------------------------------

def test_the_multiple_choice_prompt_renders_exactly(rows):
  item = chat_suite.choice_item("arc_easy", rows["arc_easy"][2])
  assert chat_suite.render_choice(item) == (
      "Multiple Choice question: Which tool measures temperature?\n"
      "- a ruler=A\n- a thermometer=B\n- a scale=C\n\n"
      "Respond only with the letter of the correct answer.")


def test_letters_are_single_tokens_and_the_same_as_in_the_prompt(tok):
  ids = chat_suite.letter_ids(tok, ["A", "B", "C", "D", "1"])
  assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == 5
  # after "=" in the prompt the letter is the same token as the reply's first token
  assert tok.encode("- ice=B\n")[-2:] == ids[1] + tok.encode("\n")


class RiggedScorer:
  """Loss 0 for the row whose continuation is `pick(item's letters, gold)`'s token, 5 otherwise;
  records the rows it saw."""

  def __init__(self, tok, golds, pick):
    self.tok, self.max_len, self.rows = tok, 4096, []
    self.golds, self.pick = golds, pick

  def score(self, rows):
    self.rows = list(rows)
    out = []
    for row in rows:
      prompt = list(row.ids[:-row.n_cont])
      letter = self.tok.decode(list(row.ids[-row.n_cont:]))
      gold, letters = self.golds[tuple(prompt)]
      out.append(RowScore(0.0 if letter == self.pick(letters, gold) else 5.0, row.n_cont, False))
    return out


def _golds(tok, name, rows):
  out = {}
  for row in rows:
    item = chat_suite.choice_item(name, row)
    prompt = render_for_completion(tok, [{"role": "user", "content": chat_suite.render_choice(item)}])
    out[tuple(prompt)] = (item.answer, item.letters)
  return out


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "mmlu"])
def test_a_scorer_that_likes_the_right_letter_scores_1_and_a_wrong_one_0(tok, rows, name):
  golds = _golds(tok, name, rows[name])
  right = RiggedScorer(tok, {k: (g, l) for k, (g, l) in golds.items()}, lambda letters, gold: gold)
  out = chat_suite.evaluate_chat(tok, {name: rows[name]}, scorer=right)[name]
  assert out["accuracy"] == 1.0 and out["correct"] == out["items"] == len(rows[name])
  assert out["centered"] == 1.0 and out["truncated"] == 0
  # one row per letter, each the prompt (ending with <|assistant_start|>) and the letter's token
  n_letters = sum(len(chat_suite.choice_item(name, r).letters) for r in rows[name])
  assert len(right.rows) == n_letters
  assert all(r.n_cont == 1 and r.ids[-2] == tok.special_id("assistant_start") for r in right.rows)
  wrong = RiggedScorer(tok, golds, lambda letters, gold: next(x for x in letters if x != gold))
  out = chat_suite.evaluate_chat(tok, {name: rows[name]}, scorer=wrong)[name]
  assert out["accuracy"] == 0.0 and out["centered"] == pytest.approx(-1 / 3)


def test_a_tie_picks_the_first_letter(tok):
  item = Choice("q", ("A", "B"), ("x", "y"), "A")
  flat = SimpleNamespace(max_len=4096, score=lambda rows: [RowScore(1.0, 1, False) for _ in rows])
  assert chat_suite.predict_choices(flat, tok, [item]) == ([0], 0)
  short = SimpleNamespace(max_len=8, score=flat.score)
  assert chat_suite.predict_choices(short, tok, [item])[1] == 1  # the prompt was cut to fit


# -- generative ---------------------------------------------------------------------------------

class ScriptedSampler:
  """Replies by prompt: `script(prompt_text)` -> reply text, then <|assistant_end|>."""

  def __init__(self, tok, script, context=4096):
    self.tok, self.script, self.cfg, self.prompts = tok, script, SimpleNamespace(max_seq_len=context), []

  def generate(self, prompts, *, max_new_tokens, sampling, seed, rows, stop_ids, on_tokens):
    assert sampling.temperature == 0.0
    self.prompts += [list(p) for p in prompts]
    replies = [self.tok.encode(self.script(self.tok.decode(list(p)))) for p in prompts]
    return Generation([r[:max_new_tokens] for r in replies], ["stop_token"] * len(prompts))


def _fenced(code):
  return f"Here is the function:\n```python\n{code}```\nIt works."


def test_humaneval_runs_the_replies_code_with_the_tests_in_the_sandbox(tok, rows):
  problems = rows["humaneval"]
  solutions = {r["prompt"].strip()[:30]: r["prompt"] + r["canonical_solution"] for r in problems}

  def right(prompt):
    return _fenced(next(s for k, s in solutions.items() if k in prompt.replace("\r", "")))

  out = chat_suite.evaluate_chat(tok, {"humaneval": problems}, sampler=ScriptedSampler(tok, right))["humaneval"]
  assert out["accuracy"] == 1.0 and out["outcomes"]["passed"] == 3, out
  wrong = lambda prompt: right(prompt).replace("return", "return 1 + ")  # noqa: E731
  out = chat_suite.evaluate_chat(tok, {"humaneval": problems}, sampler=ScriptedSampler(tok, wrong))["humaneval"]
  assert out["accuracy"] == 0.0 and out["outcomes"]["passed"] == 0


def test_humaneval_program_and_code_extraction():
  row = _fixture("humaneval")[0]
  assert humaneval.prompt_imports(row["prompt"]) == "from typing import List"
  assert humaneval.prompt_imports("# header\nimport math\n\nimport re\ndef f(): pass\nimport os") == "import math\nimport re"
  assert humaneval.extract_code("text\n```python\ndef f():\n  return 1\n```\nmore\n```\nx\n```") == "def f():\n  return 1"
  assert humaneval.extract_code("```\ndef g(): pass\n```") == "def g(): pass"
  assert humaneval.extract_code("```Python\ndef h():\n  return 2") == "def h():\n  return 2"  # cut off, unclosed
  assert humaneval.extract_code("  def k(): pass\n") == "def k(): pass"  # no fence: the whole reply
  program = humaneval.program(row, _fenced(row["prompt"] + row["canonical_solution"]))
  assert program.startswith("from typing import List\n\nfrom typing import List\n\n\ndef total_length(")
  assert program.endswith("\ncheck(total_length)\n")


def test_spelling_items_follow_nanochats_draws_and_are_scored_by_the_count():
  words = spelling.load_words(FIXTURES)
  assert words[:3] == ["apple", "banana", "strawberry"] and len(words) == 12  # CRLF lines, as dwyl's file has
  items = spelling.make_rows(words, 40)
  assert items == spelling.make_rows(words, 40)  # deterministic
  for item in items:
    assert item["word"] in words and item["answer"] == str(item["word"].count(item["letter"]))
    assert item["word"] in item["question"] and item["letter"] in item["question"]
  assert sum(item["letter"] in item["word"] for item in items) >= 30  # 90% draw a letter of the word
  import random
  rng = random.Random(spelling.TEST_SEED_OFFSET + 7)  # nanochat's first draws for test item 7
  assert items[7]["word"] == rng.choice(words)
  assert spelling.reward("counting...\n#### 3", {"answer": "3"}) == 1.0
  assert spelling.reward("#### 2", {"answer": "3"}) == 0.0 and spelling.reward("3", {"answer": "3"}) == 0.0


def test_spelling_and_gsm8k_replies_are_scored_by_their_answer(tok, rows):
  subset = {"spelling": rows["spelling"][:6], "gsm8k": rows["gsm8k"]}
  answers = {r["question"]: r["answer"] for r in subset["spelling"]}
  answers.update({r["question"]: r["answer"].split("####")[1].strip() for r in subset["gsm8k"]})

  def reply(prompt, shift=0):
    answer = next(a for q, a in answers.items() if q in prompt)
    return f"Let me count.\n#### {int(answer) + shift}"

  right = chat_suite.evaluate_chat(tok, subset, sampler=ScriptedSampler(tok, reply))
  assert right["spelling"]["accuracy"] == 1.0 and right["gsm8k"]["accuracy"] == 1.0
  assert right["spelling"]["examples"][0]["correct"] is True
  wrong = chat_suite.evaluate_chat(tok, subset, sampler=ScriptedSampler(tok, lambda p: reply(p, 1)))
  assert wrong["spelling"]["accuracy"] == 0.0 and wrong["gsm8k"]["accuracy"] == 0.0


def test_a_prompt_that_does_not_fit_the_context_counts_as_wrong(tok, rows):
  sampler = ScriptedSampler(tok, lambda p: "#### 1", context=40)
  out = chat_suite.evaluate_chat(tok, {"humaneval": rows["humaneval"]}, sampler=sampler)["humaneval"]
  assert out["too_long"] == 3 and out["accuracy"] == 0.0 and sampler.prompts == []


# -- summary ------------------------------------------------------------------------------------

def test_chat_core_and_the_table():
  results = {n: {"accuracy": a, "items": 10, "correct": int(10 * a), "centered": 0.0}
             for n, a in zip(ALL, (0.25, 0.5, 1.0, 0.1, 0.0, 0.2))}
  for n in ALL:
    b = chat_suite.TASKS[n].baseline
    results[n]["centered"] = (results[n]["accuracy"] - b) / (1 - b)
  assert chat_suite.chat_core(results) == pytest.approx((0 + 1 / 3 + 1 + 0.1 + 0 + 0.2) / 6)
  assert chat_suite.chat_core({n: results[n] for n in ALL[:5]}) is None
  table = chat_suite.chat_table(results).splitlines()
  assert table[0].split() == ["task", "metric", "value", "items"]
  assert table[2].split()[:4] == ["arc_challenge", "accuracy", "0.5000", "10"] and "centered 0.3333" in table[2]
  assert table[-1].split() == ["ChatCORE", "centered", f"{chat_suite.chat_core(results):.4f}"]


@pytest.mark.slow(seconds=40)
def test_eval_chat_runs_every_task_and_writes_eval_json_and_the_card(chat_run, rows, capsys):
  """`lmtiny.eval --chat` on the tiny random model from the fixtures: the table (per-task wall
  time printed), eval.json's "chat" and "chatcore", and the report card's chat rows."""
  t0 = time.perf_counter()
  assert eval_cli.main(["--workdir", chat_run, "--chat", "--data-dir", FIXTURES, "--max-items", "4",
                        "--max-new-tokens", "16", "--batch", "8"]) == 0
  table = capsys.readouterr().out
  saved = json.load(open(os.path.join(chat_run, "eval.json")))
  out = saved["chat"]
  assert set(out) == set(ALL) and saved["chatcore"] == pytest.approx(chat_suite.chat_core(out))
  for name, r in out.items():
    assert 0.0 <= r["accuracy"] <= 1.0 and r["items"] == min(4, len(rows[name])) and r["seconds"] > 0
    assert name in table
  # every HumanEval reply that was generated went through the sandbox
  assert sum(out["humaneval"]["outcomes"].values()) + out["humaneval"]["too_long"] == 3
  card = open(os.path.join(chat_run, "report.md")).read()
  assert "| **ChatCORE** (6 tasks) | mean centered |" in card and "| humaneval | accuracy (3 items) |" in card
  with capsys.disabled():
    print(f"\n{table}" + " ".join(f"{n} {r['seconds']:.2f}s" for n, r in out.items())
          + f" | total {time.perf_counter() - t0:.1f}s")
