"""CORE-style likelihood tasks: the scoring under DCLM CORE (lmtiny.tasks.dclm, the 22 tasks of
the DCLM eval bundle) and HF6, six of those tasks read from their Hugging Face sources (TASKS:
hellaswag, arc_easy, arc_challenge, piqa, winogrande, lambada). HF6's mean is not CORE.

Three kinds of item, each scored by the log-likelihood of continuations given a few-shot context:
  multiple_choice  one context, several continuations (HellaSwag, ARC, PIQA): the choice with the
                   lowest normalised loss wins; the scored part is what follows the options'
                   common token prefix
  schema           several contexts, one continuation (Winogrande): the context under which the
                   shared continuation is likeliest wins; the scored part is the common suffix
  language_model   one context, one continuation (LAMBADA): correct iff greedy decoding would
                   produce every continuation token; the scored part starts where the prompt's
                   tokens end (with `strip_prefix`, the prompt with its trailing whitespace
                   stripped, as nanochat renders DCLM's language-modelling tasks)
Normalisation (`NORMS`): "token" divides the continuation's loss by its token count (mean loss,
as nanochat and LLM Foundry do); "char" and "none" are lm-eval-harness's acc_norm and acc (0.4:
`ConfigurableTask.process_results`): the log-likelihood of the whole option, encoded as lm-eval
encodes a (context, delimiter + option) pair, over the option's own characters (len(option), the
delimiter not counted) for "char", as it is for "none". lm-eval's pair: the context's trailing
whitespace moves into the continuation; the context is tokenized alone and the continuation's
tokens are those of the whole text after as many tokens as the context has (`harness_pair`).
With a tokenizer that adds <|bos|> (lm-eval's add_bos_token=True) both score the same tokens.
Few-shot examples are drawn from the same task, never the item itself, with a generator seeded
per item (deterministic; lm-eval samples its own, so item-by-item agreement needs 0 shots).
Accuracy is centered by chance: (acc - chance) / (1 - chance); HF6 is the mean over its tasks.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Callable, Sequence

from lmtiny.tasks.rows import EvalDataError, load_rows
from lmtiny.tasks.scoring import fit_row, Row, Scorer


@dataclasses.dataclass(frozen=True)
class Item:
  """A normalised task item. multiple_choice: contexts=[query], choices; schema: contexts,
  choices=[continuation]; language_model: contexts=[context], choices=[continuation]."""
  contexts: tuple[str, ...]
  choices: tuple[str, ...]
  gold: int = 0


@dataclasses.dataclass(frozen=True)
class Task:
  kind: str                      # multiple_choice | schema | language_model
  shots: int
  chance: float                  # accuracy of guessing
  source: str                    # public source spec (lmtiny.corpus.sources)
  convert: Callable[[dict], Item]
  delimiter: str = " "
  strip_prefix: bool = False     # language_model: score from the end of the rstripped prompt


def _hellaswag(r):
  return Item((r["ctx"],), tuple(r["endings"]), int(r["label"]))


def _arc(r):
  labels = list(r["choices"]["label"])
  return Item((f"Question: {r['question']}\nAnswer:",), tuple(r["choices"]["text"]), labels.index(r["answerKey"]))


def _piqa(r):
  return Item((f"Question: {r['goal']}\nAnswer:",), (r["sol1"], r["sol2"]), int(r["label"]))


def _winogrande(r):
  cut = r["sentence"].index("_")
  before, after = r["sentence"][:cut], r["sentence"][cut + 1:].strip()
  return Item((before + r["option1"], before + r["option2"]), (after,), int(r["answer"]) - 1)


def _lambada(r):
  context, word = r["text"].rsplit(" ", 1)
  return Item((context,), (word,))


# "token": nanochat's mean loss per token; "char" and "none": lm-eval-harness's acc_norm and acc
NORMS = ("token", "char", "none")
HARNESS_NORMS = ("char", "none")

_HF = "hf:{}?pattern={}&column={}"
HF6 = "hf6"  # the six tasks below, by one name in --tasks / train.core_tasks
TASKS = {
    "hellaswag": Task("multiple_choice", 10, 0.25, _HF.format("Rowan/hellaswag", "data/validation-*.parquet", "ctx"),
                      _hellaswag),
    "arc_easy": Task("multiple_choice", 10, 0.25, _HF.format("allenai/ai2_arc", "ARC-Easy/test-*.parquet", "question"),
                     _arc),
    "arc_challenge": Task("multiple_choice", 10, 0.25,
                          _HF.format("allenai/ai2_arc", "ARC-Challenge/test-*.parquet", "question"), _arc),
    "piqa": Task("multiple_choice", 10, 0.5, _HF.format("baber/piqa", "*validation*.parquet", "goal"), _piqa),
    "winogrande": Task("schema", 0, 0.5, _HF.format("allenai/winogrande", "winogrande_xl/validation-*.parquet",
                                                    "sentence"), _winogrande),
    "lambada": Task("language_model", 0, 0.0, _HF.format("EleutherAI/lambada_openai", "en/test-*.parquet", "text"),
                    _lambada),
}


def convert_rows(name: str, task: Task, rows: Sequence[dict]) -> list[Item]:
  items = []
  for i, row in enumerate(rows):
    try:
      items.append(task.convert(row))
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
      raise EvalDataError(f"{name}: row {i} is not in the task's layout ({type(e).__name__}: {e})") from None
  return items


def task_names(spec: str, field: str, also: Sequence[str] = ()) -> list[str]:
  """"hf6" (its six tasks) or a comma list of TASKS' names (and of `also`) -> the names, in order,
  once each."""
  names = []
  for name in filter(None, (t.strip() for t in spec.split(","))):
    for n in list(TASKS) if name == HF6 else [name]:
      if n not in TASKS and n not in also:
        raise EvalDataError(f"{field}: unknown task {n!r} ({', '.join([*also, HF6, *TASKS])})")
      if n not in names:
        names.append(n)
  if not names:
    raise EvalDataError(f"{field}: no task given")
  return names


def load_items(name: str, data_dir: str | None, limit: int = 0, flag: str = "--data-dir") -> list[Item]:
  """Task `name`'s first `limit` items (0 = all), from DATA_DIR or the task's public source."""
  task = TASKS[name]
  return convert_rows(name, task, load_rows(name, task.source, data_dir, limit, flag))


def fewshot_indices(n: int, index: int, shots: int, seed: int = 1234) -> list[int]:
  """`shots` distinct indices of 0..n-1 other than `index`, the same every time."""
  shots = min(shots, n - 1)
  picks = random.Random(seed + index).sample(range(n - 1), shots)
  return [j + (j >= index) for j in picks]


def _common_prefix(seqs) -> int:
  n = min(len(s) for s in seqs)
  for i in range(n):
    if any(s[i] != seqs[0][i] for s in seqs):
      return i
  return n


def _common_suffix(seqs) -> int:
  return _common_prefix([s[::-1] for s in seqs])


def harness_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
  """lm-eval-harness's tokens for a (context, continuation) pair (`LM._encode_pair`, 0.4) with
  <|bos|> first: the context's trailing whitespace moves into the continuation, and the
  continuation is the whole text's tokens after as many as the context has alone. -> (ids, the
  continuation's token count)."""
  cut = len(context.rstrip())
  context, continuation = context[:cut], context[cut:] + continuation
  ctx = [tokenizer.bos_id] + tokenizer.encode(context)
  whole = [tokenizer.bos_id] + tokenizer.encode(context + continuation)
  return ctx + whole[len(ctx):], len(whole) - len(ctx)


