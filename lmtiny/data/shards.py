"""Tokenized shards on disk: array_record files of per-document token arrays + manifest.json.

A dataset directory (written by `lmtiny.data.prepare`):
  manifest.json                written last; its presence means the dataset is complete
  tokenizer/tokenizer.model    a copy of the tokenizer the shards were made with
  train-00000.array_record     one record per document: the raw bytes of its token ids in the
  val-00000.array_record       manifest's dtype (array_record stores no dtype of its own)
  progress.json                only while a job is unfinished: what a re-run may keep

Manifest: {"format", "tokenizer_hash", "vocab_size", "bos_id", "dtype", "source", "val_fraction",
"docs_per_shard", "undecodable", "splits": {split: {"documents", "tokens", "bytes", "shards":
[{"file", "documents", "tokens", "bytes", "file_bytes"}]}}}, where "bytes" counts the UTF-8 text
the tokens came from (for bits per byte) and "file_bytes" the shard file's size.
Every file is written under a temporary name and renamed into place, so a crash never leaves a
half-written file under a name the manifest (or progress file) lists.
"""
from __future__ import annotations

import bisect
import json
import os
from typing import Any, Sequence

import numpy as np

from lmtiny.errors import ConfigError, first_line

FORMAT = "lmtiny-shards/1"
MANIFEST_FILE = "manifest.json"
PROGRESS_FILE = "progress.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
DTYPES = ("uint16", "uint32")
_WRITER_OPTIONS = "group_size:1"   # one record per chunk: cheapest random access


class DataError(ConfigError):
  """A user-fixable data problem (missing or corrupt shard, mismatched tokenizer); one line."""


def dtype_for_vocab(vocab_size: int) -> str:
  return "uint16" if vocab_size <= 1 << 16 else "uint32"


def shard_name(split: str, index: int) -> str:
  return f"{split}-{index:05d}.array_record"


class ShardWriter:
  """Writes one shard under a temporary name; `finish()` renames it into place."""

  def __init__(self, directory: str, filename: str, dtype: str):
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
    self.directory, self.filename, self.dtype = directory, filename, np.dtype(dtype)
    self._tmp = os.path.join(directory, f".{filename}.tmp")
    self._writer = ArrayRecordWriter(self._tmp, _WRITER_OPTIONS)
    self.documents = self.tokens = self.bytes = 0

  def write(self, tokens: np.ndarray, num_bytes: int) -> None:
    self._writer.write(np.asarray(tokens, self.dtype).tobytes())
    self.documents += 1
    self.tokens += int(np.size(tokens))
    self.bytes += int(num_bytes)

  def finish(self) -> dict[str, Any]:
    """Closes and renames the shard; returns its manifest record."""
    self._writer.close()
    final = os.path.join(self.directory, self.filename)
    os.replace(self._tmp, final)
    return {"file": self.filename, "documents": self.documents, "tokens": self.tokens,
            "bytes": self.bytes, "file_bytes": os.path.getsize(final)}

  def abort(self) -> None:
    try:
      self._writer.close()
    except (RuntimeError, OSError):  # riegeli cannot flush onto a full disk: the file goes anyway
      pass
    if os.path.exists(self._tmp):
      os.remove(self._tmp)


def split_totals(shards: list[dict[str, Any]]) -> dict[str, Any]:
  """A split's manifest entry from its shard records."""
  return {"documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
          "bytes": sum(s["bytes"] for s in shards), "shards": list(shards)}


# ---------------------------------------------------------------------------------------------
# Reading.


def _require(ok: bool, where: str, why: str):
  if not ok:
    raise DataError(f"{where}: {why}")


def load_manifest(directory: str) -> dict[str, Any]:
  """Reads and checks manifest.json's structure (not the shard files: see `check_shards`)."""
  path = os.path.join(directory, MANIFEST_FILE)
  if not os.path.isfile(path):
    hint = (" (an unfinished `lmtiny.data.prepare` job: re-run it to finish)"
            if os.path.isfile(os.path.join(directory, PROGRESS_FILE)) else
            " (make one with `python -m lmtiny.data.prepare`)")
    _require(os.path.isdir(directory), directory, "no such shard directory")
    raise DataError(f"{path}: missing{hint}")
  try:
    with open(path, encoding="utf-8") as f:
      m = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: unreadable manifest ({e})") from None
  _require(isinstance(m, dict) and m.get("format") == FORMAT, path, f"not an lmtiny manifest (format {FORMAT})")
  for key, kind in (("tokenizer_hash", str), ("vocab_size", int), ("dtype", str), ("splits", dict)):
    _require(isinstance(m.get(key), kind), path, f"field {key!r} missing or not {kind.__name__}")
  _require(m["dtype"] in DTYPES, path, f"dtype {m['dtype']!r} is not one of {', '.join(DTYPES)}")
  _require(np.iinfo(m["dtype"]).max >= m["vocab_size"] - 1, path,
           f"dtype {m['dtype']} cannot hold ids of vocab_size {m['vocab_size']}")
  for split in SPLITS:
    entry = m["splits"].get(split)
    _require(isinstance(entry, dict) and isinstance(entry.get("shards"), list), path,
             f"split {split!r} missing")
    for shard in entry["shards"]:
      _require(isinstance(shard, dict) and all(isinstance(shard.get(k), int) for k in
                                               ("documents", "tokens", "bytes", "file_bytes"))
               and isinstance(shard.get("file"), str), path, f"bad shard record in split {split!r}")
  return m


