"""The embedded default corpus: real text every Python installation carries.

Three streams, interleaved round-robin so that any prefix mixes prose and code:
  1. the documentation topics of `pydoc_data.topics` (the language reference, in English),
  2. the module docstrings of the standard library, read from source with `ast.get_docstring`
     on each file's first statement (modules are never imported: importing runs code with side
     effects),
  3. the standard library's own `.py` files.
Files are visited in sorted path order, so the corpus is deterministic for a given installation;
`embedded_fingerprint` keys caches by a cheap summary of it (Python version, file sizes).
Test suites, third-party packages, codec tables and the generated topics module are left out.
"""
from __future__ import annotations

import ast
import hashlib
import io
import itertools
import os
import sys
import sysconfig
import tokenize
from typing import Iterator

PARTS = ("topics", "docstrings", "code")
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                            "__pycache__", "encodings", "pydoc_data"})


def stdlib_dir() -> str:
  return sysconfig.get_paths()["stdlib"]


def stdlib_source_files() -> list[str]:
  """Sorted absolute paths of the standard library's .py files (tests and packages excluded)."""
  root = stdlib_dir()
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
    found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
  return sorted(found, key=lambda p: os.path.relpath(p, root))


def read_python_source(path: str) -> str:
  """A .py file's text, decoded by its PEP 263 coding cookie (UTF-8 by default)."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
  except SyntaxError:
    encoding = "utf-8"
  return data.decode(encoding, errors="replace")


def module_docstring(source: str) -> str | None:
  """`ast.get_docstring(..., clean=True)` of the module's first statement, parsed alone: parsing
  whole modules to read their first string took 5 of the 13 s that building the embedded corpus
  took on one core. A first statement this Python cannot parse has no docstring for us."""
  lines = io.StringIO(source).readlines()  # split as tokenize splits them (at "\n" only)
  try:
    first = next(t for t in tokenize.generate_tokens(iter(lines).__next__)
                 if t.type in (tokenize.NEWLINE, tokenize.ENDMARKER))
    return ast.get_docstring(ast.parse("".join(lines[:first.end[0]])), clean=True)
  except (SyntaxError, ValueError, tokenize.TokenError):
    return None


def topic_documents() -> Iterator[str]:
  """The pydoc topics (English reference prose), sorted by topic name."""
  from pydoc_data.topics import topics  # a data-only module: a dict of str
  for key in sorted(topics):
    yield topics[key]


def docstring_documents(files: list[str]) -> Iterator[str]:
  """Non-empty module docstrings of `files`, in order."""
  for path in files:
    doc = module_docstring(read_python_source(path))
    if doc:
      yield doc


def source_documents(files: list[str]) -> Iterator[str]:
  """The text of each of `files`, in order."""
  for path in files:
    yield read_python_source(path)


def iter_embedded_documents(max_chars: int = 0,
                            parts: tuple[str, ...] = PARTS) -> Iterator[str]:
  """Yields the corpus's documents in a fixed order; stops after `max_chars` characters (0: all).

  `parts` picks streams among "topics", "docstrings" and "code". The document that crosses
  `max_chars` is cut so that exactly `max_chars` characters come out.
  """
  files = stdlib_source_files()
  makers = dict(topics=topic_documents, docstrings=lambda: docstring_documents(files),
                code=lambda: source_documents(files))
  streams = [makers[p]() for p in PARTS if p in parts]
  total = 0
  for doc in _round_robin(streams):
    if not doc:
      continue
    if max_chars and total + len(doc) >= max_chars:
      yield doc[:max_chars - total]
      return
    total += len(doc)
    yield doc


def _round_robin(streams: list[Iterator[str]]) -> Iterator[str]:
  sentinel = object()
  for items in itertools.zip_longest(*streams, fillvalue=sentinel):
    for item in items:
      if item is not sentinel:
        yield item


def embedded_fingerprint(max_chars: int = 0) -> str:
  """A short content key for the corpus: Python version, topic sizes, each file's path and size."""
  from pydoc_data.topics import topics
  h = hashlib.sha256()
  h.update(f"{sys.version}|{max_chars}|".encode())
  h.update(",".join(f"{k}:{len(v)}" for k, v in sorted(topics.items())).encode())
  root = stdlib_dir()
  for path in stdlib_source_files():
    h.update(f"|{os.path.relpath(path, root)}:{os.path.getsize(path)}".encode())
  return h.hexdigest()[:16]


def embedded_sample_texts(max_chars_each: int = 1_000_000) -> dict[str, str]:
  """Evaluation texts from the corpus: English prose (the topics), docstrings, and code taken
  from every 4th standard-library file, each joined by blank lines and cut at max_chars_each."""
  files = stdlib_source_files()
  streams = dict(english=topic_documents(), docstrings=docstring_documents(files),
                 code=source_documents(files[::4]))
  return {name: join_documents(docs, max_chars_each) for name, docs in streams.items()}


def join_documents(docs, max_chars: int) -> str:
  """The first documents, blank-line separated, cut at max_chars (reads no further than needed)."""
  parts, size = [], 0
  for doc in docs:
    parts.append(doc)
    size += len(doc) + 2
    if size >= max_chars:
      break
  return "\n\n".join(parts)[:max_chars]
