"""Conversation sources: files of `messages` rows, the embedded question set, and mixtures.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": ...}`
(SmolTalk's layout; see lmtiny.tokenizer.chat for the rendering). Sources, by spec:

  embedded_chat[?split=val]   questions about standard-library functions and classes answered
                              from their docstrings (built from this Python installation, no
                              download); a fixed 5% of the functions are held out (split=val)
  pretrain                    the base run's own pretraining documents (midtraining keeps some)
  toy_arithmetic[?n=2000&seed=0]
                              the toy GSM8K-shaped arithmetic problems (lmtiny.tasks.toy), answers
                              with calculator tool calls as GSM8K SFT has them (no download)
  path.jsonl | jsonl:<glob>   JSON lines with a `messages` field (option `?field=...`)
  path.parquet | parquet:<glob>, hf:<repo>?pattern=...
                              parquet with a `messages` column (lmtiny.corpus.sources readers)

A mixture is "spec:weight,spec:weight,..." (a spec without a weight counts 1.0); every source
may end in `?limit=N` (first N conversations).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import re
import sys
import zlib
from typing import Iterator

from lmtiny.corpus import embedded
from lmtiny.corpus.embedded import read_python_source, stdlib_dir
from lmtiny.corpus.sources import _expand_glob, jsonl_records, open_source, SourceError
from lmtiny.data import dataset
from lmtiny.data.mixture import parse_weighted
from lmtiny.fs.atomic import atomic_write_json
from lmtiny.tasks.toy import toy_conversations

HELD_OUT_MODULUS = 20  # one function in 20 is held out of the embedded set (by name hash)
_ROLES = ("system", "user", "assistant")


def parse_mixture(text: str) -> list[tuple[str, float]]:
  """"a:1.0,b:0.2" -> [("a", 1.0), ("b", 0.2)]; raises SourceError naming config.sft.sources."""
  return parse_weighted(text, "config.sft.sources", SourceError)


def split_limit(spec: str) -> tuple[str, int]:
  """Removes a `limit=N` option from a spec."""
  match = re.search(r"([?&])limit=(\d+)(&|$)", spec)
  if not match:
    return spec, 0
  rest = spec[:match.start()] + (match.group(1) if match.group(3) else "") + spec[match.end():]
  return rest.rstrip("?&"), int(match.group(2))


def check_messages(messages, where: str) -> list[dict]:
  if not isinstance(messages, list) or not messages:
    raise SourceError(f"{where}: messages must be a non-empty list")
  for m in messages:
    if not isinstance(m, dict) or m.get("role") not in _ROLES or "content" not in m:
      raise SourceError(f"{where}: each message needs a role ({', '.join(_ROLES)}) and content")
  return messages


def _jsonl_conversations(spec: str, pattern: str, field: str) -> Iterator[list[dict]]:
  for path in _expand_glob(spec, pattern):
    for where, record in jsonl_records(path, field):
      yield check_messages(record[field], where)


def iter_conversations(spec: str) -> Iterator[list[dict]]:
  """The conversations of one source spec (not `pretrain`, which holds documents)."""
  body, _, query = spec.partition("?")
  options = dict(kv.partition("=")[::2] for kv in query.split("&") if kv)
  if body == "embedded_chat":
    split = options.get("split", "train")
    if split not in ("train", "val"):
      raise SourceError(f"{spec}: split must be train or val")
    yield from embedded_conversations(split)
    return
  if body == "toy_arithmetic":
    n, seed = options.get("n", "2000"), options.get("seed", "0")
    if not (n.isdigit() and int(n) > 0 and seed.isdigit()):
      raise SourceError(f"{spec}: n must be an integer >= 1 and seed an integer >= 0")
    yield from toy_conversations(int(n), int(seed))
    return
  if body.endswith((".jsonl", ".jsonl.gz")) and ":" not in body:
    spec, body = "jsonl:" + spec, "jsonl:" + body
  elif body.endswith(".parquet") and ":" not in body:
    spec, body = "parquet:" + spec, "parquet:" + body
  kind, _, location = body.partition(":")
  if kind == "jsonl":
    field = options.get("field", "messages")
    yield from _jsonl_conversations(spec, location, field)
  elif kind in ("parquet", "hf"):
    if "column=" not in query:
      spec += ("&" if query else "?") + "column=messages"
    for where, messages in open_source(spec).iter_values():
      yield check_messages(messages, where)
  else:
    raise SourceError(f"{spec}: not a conversation source (embedded_chat, toy_arithmetic, pretrain, a "
                      ".jsonl or .parquet path, jsonl:, parquet: or hf:)")


# ---------------------------------------------------------------------------------------------
# The embedded set: questions about the standard library, answered from its docstrings.

_GREETINGS = [
    ("Hello!", "Hello! Ask me about a function or class of the Python standard library."),
    ("Hi", "Hi! Which standard-library function would you like to know about?"),
    ("Who are you?", "I am a tiny language model trained by lmtiny on the Python standard library."),
    ("What can you do?", "I can tell you what Python standard-library functions and classes do."),
    ("Thanks!", "You are welcome."),
]


def _module_name(relpath: str) -> str:
  name = relpath[:-3].replace(os.sep, ".")
  return name[:-len(".__init__")] if name.endswith(".__init__") else name


def summary(doc: str, max_chars: int = 160) -> str:
  """The docstring's first paragraph on one line, cut after a sentence or a word near max_chars."""
  text = " ".join(doc.strip().split("\n\n")[0].split())
  if len(text) <= max_chars:
    return text
  cut = text.rfind(". ", 0, max_chars)
  if cut > 40:
    return text[:cut + 1]
  return text[:text.rfind(" ", 0, max_chars)].rstrip(",;:") + " ..."


