"""Tokenize a document source into array_record shards (see `lmtiny.data.shards` for the layout).

The library behind `python -m lmtiny.data.prepare`.

Documents are read in order, tokenized in worker processes (each holds a pickled copy of the
tokenizer) and written in source order. Every `docs_per_shard` source documents (or
SHARD_TEXT_BYTES of text, whichever comes first) close one train shard and one val shard, renamed
into place, after which progress.json records them; re-running the same command after a crash
keeps those shards and continues from the next document. manifest.json is written last. A disk
that fills up stops the job with one `error:` line (exit status 1) saying how many shard pairs
are kept; the same command, run again with space freed, continues from there.

The validation split takes documents evenly spaced through the source, a `val_fraction` share of
them, starting with document 0, so any non-zero fraction gives a non-empty val split.
"""
from __future__ import annotations

import collections
import errno
import fractions
import multiprocessing
import os
import shutil
from typing import Any, Iterator

import numpy as np

from lmtiny.data import shards as shards_lib
from lmtiny.data.shards import DataError
from lmtiny.errors import RunFailed
from lmtiny.fs.atomic import atomic_write, atomic_write_json
from lmtiny.fs.outputs import is_disk_full
from lmtiny.tokenizer.spm import MODEL_FILE

DEFAULT_DOCS_PER_SHARD = 50_000
SHARD_TEXT_BYTES = 512 << 20     # also close a shard after this much text
_TASK_DOCS = 128                 # documents per worker task ...
_TASK_CHARS = 2 << 20            # ... or this many characters
_PIECE_CHARS = 8192              # longer documents are encoded in pieces of about this size


class DiskFull(RunFailed):
  """The disk filled up while writing shards; what was finished is kept for the re-run."""


def is_validation(index: int, val_fraction: float) -> bool:
  """Document `index` goes to val: evenly spaced, exact integer arithmetic, document 0 first."""
  if val_fraction <= 0:
    return False
  f = fractions.Fraction(val_fraction).limit_denominator(1 << 20)
  p, q = f.numerator, f.denominator
  return (index * p + q) // q > (index * p + q - p) // q


# Worker side: module-level so `spawn` can find it.
_worker = {}


def _init_worker(tokenizer, dtype: str):
  _worker.update(tokenizer=tokenizer, dtype=np.dtype(dtype))


def split_for_encoding(text: str, size: int = _PIECE_CHARS) -> list[str]:
  """Cuts `text` into pieces of about `size` characters, each cut just before a single space
  between two non-space characters.

  sentencepiece encodes long inputs several times slower per byte (1.3 MB/s for 1 MB inputs
  against 3.7 MB/s for 1 KB ones, here); pieces keep it at its short-input speed. Its pieces
  begin with the space they follow and no piece spans "x y", so encoding the pieces gives the
  same ids as encoding the whole (tests check this against `Tokenizer.encode`).
  """
  pieces, start = [], 0
  while True:
    cut = text.find(" ", start + size)
    while 0 < cut < len(text) - 1 and (text[cut - 1].isspace() or text[cut + 1].isspace()):
      cut = text.find(" ", cut + 1)
    if cut <= 0 or cut >= len(text) - 1:
      pieces.append(text[start:])
      return pieces
    pieces.append(text[start:cut])
    start = cut


def _encode(texts: list[str], num_threads: int = 1) -> tuple[list[np.ndarray], list[int]]:
  pieces, counts = [], []
  for text in texts:
    parts = split_for_encoding(text) if len(text) > 2 * _PIECE_CHARS else [text]
    pieces.extend(parts)
    counts.append(len(parts))
  ids = _worker["tokenizer"].encode_batch(pieces, num_threads=num_threads)
  dtype, arrays, k = _worker["dtype"], [], 0
  for n in counts:
    arrays.append(np.asarray(ids[k], dtype) if n == 1 else np.concatenate([np.asarray(x, dtype) for x in ids[k:k + n]]))
    k += n
  return arrays, [len(t.encode("utf-8")) for t in texts]