def item_rows(task: Task, items: Sequence[Item], index: int, tokenizer, max_len: int,
              norm: str = "token") -> list[Row]:
  """The rows whose continuation losses decide item `index` (one per option)."""
  item, d = items[index], task.delimiter
  shots = [items[j] for j in fewshot_indices(len(items), index, task.shots)]
  if task.kind == "multiple_choice" and norm in HARNESS_NORMS:
    query = "".join(f"{s.contexts[0]}{d}{s.choices[s.gold]}\n\n" for s in shots) + item.contexts[0]
    pairs = [harness_pair(tokenizer, query, d + c) for c in item.choices]
    return [fit_row(ids, max(k, 1), max_len) for ids, k in pairs]
  if task.kind == "schema":
    prefix = "".join(f"{s.contexts[s.gold]}{d}{s.choices[0]}\n\n" for s in shots)
    texts = [prefix + c + d + item.choices[0] for c in item.contexts]
  else:
    prefix = "".join(f"{s.contexts[0]}{d}{s.choices[s.gold]}\n\n" for s in shots) + item.contexts[0] + d
    texts = [prefix + c for c in item.choices]
  seqs = [[tokenizer.bos_id] + tokenizer.encode(t) for t in texts]
  if task.kind == "schema":
    n_cont = [min(_common_suffix(seqs), min(map(len, seqs)) - 1)] * len(seqs)
  elif task.kind == "multiple_choice":
    start = min(_common_prefix(seqs), min(map(len, seqs)) - 1)
    n_cont = [len(s) - start for s in seqs]
  else:  # from the context's end: where its last token and the continuation's first do not merge
    context = [tokenizer.bos_id] + tokenizer.encode(prefix.rstrip() if task.strip_prefix else prefix)
    n_cont = [len(s) - min(_common_prefix([context, s]), len(s) - 1) for s in seqs]
  return [fit_row(s, max(k, 1), max_len) for s, k in zip(seqs, n_cont)]


