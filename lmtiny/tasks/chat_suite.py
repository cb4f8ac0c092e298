"""nanochat's chat evaluations (its scripts/chat_eval.py) on a chat model, as one suite.

  rows = load_chat_rows(chat_task_names("all", "--chat-tasks"), data_dir, limit)
  results = evaluate_chat_model(model, mesh, tokenizer, rows)     # {task: {"accuracy", "items", ...}}
  print(chat_table(results))

Tasks, in nanochat's order:
  arc_easy, arc_challenge, mmlu  multiple choice through the chat template: the question and its
                 options as the user's message ("- <option>=<letter>" lines, the letter right after
                 "=" so that it is the same token as the reply's letter, then an instruction to answer
                 with the letter: nanochat's layout, kept so that models trained on it read it as
                 they learned it); the prediction is the letter the model finds likeliest as the
                 first token of its reply (among this item's letters only). Batched through
                 lmtiny.tasks.scoring: one row per letter, the letter as the scored continuation.
  gsm8k          generative, calculator tool, `####` answer (lmtiny.tasks.gsm8k)
  humaneval      generative; the reply's code runs with the tests in a sandbox (lmtiny.tasks.humaneval)
  spelling       generative; count a letter in a word, `####` answer (lmtiny.tasks.spelling)
Replies are greedy (temperature 0) with the calculator tool, as nanochat's engine samples them.
A prompt that leaves no room for a reply in the model's context counts as wrong (`too_long`); a
multiple-choice prompt longer than the context loses tokens from its start (`truncated`).
ChatCORE (nanochat's summary) is the mean over all six tasks of accuracy centered by chance:
(acc - baseline) / (1 - baseline), baseline 0.25 for the multiple-choice tasks, 0 otherwise.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import numpy as np

from lmtiny.errors import UserError
from lmtiny.model.sampling import Sampler, SamplingParams
from lmtiny.tasks import gsm8k, humaneval, sandbox, spelling
from lmtiny.tasks.hf6 import centered, mean_centered
from lmtiny.tasks.rows import EvalDataError, load_rows, local_file
from lmtiny.tasks.scoring import fit_row, Scorer
from lmtiny.tokenizer import render_for_completion

_HF = "hf:{}?pattern={}&column={}"
GREEDY = SamplingParams(0.0, 50, 1.0)
MMLU_LETTERS = ("A", "B", "C", "D")


@dataclasses.dataclass(frozen=True)
class ChatTask:
  kind: str        # multiple_choice | generative
  baseline: float  # accuracy of guessing (ChatCORE centers by it)
  source: str      # public source (lmtiny.corpus.sources spec, or the spelling word list's address)


TASKS = {
    "arc_easy": ChatTask("multiple_choice", 0.25, _HF.format("allenai/ai2_arc", "ARC-Easy/test-*.parquet", "question")),
    "arc_challenge": ChatTask("multiple_choice", 0.25,
                              _HF.format("allenai/ai2_arc", "ARC-Challenge/test-*.parquet", "question")),
    "mmlu": ChatTask("multiple_choice", 0.25, _HF.format("cais/mmlu", "all/test-*.parquet", "question")),
    "gsm8k": ChatTask("generative", 0.0, gsm8k.SOURCE),
    "humaneval": ChatTask("generative", 0.0, humaneval.SOURCE),
    "spelling": ChatTask("generative", 0.0, spelling.WORD_LIST_URL),
}


@dataclasses.dataclass(frozen=True)
class Choice:
  """A multiple-choice item: the answer is one of `letters`."""
  question: str
  letters: tuple[str, ...]
  options: tuple[str, ...]
  answer: str


def chat_task_names(spec: str, flag: str) -> list[str]:
  """"all" (every task) or a comma list of TASKS names, in the order given, each once."""
  names = list(TASKS) if spec.strip() == "all" else [n.strip() for n in spec.split(",") if n.strip()]
  unknown = [n for n in names if n not in TASKS]
  if unknown or not names:
    raise UserError(f"{flag}={spec!r}: unknown chat task {', '.join(unknown) or '(none given)'} "
                    f"(expected all or a comma list of {', '.join(TASKS)})")
  return list(dict.fromkeys(names))


# -- rows --------------------------------------------------------------------------------------

def _arc(row) -> Choice:
  letters, texts = tuple(row["choices"]["label"]), tuple(row["choices"]["text"])
  if len(letters) != len(texts):
    raise ValueError(f"{len(letters)} labels for {len(texts)} texts")
  if row["answerKey"] not in letters:
    raise ValueError(f"answerKey {row['answerKey']!r} is not one of {letters}")
  return Choice(row["question"], letters, texts, row["answerKey"])


def _mmlu(row) -> Choice:
  if len(row["choices"]) != len(MMLU_LETTERS):
    raise ValueError(f"{len(row['choices'])} choices, expected {len(MMLU_LETTERS)}")
  answer = int(row["answer"])
  if not 0 <= answer < len(MMLU_LETTERS):  # -1 would index the last letter
    raise ValueError(f"answer {answer} is not the index of one of the {len(MMLU_LETTERS)} choices")
  return Choice(row["question"], MMLU_LETTERS, tuple(row["choices"]), MMLU_LETTERS[answer])


_CHOICE = {"arc_easy": _arc, "arc_challenge": _arc, "mmlu": _mmlu}


def choice_item(name: str, row: dict, index: int = 0, where: str | None = None) -> Choice:
  """Row `index` of a multiple-choice task in its source's layout, as a Choice; an error names
  `where` (the file or source; default: the task)."""
  try:
    return _CHOICE[name](row)
  except (KeyError, TypeError, ValueError, IndexError) as e:
    raise EvalDataError(f"{where or name}: row {index} is not in the source's layout "
                        f"({type(e).__name__}: {e})") from None


def _check_fields(where: str, rows: Sequence[dict], fields: Sequence[str]) -> None:
  for i, row in enumerate(rows):
    missing = [f for f in fields if not (isinstance(row, dict) and isinstance(row.get(f), str))]
    if missing:
      raise EvalDataError(f"{where}: row {i} has no text field {', '.join(missing)}")


def _rows_source(name: str, data_dir: str | None) -> str:
  """What an error about task `name`'s rows names: DATA_DIR's file, else the public source."""
  return (local_file(data_dir, name) if data_dir else None) or TASKS[name].source


def load_chat_rows(names: Sequence[str], data_dir: str | None = None, limit: int = 0,
                   flag: str = "--data-dir") -> dict[str, list[dict]]:
  """Up to `limit` rows (0 = all; spelling: nanochat's 256) per task, from DATA_DIR/<task>.jsonl|.parquet
  (spelling: DATA_DIR/words_alpha.txt) or the public sources; checked, so that bad data fails
  before a model is loaded. `flag` is what an error calls `data_dir`."""
  rows = {}
  for name in names:
    if name == "spelling":
      n = min(limit, spelling.TEST_ITEMS) if limit else spelling.TEST_ITEMS
      rows[name] = spelling.make_rows(spelling.load_words(data_dir, flag), n)
      continue
    rows[name] = load_rows(name, TASKS[name].source, data_dir, limit, flag=flag)
    where = _rows_source(name, data_dir)
    if name in _CHOICE:
      for i, row in enumerate(rows[name]):
        choice_item(name, row, i, where)
    elif name == "gsm8k":
      gsm8k.check_problems(rows[name], where)
    else:
      _check_fields(where, rows[name], humaneval.FIELDS)
  return rows


# -- multiple choice ---------------------------------------------------------------------------

def render_choice(item: Choice) -> str:
  """The user's message for a multiple-choice item."""
  options = "".join(f"- {option}={letter}\n" for letter, option in zip(item.letters, item.options))
  return f"Multiple Choice question: {item.question}\n{options}\nRespond only with the letter of the correct answer."


def letter_ids(tokenizer, letters: Sequence[str]) -> list[list[int]]:
  """The tokens of each letter as the reply's first tokens (nanochat's letters are one token each)."""
  out = [list(tokenizer.encode(letter)) for letter in letters]
  for letter, ids in zip(letters, out):
    if not ids:
      raise EvalDataError(f"option letter {letter!r} encodes to no tokens")
  return out


def predict_choices(scorer, tokenizer, items: Sequence[Choice]) -> tuple[list[int], int]:
  """(index of the predicted letter per item, items whose prompt was cut to fit the context). The
  likeliest letter has the largest logit at the reply's first position among the item's letters:
  the lowest loss of the letter as a continuation of the prompt (the first letter on a tie)."""
  rows, spans, truncated, known = [], [], 0, {}
  for item in items:
    prompt = render_for_completion(tokenizer, [{"role": "user", "content": render_choice(item)}])
    if item.letters not in known:  # a task has few letter sets: encode each once
      known[item.letters] = letter_ids(tokenizer, item.letters)
    start, options = len(rows), known[item.letters]
    truncated += any(len(prompt) + len(ids) > scorer.max_len + 1 for ids in options)
    rows += [fit_row(prompt + ids, len(ids), scorer.max_len) for ids in options]
    spans.append((start, len(rows)))
  scores = scorer.score(rows)
  picks = [int(np.argmin([scores[i].loss_sum for i in range(a, b)])) for a, b in spans]
  return picks, truncated


def _multiple_choice(name, scorer, tokenizer, rows) -> dict:
  items = [choice_item(name, row, i) for i, row in enumerate(rows)]
  picks, truncated = predict_choices(scorer, tokenizer, items)
  correct = [item.letters[p] == item.answer for item, p in zip(items, picks)]
  return {"correct": int(sum(correct)), "truncated": truncated}


# -- generative --------------------------------------------------------------------------------

def generate_replies(sampler, tokenizer, conversations: Sequence[list[dict]], *, max_new_tokens: int,
                     batch: int = 32, seed: int = 0) -> list[str | None]:
  """Greedy replies with the calculator tool; None where the prompt leaves no room for a reply."""
  prompts = [render_for_completion(tokenizer, c) for c in conversations]
  fits = [i for i, p in enumerate(prompts) if len(p) < sampler.cfg.max_seq_len - 1]
  replies: list[str | None] = [None] * len(prompts)
  for at in range(0, len(fits), batch):
    chunk = fits[at:at + batch]
    gens = gsm8k.generate_with_tools(sampler, tokenizer, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens,
                                     sampling=GREEDY, seed=seed, rows=chunk)
    for i, g in zip(chunk, gens):
      replies[i] = g.text
  return replies


def _conversation(name: str, row: dict) -> list[dict]:
  if name == "humaneval":
    return humaneval.messages(row)
  if name == "spelling":
    return spelling.messages(row)
  return [{"role": "user", "content": row["question"]}]


def _generative(name, sampler, tokenizer, rows, *, max_new_tokens, batch, seed, limits, workers) -> dict:
  replies = generate_replies(sampler, tokenizer, [_conversation(name, r) for r in rows],
                             max_new_tokens=max_new_tokens, batch=batch, seed=seed)
  answered = [i for i, reply in enumerate(replies) if reply is not None]
  out = {"too_long": len(rows) - len(answered)}
  correct = [False] * len(rows)
  if name == "humaneval":
    verdicts = humaneval.score([rows[i] for i in answered], [replies[i] for i in answered], limits, workers)
    for i, v in zip(answered, verdicts):
      correct[i] = v.passed
    out["outcomes"] = {s: sum(v.status == s for v in verdicts) for s in sandbox.STATUSES}
    out["network"] = verdicts[0].network if verdicts else ""
  else:
    score = spelling.reward if name == "spelling" else lambda reply, row: gsm8k.reward(reply, row["answer"])
    for i in answered:
      correct[i] = bool(score(replies[i], rows[i]))
  out["correct"] = int(sum(correct))
  out["examples"] = [{"prompt": _conversation(name, rows[i])[0]["content"][:500], "reply": replies[i][:500],
                      "correct": correct[i]} for i in answered[:2]]
  return out


# -- the suite ---------------------------------------------------------------------------------

def evaluate_chat(tokenizer, rows_by_task: dict[str, list[dict]], *, scorer=None, sampler=None,
                  max_new_tokens: int = 256, batch: int = 32, seed: int = 0,
                  limits: sandbox.Limits = sandbox.Limits(), workers: int = 2,
                  log: Callable[[str], None] | None = None) -> dict[str, dict]:
  """Per task: accuracy, items, correct, baseline, centered, seconds (and the task kind's counts).
  `scorer` (lmtiny.tasks.scoring.Scorer) serves the multiple-choice tasks, `sampler`
  (lmtiny.model.sampling.Sampler) the generative ones; `limits` and `workers` the HumanEval sandbox."""
  results = {}
  for name, rows in rows_by_task.items():
    task, t0 = TASKS[name], time.perf_counter()
    if task.kind == "multiple_choice":
      r = _multiple_choice(name, scorer, tokenizer, rows)
    else:
      r = _generative(name, sampler, tokenizer, rows, max_new_tokens=max_new_tokens, batch=batch, seed=seed,
                      limits=limits, workers=workers)
    accuracy = r["correct"] / max(len(rows), 1)
    results[name] = {"accuracy": accuracy, "items": len(rows), "baseline": task.baseline,
                     "centered": centered(accuracy, task.baseline), **r,
                     "seconds": time.perf_counter() - t0}
    if log:
      log(f"{name}: accuracy {accuracy:.4f} ({r['correct']}/{len(rows)}) in {results[name]['seconds']:.1f}s")
  return results


def evaluate_chat_model(model, mesh, tokenizer, rows_by_task: dict[str, list[dict]], *, batch: int = 32,
                        **kwargs) -> dict[str, dict]:
  """evaluate_chat with a Scorer and a Sampler of `model` (parameters placed on `mesh`)."""
  with jax.set_mesh(mesh):
    return evaluate_chat(tokenizer, rows_by_task, scorer=Scorer(model, mesh, rows_per_batch=batch),
                         sampler=Sampler(model), batch=batch, **kwargs)


def chat_core(results: dict[str, dict]) -> float | None:
  """nanochat's ChatCORE: the mean centered accuracy over all six tasks; None unless all were run."""
  if any(name not in results for name in TASKS):
    return None
  return mean_centered({n: results[n] for n in TASKS})


def chat_table(results: dict[str, dict]) -> str:
  """The suite's results as a table (lmtiny.eval's layout), ChatCORE last when every task ran."""
  lines = [f"{'task':<14} {'metric':<10} {'value':>8} {'items':>7}"]
  for name, r in results.items():
    notes = [f"centered {r['centered']:.4f}"] if TASKS[name].baseline else []
    if r.get("outcomes"):
      notes.append(" ".join(f"{s} {n}" for s, n in r["outcomes"].items() if n))
    for key in ("too_long", "truncated"):
      if r.get(key):
        notes.append(f"{key.replace('_', ' ')} {r[key]}")
    lines.append(f"{name:<14} {'accuracy':<10} {r['accuracy']:>8.4f} {r['items']:>7}"
                 + (f"  ({'; '.join(notes)})" if notes else ""))
  score = chat_core(results)
  if score is not None:
    lines.append(f"{'ChatCORE':<14} {'centered':<10} {score:>8.4f}")
  return "\n".join(lines)