def _tasks(documents: Iterator[str], skip: int) -> Iterator[list[str]]:
  """Groups documents into worker tasks, after reading past the first `skip`."""
  batch, chars = [], 0
  for i, doc in enumerate(documents):
    if i < skip:
      continue
    batch.append(doc)
    chars += len(doc)
    if len(batch) >= _TASK_DOCS or chars >= _TASK_CHARS:
      yield batch
      batch, chars = [], 0
  if batch:
    yield batch


class _Writer:
  """Routes documents to the current chunk's train/val shards and records finished chunks."""

  def __init__(self, out_dir: str, dtype: str, settings: dict, progress: dict | None):
    self.out_dir, self.dtype, self.settings = out_dir, dtype, settings
    progress = progress or {"documents": 0, "chunks": 0, "splits": {s: [] for s in shards_lib.SPLITS}}
    self.documents = progress["documents"]      # source documents handled (written)
    self.chunks = self.recorded = progress["chunks"]  # finished; and listed in progress.json
    self.shards = {s: list(progress["splits"][s]) for s in shards_lib.SPLITS}
    self._open, self._chunk_docs, self._chunk_bytes = {}, 0, 0

  def add(self, tokens: np.ndarray, num_bytes: int) -> None:
    split = "val" if is_validation(self.documents, self.settings["val_fraction"]) else "train"
    if split not in self._open:
      self._open[split] = shards_lib.ShardWriter(self.out_dir, shards_lib.shard_name(split, self.chunks), self.dtype)
    self._open[split].write(tokens, num_bytes)
    self.documents += 1
    self._chunk_docs += 1
    self._chunk_bytes += num_bytes
    if self._chunk_docs >= self.settings["docs_per_shard"] or self._chunk_bytes >= SHARD_TEXT_BYTES:
      self.close_chunk()

  def close_chunk(self) -> None:
    if not self._chunk_docs:
      return
    for split in shards_lib.SPLITS:
      if split in self._open:
        self.shards[split].append(self._open[split].finish())
        del self._open[split]  # only once finished: a failed finish leaves its temporary to abort()
    self.chunks += 1
    self._chunk_docs = self._chunk_bytes = 0
    self.save_progress()

  def save_progress(self) -> None:
    """progress.json: the finished chunks (none yet, at the start: the directory is then ours,
    so a job killed inside its first shard resumes instead of refusing a non-empty --out)."""
    atomic_write_json(os.path.join(self.out_dir, shards_lib.PROGRESS_FILE), {
        "settings": self.settings, "documents": self.documents, "chunks": self.chunks,
        "splits": self.shards})
    self.recorded = self.chunks

  def abort(self) -> None:
    for writer in self._open.values():
      writer.abort()
    self._open.clear()

  def totals(self) -> tuple[int, int, int]:
    every = [s for split in shards_lib.SPLITS for s in self.shards[split]]
    return (sum(s["documents"] for s in every), sum(s["tokens"] for s in every),
            sum(s["bytes"] for s in every))


def _start(out_dir: str, settings: dict) -> tuple[dict | None, dict | None]:
  """(finished manifest, progress to resume) for out_dir; raises if it holds something else."""
  manifest_path = os.path.join(out_dir, shards_lib.MANIFEST_FILE)
  progress_path = os.path.join(out_dir, shards_lib.PROGRESS_FILE)
  if os.path.isfile(manifest_path):
    manifest = shards_lib.load_manifest(out_dir)
    if {k: manifest.get(k) for k in settings} != settings:
      raise DataError(f"{out_dir}: already holds a finished dataset made with other settings; "
                      "choose a new --out")
    return manifest, None
  if os.path.isfile(progress_path):
    progress = _read_progress(progress_path)
    if progress["settings"] != settings:
      raise DataError(f"{progress_path}: an unfinished job with other settings "
                      f"({_diff(progress['settings'], settings)}); re-run it as it was or choose a new --out")
    return None, progress
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise DataError(f"{out_dir}: exists and is not an empty directory; choose a new --out")
  return None, None