@functools.lru_cache(maxsize=1)
def stdlib_entries() -> list[dict]:
  """Public top-level functions and classes with docstrings, in sorted file order. Parsing the
  ~550 files takes 2.5 s, so the entries are kept in lmtiny's cache directory, keyed by the
  files (path, size, mtime), the Python version and this module's own source."""
  files = embedded.stdlib_source_files()  # read at call time: tests narrow it
  stats = [(f, st.st_size, st.st_mtime_ns) for f, st in ((f, os.stat(f)) for f in files)]
  with open(__file__, "rb") as code:
    key = hashlib.sha256(repr((sys.version, stats)).encode() + code.read()).hexdigest()[:16]
  cached = os.path.join(os.path.expanduser(dataset.DEFAULT_CACHE_DIR), f"stdlib-entries-{key}.json")
  try:
    with open(cached) as f:
      return json.load(f)
  except (OSError, ValueError):
    pass
  entries = _parse_stdlib_entries(files)
  try:
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    atomic_write_json(cached, entries)
  except OSError:  # a read-only home: parse again next time
    pass
  return entries


def _parse_stdlib_entries(files: list[str]) -> list[dict]:
  root, entries = stdlib_dir(), []
  for path in files:
    module = _module_name(os.path.relpath(path, root))
    if any(part.startswith("_") for part in module.split(".")):
      continue
    try:
      tree = ast.parse(read_python_source(path))
    except (SyntaxError, ValueError):
      continue
    for node in tree.body:
      if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
        continue
      doc = ast.get_docstring(node, clean=True)
      if not doc or len(doc.split()) < 3:
        continue
      args = ""
      if isinstance(node, ast.FunctionDef):
        args = ", ".join(a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs)
      entries.append(dict(module=module, name=node.name, kind="class" if isinstance(node, ast.ClassDef)
                          else "function", args=args, summary=summary(doc)))
  return entries


def _exchange(entry: dict, variant: int) -> tuple[str, str]:
  qual, text = f"{entry['module']}.{entry['name']}", entry["summary"]
  if entry["kind"] == "class":
    questions = (f"What is {qual}?", f"What is the {entry['name']} class in {entry['module']} for?",
                 f"Explain the class {qual}.")
    return questions[variant % 3], f"{qual} is a class. {text}"
  call = f"{qual}({entry['args']})"
  if variant % 4 == 3:
    return f"How do I call {qual}?", f"Call {call}. {text}"
  questions = (f"What does {qual}() do?", f"What is {entry['name']} in the {entry['module']} module for?",
               f"Explain {qual}.")
  return questions[variant % 4], f"{call}: {text}"


def embedded_conversations(split: str = "train") -> list[list[dict]]:
  """Deterministic conversations for this Python installation; `val` holds the held-out
  functions' single questions (the ones lmtiny.chat.turn_ending asks)."""
  conversations = []
  if split == "train":
    conversations += [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                      for q, a in _GREETINGS]
  previous = None
  for entry in stdlib_entries():
    key = zlib.crc32(f"{entry['module']}.{entry['name']}".encode())
    if (key % HELD_OUT_MODULUS == 0) != (split == "val"):
      continue
    question, answer = _exchange(entry, key // HELD_OUT_MODULUS)
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if split == "train" and previous is not None and key % 3 == 0:  # some two-exchange chats
      turns = previous + turns
    conversations.append(turns)
    previous = turns[-2:]
  return conversations
