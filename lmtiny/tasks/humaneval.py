"""HumanEval as nanochat's chat evaluation runs it: the problem's prompt (imports, signature and
docstring) is the user's message; the reply's code (the first fenced block, or the whole reply)
runs after the prompt's imports, and the problem's tests run `check(<entry_point>)` against it.
The reply must define the function itself, as a chat model writes it; a body alone defines nothing.

The tests and the reply do not share a process (lmtiny.tasks.sandbox.run_checked): the reply's
code runs in one sandboxed process (`solution`), the problem's prompt (its helpers, such as the
`poly` that HumanEval/32's tests call, from the dataset and not from the reply) and tests in
another (`checker`), where the entry point calls the reply's function with arguments and results
crossing as plain data. A problem passes iff the checker ran `check` to its end: a reply cannot
patch the tests, return an object that equals everything, or write the verdict. `program` is the
whole program nanochat runs, for reading.

Rows are openai_humaneval's: task_id, prompt, canonical_solution, test, entry_point.
"""
from __future__ import annotations

import re
from typing import Sequence

from lmtiny.tasks import sandbox

SOURCE = "hf:openai/openai_humaneval?pattern=openai_humaneval/test-*.parquet&column=prompt"
FIELDS = ("prompt", "test", "entry_point")
# an opening fence (optionally naming python), then everything up to the closing fence or the end
# of the reply (a reply cut at max_new_tokens leaves its block open)
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:\n[ \t]*```|\Z)", re.DOTALL | re.IGNORECASE)


def messages(row: dict) -> list[dict]:
  return [{"role": "user", "content": row["prompt"]}]


def extract_code(reply: str) -> str:
  """The first fenced code block of the reply, else the whole reply (stripped)."""
  match = _FENCE.search(reply)
  return (match.group(1) if match else reply).strip()


def prompt_imports(prompt: str) -> str:
  """The import lines at the top of a prompt (blank and comment lines skipped), up to its first other line."""
  lines = []
  for line in prompt.splitlines():
    text = line.strip()
    if text.startswith(("import ", "from ")):
      lines.append(text)
    elif text and not text.startswith("#"):
      break
  return "\n".join(lines)


def program(row: dict, reply: str) -> str:
  """The whole program nanochat runs for a reply to `row` (imports, reply, tests, check)."""
  return (f"{prompt_imports(row['prompt'])}\n\n{extract_code(reply)}\n\n"
          f"{row['test']}\ncheck({row['entry_point']})\n")


def solution(row: dict, reply: str) -> str:
  """What runs in the sandbox's program process: the prompt's imports and the reply's code."""
  return f"{prompt_imports(row['prompt'])}\n\n{extract_code(reply)}\n"


def checker(row: dict) -> str:
  """What runs in the checker process: the prompt (its imports and helpers; its stub of the entry
  point replaced by the reply's function), the tests and `check`. Only the dataset's text."""
  prompt = row["prompt"]
  try:
    compile(prompt, "prompt", "exec")
  except SyntaxError:
    prompt = prompt_imports(prompt)
  entry = row["entry_point"]
  return (f"{prompt}\n\n{entry} = getattr(__program__, {entry!r})\n\n{row['test']}\n"
          f"check({entry})\n")


def score(rows: Sequence[dict], replies: Sequence[str], limits: sandbox.Limits = sandbox.Limits(),
          workers: int = 2) -> list[sandbox.SandboxResult]:
  """The sandbox's verdict on each reply (the checker's: see the module's docstring)."""
  return sandbox.run_many([solution(r, reply) for r, reply in zip(rows, replies)], limits, workers,
                          checkers=[checker(r) for r in rows[:len(replies)]])