def _read_progress(path: str) -> dict:
  import json  # pylint: disable=g-import-not-at-top
  try:
    with open(path, encoding="utf-8") as f:
      progress = json.load(f)
    assert all(k in progress for k in ("settings", "documents", "chunks", "splits"))
  except (OSError, ValueError, AssertionError):
    raise DataError(f"{path}: unreadable progress file; delete the directory and start again") from None
  return progress


def _diff(old: dict, new: dict) -> str:
  return ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in new if old.get(k) != new.get(k))


def _remove_temporaries(out_dir: str) -> None:
  for name in os.listdir(out_dir):
    if name.startswith(".") and name.endswith(".tmp"):
      os.remove(os.path.join(out_dir, name))


def _save_tokenizer(out_dir: str, tokenizer) -> None:
  tok_dir = os.path.join(out_dir, shards_lib.TOKENIZER_DIR)
  os.makedirs(tok_dir, exist_ok=True)
  atomic_write(os.path.join(tok_dir, MODEL_FILE), tokenizer.model_proto)


def _encoded(tasks: Iterator[list[str]], tokenizer, dtype: str, workers: int):
  """Yields (tokens, num_bytes) per document in source order, at most 2 tasks per worker in flight."""
  if workers <= 1:
    _init_worker(tokenizer, dtype)
    for texts in tasks:
      yield from zip(*_encode(texts, num_threads=workers))  # 0: sentencepiece threads on every core
    return
  ctx = multiprocessing.get_context("spawn")  # fork is unsafe in a process that runs JAX threads
  with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, dtype)) as pool:
    pending = collections.deque()
    for texts in tasks:
      pending.append(pool.apply_async(_encode, (texts,)))
      while len(pending) > 2 * workers:
        yield from zip(*pending.popleft().get())
    while pending:
      yield from zip(*pending.popleft().get())


def prepare_dataset(source, tokenizer, out_dir: str, *, val_fraction: float = 0.01, workers: int = 0,
                    docs_per_shard: int = DEFAULT_DOCS_PER_SHARD, progress_bar: bool = False) -> dict[str, Any]:
  """Tokenizes `source` (a `lmtiny.corpus.sources.Source`) into shards in out_dir; returns the manifest.

  Finishes an interrupted job with the same settings; returns the existing manifest if the job
  is already complete. `workers` > 1: that many processes; 1: this process, one thread;
  0: this process, sentencepiece's C++ threads on every core.
  """
  if not 0 <= val_fraction < 1:
    raise DataError(f"--val-fraction {val_fraction}: must be in [0, 1)")
  if docs_per_shard <= 0:
    raise DataError(f"--docs-per-shard {docs_per_shard}: must be positive")
  if workers < 0:
    raise DataError(f"--workers {workers}: must be >= 0 (0: C++ threads in this process)")
  dtype = shards_lib.dtype_for_vocab(tokenizer.vocab_size)
  settings = {"source": source.name, "tokenizer_hash": tokenizer.hash, "vocab_size": tokenizer.vocab_size,
              "dtype": dtype, "val_fraction": val_fraction, "docs_per_shard": docs_per_shard}
  finished, progress = _start(out_dir, settings)
  if finished is not None:
    return finished
  created, fresh = not os.path.exists(out_dir), progress is None
  os.makedirs(out_dir, exist_ok=True)
  _remove_temporaries(out_dir)
  writer = _Writer(out_dir, dtype, settings, progress)
  bar = _progress_bar(progress_bar, writer)
  try:
    if fresh:
      writer.save_progress()
    _save_tokenizer(out_dir, tokenizer)
    tasks = _tasks(source.iter_documents(), skip=writer.documents)
    for tokens, num_bytes in _encoded(tasks, tokenizer, dtype, workers):
      writer.add(tokens, num_bytes)
      bar.update(num_bytes)
    writer.close_chunk()
  except BaseException as e:
    writer.abort()
    if fresh and writer.chunks == 0:  # leave nothing behind a job that wrote no shard
      shutil.rmtree(out_dir if created else os.path.join(out_dir, shards_lib.TOKENIZER_DIR), ignore_errors=True)
    _raise_if_disk_full(e, out_dir, writer.recorded)
    raise
  finally:
    bar.close()
  manifest = dict(format=shards_lib.FORMAT, **settings, bos_id=tokenizer.bos_id,
                  undecodable=source.undecodable, null_rows=getattr(source, "null_rows", 0),
                  splits={s: shards_lib.split_totals(writer.shards[s]) for s in shards_lib.SPLITS})
  try:
    atomic_write_json(os.path.join(out_dir, shards_lib.MANIFEST_FILE), manifest)
  except OSError as e:  # progress.json still lists every shard: a re-run writes just the manifest
    _raise_if_disk_full(e, out_dir, writer.recorded)
    raise
  os.remove(os.path.join(out_dir, shards_lib.PROGRESS_FILE))
  return manifest


