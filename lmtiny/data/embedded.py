"""The embedded default corpus: real text every Python installation carries.

Three streams, interleaved round-robin so that any prefix mixes prose and code:
  1. the documentation topics of `pydoc_data.topics` (the language reference, in English),
  2. the module docstrings of the standard library, read from source with `ast.get_docstring`
     (modules are never imported: importing runs code with side effects),
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
  try:
    return ast.get_docstring(ast.parse(source), clean=True)
  except (SyntaxError, ValueError):  # a file this Python cannot parse has no docstring for us
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


# ---------------------------------------------------------------------------------------------
# The cached tokenizer + shards the trainer uses when no data is configured (owned by the data
# pipeline: lmtiny.data.prepare / lmtiny.data.dataset).

EMBEDDED_VAL_FRACTION = 0.05


def ensure_embedded_dataset(cache_dir: str, vocab_size: int, max_chars: int = 0) -> str:
  """Builds (once) and returns a shard directory of the embedded corpus with its own tokenizer.

  The directory is `<cache_dir>/embedded-<fingerprint>-v<vocab_size>`, keyed by content, so a
  new Python (new corpus) or vocab size gets a new build. The build happens in a temporary
  directory renamed into place at the end: two runs racing both succeed and one copy survives.
  """
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from lmtiny.data import prepare, shards  # pylint: disable=g-import-not-at-top
  from lmtiny.data.sources import open_source  # pylint: disable=g-import-not-at-top
  from lmtiny.tokenizer import train_tokenizer  # pylint: disable=g-import-not-at-top

  key = f"embedded-{embedded_fingerprint(max_chars)}-v{vocab_size}"
  final = os.path.join(cache_dir, key)
  if os.path.isfile(os.path.join(final, shards.MANIFEST_FILE)):
    return final
  os.makedirs(cache_dir, exist_ok=True)
  work = tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir)
  try:
    tok_dir, data_dir = os.path.join(work, "tokenizer"), os.path.join(work, "data")
    tokenizer = train_tokenizer(iter_embedded_documents(max_chars), vocab_size, tok_dir, seed=0)
    prepare.prepare_dataset(open_source(f"embedded?max_chars={max_chars}"), tokenizer, data_dir,
                            val_fraction=EMBEDDED_VAL_FRACTION, workers=0)
    # Keep the tokenizer's full directory (vocab listing, report) next to the shards.
    shutil.rmtree(os.path.join(data_dir, shards.TOKENIZER_DIR))
    os.replace(tok_dir, os.path.join(data_dir, shards.TOKENIZER_DIR))
    try:
      os.rename(data_dir, final)
    except OSError:
      if not os.path.isfile(os.path.join(final, shards.MANIFEST_FILE)):  # not a finished racer
        raise
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return final
