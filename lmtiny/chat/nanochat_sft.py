"""nanochat's SFT mixture (its scripts/chat_sft.py at 92d63d4) as the conversation source `nanochat`.

  nanochat[?data_dir=DIR&mmlu_epochs=3&gsm8k_epochs=4]

Training: SmolTalk (HuggingFaceTB/smol-smoltalk, train), MMLU auxiliary_train x mmlu_epochs and
GSM8K main/train x gsm8k_epochs; held out (the validation loss): SmolTalk test, the first 5,200
rows of MMLU test and the first 420 of GSM8K test (after their shuffles). As nanochat does:
- each task's rows are shuffled by `np.random.default_rng(42).permutation` (a repeated task is the
  same permutation again);
- the mixture is every (task, row) pair, in task order, shuffled by `random.Random(42)`;
- an MMLU row becomes a multiple-choice prompt ("- <choice>=<letter>" lines, the answer's letter as
  the reply: `mmlu_conversation`); a GSM8K answer's `<<expr=result>>` annotations become python and
  python_output parts (split on `<<...>>`, the result after the last "=", "" if none:
  `gsm8k_conversation`); SmolTalk rows are their `messages`.
The rows come from DIR (files named as in LOCAL_NAMES, .jsonl or .parquet, the source's own
columns; `mmlu` and `gsm8k` are the chat suite's test files), or from nanochat's own download when
DIR is its base directory (DIR/task_data/<org--name>/<subset>/<split>/, NANOCHAT_CACHE), or,
without data_dir, from the hub.
lmtiny.chat.bestfit_pad turns the mixture into nanochat's rows.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from typing import Sequence

import numpy as np

from lmtiny.corpus.sources import ParquetSource, SourceError
from lmtiny.tasks import gsm8k
from lmtiny.tasks.chat_suite import MMLU_LETTERS, TASKS
from lmtiny.tasks.rows import EvalDataError, load_rows

SPEC = "nanochat"
SEED = 42            # nanochat's per-task permutation and mixture shuffle seed
MAX_TOKENS = 2048    # nanochat's render_conversation cut (its default max_tokens)
VAL_STOPS = {"mmlu": 5200, "gsm8k": 420}  # held-out rows kept (nanochat: to match the train ratios)
_HF = "hf:{}?pattern={}&column={}"
# local file name -> public source
SOURCES = {
    "smoltalk_train": _HF.format("HuggingFaceTB/smol-smoltalk", "data/train-*.parquet", "messages"),
    "smoltalk_test": _HF.format("HuggingFaceTB/smol-smoltalk", "data/test-*.parquet", "messages"),
    "mmlu_auxiliary_train": _HF.format("cais/mmlu", "all/auxiliary_train-*.parquet", "question"),
    "mmlu": TASKS["mmlu"].source,
    "gsm8k_train": gsm8k.TRAIN_SOURCE,
    "gsm8k": gsm8k.SOURCE,
}
LOCAL_NAMES = tuple(SOURCES)
# local file name -> (repository slug, subset, split) in nanochat's task cache:
# <base>/task_data/<slug>/<subset>/<split>/ with its shards listed in manifest.json
NANOCHAT_CACHE = {
    "smoltalk_train": ("HuggingFaceTB--smol-smoltalk", "default", "train"),
    "smoltalk_test": ("HuggingFaceTB--smol-smoltalk", "default", "test"),
    "mmlu_auxiliary_train": ("cais--mmlu", "all", "auxiliary_train"),
    "mmlu": ("cais--mmlu", "all", "test"),
    "gsm8k_train": ("openai--gsm8k", "main", "train"),
    "gsm8k": ("openai--gsm8k", "main", "test"),
}
_OPTIONS = ("data_dir", "mmlu_epochs", "gsm8k_epochs")
_ANNOTATION_SPLIT = re.compile(r"(<<[^>]+>>)")


def is_nanochat(spec: str) -> bool:
  return spec.partition("?")[0] == SPEC


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
  """nanochat's multiple-choice prompt: the letter right after "=", so that it is the reply's token."""
  lines = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
  return f"Multiple Choice question: {question}\n{lines}\nRespond only with the letter of the correct answer."


def mmlu_conversation(row: dict) -> list[dict]:
  """An MMLU row (question, choices, answer index) as a user prompt and the answer's letter."""
  if isinstance(row.get("train"), dict):  # some exports nest auxiliary_train rows under "train"
    row = row["train"]
  choices, answer = list(row["choices"]), int(row["answer"])
  if len(choices) != len(MMLU_LETTERS) or not 0 <= answer < len(MMLU_LETTERS):
    raise ValueError(f"{len(choices)} choices and answer {answer}: expected 4 choices and an answer in 0..3")
  return [{"role": "user", "content": render_mc(row["question"], MMLU_LETTERS, choices)},
          {"role": "assistant", "content": MMLU_LETTERS[answer]}]