def _raise_if_disk_full(error: BaseException, out_dir: str, kept_chunks: int) -> None:
  """A full disk becomes one line (DiskFull) saying what a re-run keeps; other errors pass unchanged."""
  if not is_disk_full(error):
    return
  kept = f"the {kept_chunks} finished shard pair(s) are kept" if kept_chunks else "no finished shard was kept"
  raise DiskFull(f"{out_dir}: disk full ({os.strerror(errno.ENOSPC)}) while writing shards; {kept}: "
                 "free space and re-run the same command to continue") from None


def _progress_bar(enabled: bool, writer: _Writer):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="tokenizing", disable=not enabled,
              initial=writer.totals()[2], dynamic_ncols=True)


def summary(manifest: dict[str, Any], seconds: float | None = None, resumed_bytes: int = 0) -> str:
  """A few human-readable lines about a prepared dataset."""
  lines = [f"source {manifest['source']}: vocab {manifest['vocab_size']} ({manifest['dtype']}), "
           f"tokenizer {manifest['tokenizer_hash'][:12]}"]
  for split in shards_lib.SPLITS:
    s = manifest["splits"][split]
    per_token = s["bytes"] / s["tokens"] if s["tokens"] else 0.0
    lines.append(f"  {split:5s} {s['documents']:>10,} docs {s['tokens']:>14,} tokens "
                 f"{s['bytes'] / 1e6:>10.1f} MB text  {per_token:.2f} bytes/token  {len(s['shards'])} shards")
  if manifest.get("undecodable"):
    lines.append(f"  {manifest['undecodable']:,} undecodable byte sequences replaced with U+FFFD")
  if manifest.get("null_rows"):
    lines.append(f"  {manifest['null_rows']:,} null rows skipped (no text in the column)")
  if seconds is not None:
    done = sum(manifest["splits"][s]["bytes"] for s in shards_lib.SPLITS) - resumed_bytes
    lines.append(f"  {seconds:.1f} s, {done / 1e6 / max(seconds, 1e-9):.2f} MB/s of text")
  if not manifest["splits"]["train"]["documents"]:  # document 0 always goes to val
    lines.append("warning: the train split is empty (every document went to val): training refuses these "
                 "shards; give more documents or a smaller --val-fraction")
  return "\n".join(lines)


def resumed_bytes(out_dir: str) -> int:
  """Text bytes already done by an earlier run (so the MB/s figure counts only this run)."""
  if os.path.isfile(os.path.join(out_dir, shards_lib.MANIFEST_FILE)):
    return sum(s["bytes"] for s in shards_lib.load_manifest(out_dir)["splits"].values())
  path = os.path.join(out_dir, shards_lib.PROGRESS_FILE)
  if not os.path.isfile(path):
    return 0
  return sum(s["bytes"] for split in _read_progress(path)["splits"].values() for s in split)
