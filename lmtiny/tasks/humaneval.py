"""HumanEval as nanochat's chat evaluation runs it: the problem's prompt (imports, signature and
docstring) is the user's message; the reply's code (the first fenced block, or the whole reply)
runs after the prompt's imports, followed by the problem's tests and `check(<entry_point>)`, in
the sandbox (lmtiny.tasks.sandbox). A problem passes iff that program runs to its end. The reply
must define the function itself, as a chat model writes it; a body alone defines nothing.

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
  """What runs in the sandbox for a reply to `row`."""
  return (f"{prompt_imports(row['prompt'])}\n\n{extract_code(reply)}\n\n"
          f"{row['test']}\ncheck({row['entry_point']})\n")


def score(rows: Sequence[dict], replies: Sequence[str], limits: sandbox.Limits = sandbox.Limits(),
          workers: int = 2) -> list[sandbox.SandboxResult]:
  """The sandbox's verdict on each reply."""
  return sandbox.run_many([program(r, reply) for r, reply in zip(rows, replies)], limits, workers)