def gsm8k_conversation(row: dict) -> list[dict]:
  """A GSM8K row with its calculator annotations as tool parts (nanochat's split, empty text parts kept)."""
  parts = []
  for piece in _ANNOTATION_SPLIT.split(row["answer"]):
    if piece.startswith("<<") and piece.endswith(">>"):
      inner = piece[2:-2]
      expr, _, result = inner.rpartition("=") if "=" in inner else (inner, "", "")
      parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
    else:
      parts.append({"type": "text", "text": piece})
  return [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": parts}]


def smoltalk_conversation(row: dict) -> list[dict]:
  return row["messages"]


_CONVERT = {"smoltalk": smoltalk_conversation, "mmlu": mmlu_conversation, "gsm8k": gsm8k_conversation}


@dataclasses.dataclass
class Task:
  """One task's rows, read in the order of its shuffle (`order[i]` is the row of example i)."""
  name: str        # the local file name (LOCAL_NAMES)
  rows: list
  order: np.ndarray
  where: str       # what an error names

  @classmethod
  def load(cls, name: str, data_dir: str | None, stop: int = 0) -> Task:
    if data_dir and os.path.isdir(os.path.join(os.path.expanduser(data_dir), "task_data")):
      rows = nanochat_cache_rows(os.path.expanduser(data_dir), name)
    else:
      hint = f"add ?data_dir=DIR to the {SPEC} source, DIR holding {name}.jsonl or {name}.parquet (or nanochat's download)"
      rows = load_rows(name, SOURCES[name], data_dir, flag=f"{SPEC}?data_dir", hint=hint)
    order = np.random.default_rng(SEED).permutation(len(rows))
    if stop:
      order = order[:stop]
    return cls(name, rows, order, f"{data_dir}/{name}" if data_dir else SOURCES[name])

  def __len__(self) -> int:
    return len(self.order)

  def conversation(self, i: int) -> list[dict]:
    row_index = int(self.order[i])
    try:
      return _CONVERT[self.name.partition("_")[0]](self.rows[row_index])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
      raise EvalDataError(f"{self.where}: row {row_index} is not in the source's layout "
                          f"({type(e).__name__}: {e})") from None


class Mixture(Sequence):
  """nanochat's TaskMixture: conversation i is (task, example) pair i of the shuffled pairs."""

  def __init__(self, tasks: Sequence[Task]):
    self.tasks = list(tasks)
    pairs = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
    random.Random(SEED).shuffle(pairs)
    self.index = np.asarray(pairs, np.int64).reshape(-1, 2)

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, i: int) -> list[dict]:
    task, example = self.index[i]
    return self.tasks[task].conversation(int(example))

  def counts(self) -> dict[str, int]:
    out: dict[str, int] = {}
    for task in self.tasks:
      out[task.name] = out.get(task.name, 0) + len(task)
    return out


def nanochat_cache_rows(base: str, name: str) -> list[dict]:
  """Task `name`'s rows from nanochat's download under `base`, its shards in manifest order."""
  directory = os.path.join(base, "task_data", *NANOCHAT_CACHE[name])
  manifest = os.path.join(directory, "manifest.json")
  try:
    with open(manifest) as f:
      shards = json.load(f)
  except (OSError, ValueError) as e:
    raise EvalDataError(f"{manifest}: cannot read nanochat's shard list ({type(e).__name__})") from None
  rows = []
  for shard in shards:
    path = os.path.join(directory, shard)
    try:
      rows.extend(ParquetSource(name, None, "", files=[path]).iter_rows())
    except (OSError, ValueError) as e:  # missing, or not parquet (pyarrow's ArrowInvalid is a ValueError)
      raise EvalDataError(f"{path}: cannot read ({type(e).__name__})") from None
  if not rows:
    raise EvalDataError(f"{directory}: no rows")
  return rows


def parse_options(spec: str) -> dict:
  """The options of a `nanochat?...` spec, checked (a SourceError names the spec)."""
  _, _, query = spec.partition("?")
  options = dict(kv.partition("=")[::2] for kv in query.split("&") if kv)
  unknown = [k for k in options if k not in _OPTIONS]
  if unknown:
    raise SourceError(f"{spec}: unknown option {', '.join(unknown)} (options: {', '.join(_OPTIONS)})")
  out = {"data_dir": options.get("data_dir") or None}
  for name, default in (("mmlu_epochs", "3"), ("gsm8k_epochs", "4")):
    value = options.get(name, default)
    if not value.isdigit():
      raise SourceError(f"{spec}: {name} must be an integer >= 0, not {value!r}")
    out[name] = int(value)
  return out


def load_mixtures(spec: str) -> tuple[Mixture, Mixture]:
  """(training mixture, held-out mixture) of a `nanochat` spec."""
  o = parse_options(spec)
  d = o["data_dir"]
  smoltalk, mmlu, gsm = (Task.load(n, d) for n in ("smoltalk_train", "mmlu_auxiliary_train", "gsm8k_train"))
  train = Mixture([smoltalk] + [mmlu] * o["mmlu_epochs"] + [gsm] * o["gsm8k_epochs"])
  val = Mixture([Task.load("smoltalk_test", d), Task.load("mmlu", d, VAL_STOPS["mmlu"]),
                 Task.load("gsm8k", d, VAL_STOPS["gsm8k"])])
  return train, val