# Shard sets up to this size (the CPU demo's, small experiments') are read whole by check_shards;
# a larger one would cost a pass over the data at every start, and is checked by size and count.
FULL_READ_BYTES = 256 * 2**20


def _count_records(path: str) -> int:
  return _read_shard(path, lambda reader: reader.num_records())


def _record_bytes(path: str) -> int:
  """The bytes of every record of a shard, added up (reads the whole shard)."""
  return _read_shard(path, lambda reader: sum(len(r) for r in reader.read_all()))


def _read_shard(path: str, read):
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=g-import-not-at-top
  try:
    reader = ArrayRecordReader(path)
    value = read(reader)
    reader.close()  # riegeli may only notice a bad index or footer here
    return value
  except Exception as e:  # riegeli reports truncation / garbage as RuntimeError or ValueError
    raise DataError(f"{path}: corrupt shard ({first_line(e)})") from None


def check_shards(directory: str, manifest: dict[str, Any], splits: Sequence[str] = SPLITS) -> None:
  """Checks of every listed shard before anything uses them: present, the recorded size, the
  recorded record count; a set of at most FULL_READ_BYTES is read whole, so a record damaged in
  place (same size, same count) is found here, before a run writes anything, rather than when a
  batch reaches it; and the manifest's dtype against the data (check_dtype)."""
  paths = []
  for split in splits:
    for shard in manifest["splits"][split]["shards"]:
      path = os.path.join(directory, shard["file"])
      _require(os.path.isfile(path), path, f"missing shard (listed in {MANIFEST_FILE})")
      size = os.path.getsize(path)
      _require(size == shard["file_bytes"], path,
               f"truncated or altered shard ({size} bytes, manifest says {shard['file_bytes']})")
      count = _count_records(path)
      _require(count == shard["documents"], path,
               f"corrupt shard ({count} records, manifest says {shard['documents']})")
      paths.append(path)
  if sum(os.path.getsize(p) for p in paths) <= FULL_READ_BYTES:
    for path in paths:
      _record_bytes(path)  # every record read: riegeli checks each chunk's hash
  check_dtype(directory, manifest, splits)


def check_dtype(directory: str, manifest: dict[str, Any], splits: Sequence[str] = SPLITS) -> None:
  """The records of the shard with the fewest tokens (but some), read whole, must add up to its
  token count times the manifest's dtype size. array_record stores no dtype: a wrong one otherwise
  shows only when a record's length happens not to divide (and then as a corrupt record), or
  never, as ids of another width."""
  shards = [s for split in splits for s in manifest["splits"][split]["shards"] if s["tokens"]]
  if not shards:
    return
  shard = min(shards, key=lambda s: (s["tokens"], s["file"]))
  total = _record_bytes(os.path.join(directory, shard["file"]))
  itemsize = np.dtype(manifest["dtype"]).itemsize
  if total != shard["tokens"] * itemsize:
    fits = [d for d in DTYPES if np.dtype(d).itemsize * shard["tokens"] == total]
    raise DataError(f"{os.path.join(directory, MANIFEST_FILE)}: field 'dtype' is {manifest['dtype']!r}, but "
                    f"{shard['file']} holds {total} bytes for its {shard['tokens']} tokens, not "
                    f"{shard['tokens'] * itemsize}" + (f" (the data is {fits[0]})" if fits else ""))


def document_index(index: int, size: int) -> int:
  """`index` of a sequence of `size` documents as a non-negative int (Python's negative indexing);
  IndexError outside it."""
  index = int(index)
  if index < 0:
    index += size
  if not 0 <= index < size:
    raise IndexError(f"document {index} out of range for {size} documents")
  return index


class TokenDocs:
  """One split's documents: a random-access, picklable sequence of 1-D token arrays."""

  def __init__(self, directory: str, shards: list[dict[str, Any]], dtype: str):
    self.paths = [os.path.join(directory, s["file"]) for s in shards if s["documents"]]
    self.dtype = np.dtype(dtype)
    self._ends = list(np.cumsum([s["documents"] for s in shards if s["documents"]]))
    self._source = None

  def _records(self):
    if self._source is None:
      import grain  # pylint: disable=g-import-not-at-top
      self._source = grain.sources.ArrayRecordDataSource(self.paths)
    return self._source

  def __len__(self) -> int:
    return int(self._ends[-1]) if self._ends else 0

  def _decode(self, index: int, record: bytes) -> np.ndarray:
    if len(record) % self.dtype.itemsize:
      raise DataError(f"{self._path_of(index)}: corrupt shard (record of {len(record)} bytes is not "
                      f"a whole number of {self.dtype} ids)")
    return np.frombuffer(record, self.dtype)

  def _path_of(self, index: int) -> str:
    return self.paths[bisect.bisect_right(self._ends, index)]

  def __getitem__(self, index: int) -> np.ndarray:
    index = document_index(index, len(self))
    try:
      record = self._records()[index]
    except Exception as e:  # riegeli hash mismatch etc.: name the file, not the C++ stack
      raise DataError(f"{self._path_of(index)}: corrupt shard ({first_line(e)})") from None
    return self._decode(index, record)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_source"} | {"_source": None}

  def __repr__(self):
    return f"TokenDocs({len(self)} documents in {len(self.paths)} shards, {self.dtype})"


def open_split(directory: str, manifest: dict[str, Any], split: str) -> TokenDocs:
  return TokenDocs(directory, manifest["splits"][split]["shards"], manifest["dtype"])