def item_pick(task: Task, item: Item, scores, norm: str = "token") -> int:
  """The option (multiple_choice) or context (schema) with the lowest normalised loss; the first
  of equals, as lm-eval's argmax."""
  if norm == "char":  # acc_norm: divided by len(option) (a schema task's one continuation: all alike)
    lengths = [len(c) for c in item.choices] if task.kind == "multiple_choice" else [len(item.choices[0])] * len(scores)
    losses = [s.loss_sum / max(n, 1) for s, n in zip(scores, lengths)]
  elif norm == "none":
    losses = [s.loss_sum for s in scores]
  else:
    losses = [s.loss_sum / max(s.tokens, 1) for s in scores]
  return min(range(len(losses)), key=losses.__getitem__)


def item_correct(task: Task, item: Item, scores, norm: str = "token") -> bool:
  if task.kind == "language_model":
    return scores[0].greedy_match
  return item_pick(task, item, scores, norm) == item.gold


def score_items(scorer: Scorer, tokenizer, task: Task, items: Sequence[Item], norm: str = "token") -> list[list]:
  """Each item's RowScores, one per option (all the task's rows scored as one batched pass)."""
  if norm not in NORMS:
    raise ValueError(f"norm={norm!r}: must be one of {', '.join(NORMS)}")
  per_item = [item_rows(task, items, i, tokenizer, scorer.max_len, norm) for i in range(len(items))]
  scores = scorer.score([r for rows in per_item for r in rows])
  out, at = [], 0
  for rows in per_item:
    out.append(scores[at:at + len(rows)])
    at += len(rows)
  return out


def evaluate_task(scorer: Scorer, tokenizer, task: Task, items: Sequence[Item], norm: str = "token") -> dict:
  """Accuracy and chance-centered accuracy of one task under `norm`."""
  scores = score_items(scorer, tokenizer, task, items, norm)
  acc = sum(item_correct(task, item, s, norm) for item, s in zip(items, scores)) / len(items)
  return {"accuracy": acc, "centered": centered(acc, task.chance), "items": len(items),
          "shots": task.shots}


def centered(accuracy: float, chance: float) -> float:
  """Accuracy centered by the accuracy of guessing: 0 at chance, 1 when every item is right."""
  return (accuracy - chance) / (1 - chance)


def mean_centered(results: dict[str, dict]) -> float:
  return sum(r["centered"] for r in results.values()) / len(results)


def evaluate_hf6(scorer: Scorer, tokenizer, items: dict[str, Sequence[Item]], norm: str = "token") -> dict:
  """{"hf6": mean centered accuracy, "results": {task: evaluate_task's dict}} over `items` by task."""
  results = {name: evaluate_task(scorer, tokenizer, TASKS[name], task_items, norm)
             for name, task_items in items.items()}
  return {HF6: mean_centered(results), "results": results}
