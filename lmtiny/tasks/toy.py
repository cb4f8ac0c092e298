"""A GSM8K-shaped arithmetic set the project generates itself (no download): word problems with
one calculator annotation and a `#### N` answer, for offline RL, the speedrun's toy preset, and
as conversations for SFT (the `toy_arithmetic` source of lmtiny.chat.conversations)."""
from __future__ import annotations

import random
from lmtiny.tasks.gsm8k import to_conversation

_TEMPLATES = (
    ("{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?",
     "{name} has {a} + {b} = <<{a}+{b}={r}>>{r} {thing}.", lambda a, b: a + b),
    ("{name} had {a} {thing} and gave away {b}. How many {thing} are left?",
     "{name} has {a} - {b} = <<{a}-{b}={r}>>{r} {thing} left.", lambda a, b: a - b),
    ("{name} buys {a} bags with {b} {thing} in each. How many {thing} is that?",
     "That is {a} * {b} = <<{a}*{b}={r}>>{r} {thing}.", lambda a, b: a * b),
)
_NAMES = ("Ann", "Bob", "Cai", "Dee", "Eli", "Fay")
_THINGS = ("apples", "books", "coins", "pens", "cards")


def is_held_out_problem(a: int, b: int) -> bool:
  """Operand pairs (10 of the 81) that no training set holds (SFT's toy_arithmetic, RL's
  problems): held-out problems ask for sums the model never saw, not a memorised question."""
  return (3 * a + b) % 8 == 0


def toy_rows(n: int, seed: int = 0, max_operand: int = 9, held_out: bool = False) -> list[dict]:
  """`n` rows {"question", "answer"} in GSM8K's layout, over the training operand pairs or (with
  `held_out`) the held-out ones; subtraction never goes below zero."""
  if not any(is_held_out_problem(a, b) for a in range(1, max_operand + 1) for b in range(1, max_operand + 1)):
    raise ValueError(f"max_operand={max_operand}: no held-out operand pair")
  rng = random.Random(seed)
  rows = []
  while len(rows) < n:
    question, answer, op = rng.choice(_TEMPLATES)
    a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
    if op(a, b) < 0:
      a, b = b, a
    if is_held_out_problem(a, b) != held_out:
      continue
    fields = dict(name=rng.choice(_NAMES), thing=rng.choice(_THINGS), a=a, b=b, r=op(a, b))
    rows.append({"question": question.format(**fields), "answer": answer.format(**fields) + f"\n#### {op(a, b)}"})
  return rows


def toy_texts(n: int = 2000, seed: int = 0) -> list[str]:
  """Plain text of toy problems (for a tokenizer that must know their words and digits)."""
  return [f"{r['question']}\n{r['answer']}" for r in toy_rows(n, seed)]


def toy_conversations(n: int, seed: int = 0) -> list[list[dict]]:
  """Toy problems as chats: the annotation a python tool call, its result the tool's output."""
  return [to_conversation(**row) for row in toy_rows(n, seed)]
