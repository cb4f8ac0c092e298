"""Does the model end its replies? The share of sampled replies to held-out questions that end
with <|assistant_end|> within a token budget (the embedded set's held-out functions).
`save_turn_ending` keeps a fine-tuning run's before/after figures in RUN/<stage>/turn_ending.json,
where the report card (lmtiny.report) reads them."""
from __future__ import annotations

import dataclasses
import os

from lmtiny.chat.conversations import embedded_conversations
from lmtiny.fs.atomic import atomic_write_json
from lmtiny.model.sampling import Sampler, SamplingParams
from lmtiny.runs.card import TURN_ENDING_FILE
from lmtiny.tokenizer import render_for_completion



@dataclasses.dataclass
class FormatReport:
  ended: int
  total: int
  example: tuple[str, str]   # (question, reply) of the first held-out question

  @property
  def share(self) -> float:
    return self.ended / max(self.total, 1)

  def __str__(self) -> str:
    return f"{self.ended}/{self.total} ({100 * self.share:.1f}%)"


def held_out_questions() -> list[str]:
  return [c[0]["content"] for c in embedded_conversations("val")]


def assistant_end_report(model, tokenizer, questions: list[str], *, max_new_tokens: int = 64,
                         temperature: float = 0.8, top_k: int = 50, seed: int = 0) -> FormatReport:
  """Samples one reply per question (as one batch) and counts those that end with <|assistant_end|>."""
  prompts = [render_for_completion(tokenizer, [{"role": "user", "content": q}]) for q in questions]
  out = Sampler(model).generate(prompts, max_new_tokens=max_new_tokens, seed=seed,
                                sampling=SamplingParams(temperature, top_k, 1.0),
                                stop_ids=(tokenizer.special_id("assistant_end"),))
  ended = sum(reason == "stop_token" for reason in out.finish_reasons)
  return FormatReport(ended, len(questions), (questions[0], tokenizer.decode(out.tokens[0])))


def save_turn_ending(workdir: str, before: FormatReport, after: FormatReport, max_new_tokens: int = 64) -> str:
  """WORKDIR/turn_ending.json: the share of replies that ended before (the init model) and after
  fine-tuning, {"max_new_tokens": N, "before": {"ended": a, "total": n}, "after": {...}}."""
  path = os.path.join(workdir, TURN_ENDING_FILE)
  atomic_write_json(path, {"max_new_tokens": max_new_tokens,
                           "before": {"ended": before.ended, "total": before.total},
                           "after": {"ended": after.ended, "total": after.total}})
  return path
