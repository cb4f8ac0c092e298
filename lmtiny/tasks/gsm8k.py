"""Generative GSM8K with the chat template and the calculator tool.

A GSM8K answer is worked text with calculator annotations `<<48/2=24>>` and a last line
`#### 72`. As a conversation the annotations become tool calls: the expression as a python
part (`<|python_start|>48/2<|python_end|>`, trained on) and the result as its output
(`<|output_start|>24<|output_end|>`, never trained on). The model's reply is scored by exact
match of the number after `####` (commas removed) against the reference.

Generation with the tool (`generate_with_tools`), as nanochat's engine does it: sample until
<|assistant_end|>; whenever the model closes a python block, the calculator evaluates it and
its result is forced into the sequence as an output block, then sampling continues. The same
function serves evaluation and RL (which needs, per token, whether the model sampled it).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from lmtiny.model.sampling import SamplingParams
from lmtiny.tasks import calculator
from lmtiny.tasks.rows import EvalDataError
from lmtiny.tokenizer import render_for_completion

_ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
_ANSWER = re.compile(r"####\s*(-?[0-9][0-9.,]*)")
SOURCE = "hf:openai/gsm8k?pattern=main/test-*.parquet&column=question"
TRAIN_SOURCE = "hf:openai/gsm8k?pattern=main/train-*.parquet&column=question"


def extract_answer(text: str) -> str | None:
  """The number after the first `####`, commas and a trailing period dropped; None if absent."""
  m = _ANSWER.search(text)
  return m.group(1).replace(",", "").rstrip(".") if m else None


def check_problems(rows: Sequence[dict], where: str) -> None:
  """Rows {"question": text, "answer": text with a `#### <number>` line}, else an EvalDataError
  naming `where` (the file) and the first bad row: a reference answer without `####` scores 0
  whatever the reply (RL would train at reward 0 throughout). Counts the rows that lack one."""
  for i, row in enumerate(rows):
    missing = [f for f in ("question", "answer") if not (isinstance(row, dict) and isinstance(row.get(f), str))]
    if missing:
      raise EvalDataError(f"{where}: row {i} has no text field {', '.join(missing)}")
  unanswered = [i for i, row in enumerate(rows) if extract_answer(row["answer"]) is None]
  if unanswered:
    raise EvalDataError(f"{where}: row {unanswered[0]}: the answer has no '#### <number>' line, so no reply could "
                        f"score ({len(unanswered)} of {len(rows)} rows lack one)")


def to_conversation(question: str, answer: str) -> list[dict]:
  """A GSM8K row as messages, calculator annotations turned into python tool parts."""
  parts, at = [], 0
  for m in _ANNOTATION.finditer(answer):
    if m.start() > at:
      parts.append({"type": "text", "text": answer[at:m.start()]})
    parts.append({"type": "python", "text": m.group(1)})
    parts.append({"type": "python_output", "text": m.group(2)})
    at = m.end()
  if at < len(answer):
    parts.append({"type": "text", "text": answer[at:]})
  return [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]


@dataclasses.dataclass
class ToolGeneration:
  ids: list[int]        # everything after the prompt: sampled tokens and forced tool outputs
  sampled: list[bool]   # per id: True if the model sampled it (False: forced calculator output)
  text: str             # the reply as text (special tokens render as "")


def _python_block(ids: Sequence[int], start_id: int) -> list[int]:
  at = len(ids) - 1 - ids[::-1].index(start_id) if start_id in ids else -1
  return list(ids[at + 1:]) if at >= 0 else []


def generate_with_tools(sampler, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                        sampling, seed: int = 0, rows: Sequence[int] | None = None) -> list[ToolGeneration]:
  """Samples a reply per prompt (ids ending with <|assistant_start|>), running the calculator on
  every python block the model closes. Rounds: rows that closed a block get its output appended
  and continue in the next round; the others are finished."""
  special = tokenizer.special_id
  py_start, py_end = special("python_start"), special("python_end")
  out_start, out_end, end = special("output_start"), special("output_end"), special("assistant_end")
  context = sampler.cfg.max_seq_len
  rows = list(range(len(prompts))) if rows is None else list(rows)
  results = [ToolGeneration([], [], "") for _ in prompts]
  active = list(range(len(prompts)))
  while active:
    budgets = {i: min(max_new_tokens - len(results[i].ids), context - 1 - len(prompts[i]) - len(results[i].ids))
               for i in active}
    active = [i for i in active if budgets[i] > 0]
    if not active:
      break
    cut = {}
    # Later rounds have fewer rows: pad to a power of two (stopped at once) so few shapes compile.
    padded = active + [active[0]] * (min(len(prompts), 1 << (len(active) - 1).bit_length()) - len(active))

    def on_tokens(row, new_ids, _cut=cut, _active=active):
      if row >= len(_active):
        return True
      i = _active[row]
      if i not in _cut and py_end in new_ids:
        _cut[i] = True
        return True
      return False

    gen = sampler.generate([list(prompts[i]) + results[i].ids for i in padded],
                           max_new_tokens=max(budgets[i] for i in active), sampling=sampling, seed=seed,
                           rows=[rows[i] for i in padded], stop_ids=(end,), on_tokens=on_tokens)
    next_active = []
    for row, i in enumerate(active):
      new = gen.tokens[row][:budgets[i]]
      if i in cut and py_end in new:
        new = new[:new.index(py_end) + 1]
      res = results[i]
      res.ids += new
      res.sampled += [True] * len(new)
      if gen.finish_reasons[row] == "stop_token":
        res.ids.append(end)  # the sampler leaves the stop token out; keep it (it is trained on)
        res.sampled.append(True)
        continue
      if new and new[-1] == py_end:
        value = calculator.evaluate(tokenizer.decode(_python_block(res.ids[:-1], py_start)))
        if value is not None:
          forced = [out_start] + tokenizer.encode(value) + [out_end]
          res.ids += forced
          res.sampled += [False] * len(forced)
        next_active.append(i)
    active = next_active
  for res in results:
    res.ids, res.sampled = res.ids[:max_new_tokens], res.sampled[:max_new_tokens]
    res.text = tokenizer.decode([t for t in res.ids if t != end])
  return results


def reward(reply: str, reference_answer: str) -> float:
  """1 if the reply's #### answer equals the reference's, else 0."""
  got, want = extract_answer(reply), extract_answer(reference_answer)
  return float(got is not None and got == want)


def evaluate(sampler, tokenizer, rows: Sequence[dict], *, max_new_tokens: int = 256, samples: int = 1,
             sampling=None, batch: int = 32, seed: int = 0) -> dict:
  """Exact-match accuracy (first sample) and pass@k over `samples` samples per question."""
  sampling = sampling or SamplingParams(0.0 if samples == 1 else 1.0, 50, 1.0)
  rewards = np.zeros((len(rows), samples))
  examples = []
  jobs = [(q, s) for q in range(len(rows)) for s in range(samples)]
  for at in range(0, len(jobs), batch):
    chunk = jobs[at:at + batch]
    prompts = [render_for_completion(tokenizer, [{"role": "user", "content": rows[q]["question"]}]) for q, _ in chunk]
    gens = generate_with_tools(sampler, tokenizer, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                               seed=seed, rows=[q * samples + s for q, s in chunk])
    for (q, s), g in zip(chunk, gens):
      rewards[q, s] = reward(g.text, rows[q]["answer"])
      if s == 0 and len(examples) < 3:
        examples.append({"question": rows[q]["question"], "reply": g.text, "correct": bool(rewards[q, s])})
  return {"accuracy": float(rewards[:, 0].mean()), f"pass@{samples}": float(rewards.max(axis=1).mean()),
          "items": len(rows), "examples": examples}
