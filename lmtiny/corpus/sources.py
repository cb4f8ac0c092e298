"""Streaming document sources named by one spec string.

A spec is `<type>:<location>?<key>=<value>&...` (write "&" and "%" in a value as %26, %25):

  txt:<glob>                  one document per file (.txt, or gzip'd .txt.gz)
  txt:<glob>?delimiter=record documents separated by "\\n\\n\\x1e\\n\\n" (the corpora's record
                              separator); also `line` ("\\n"), `blank` ("\\n\\n") or any string
                              with Python escapes, e.g. `delimiter=\\n---\\n`
  txt:<glob>?doc_start=<regex>  a new document starts at each line the regex matches
                              (e.g. `doc_start=^= .+ =$` for "= Title =" headings)
  jsonl:<glob>?field=text     one JSON object per line (.jsonl or .jsonl.gz); a list field of
                              strings or of {"content"|"text": ...} messages is joined by "\\n"
  parquet:<glob>?column=text  read in record batches, never a whole file at once
  tfds:<name>?split=train&field=text&data_dir=DIR
                              a TFDS dataset prepared in array_record format, read through
                              `tfds.data_source` (no TensorFlow); wiki40b markup is cleaned
  hf:<repo_id>?pattern=*.parquet&column=text&revision=main
                              parquet shards of a Hugging Face dataset, downloaded one at a time
                              with huggingface_hub (optional dependency), then read as parquet;
                              offline (or HF_HUB_OFFLINE=1) it fails at once (lmtiny.corpus.hub)
  embedded?max_chars=N&parts=topics,docstrings,code
                              the embedded standard-library corpus (`lmtiny.corpus.embedded`);
                              all parts by default
  climbmix?shards=N&data_dir=DIR
                              ClimbMix (nanochat's pretraining text since 2026): the hf: source
                              over karpathy/climbmix-400b-shuffle's shard_NNNNN.parquet files,
                              or, with data_dir, the parquet: source over DIR/shard_*.parquet
                              (offline; nanochat's base_data_climbmix directory is one); the
                              first N shards in name order when shards=N (default all)

The first "?" starts the options (write a literal "?" in a glob as "[?]").
`open_source(spec)` checks what it can up front (files exist, parquet columns) and returns a
`Source`; `iter_documents()` streams non-empty documents as `str`. Undecodable bytes are replaced
with U+FFFD and counted in `Source.undecodable`. User mistakes raise `SourceError`, whose one-line
message names the spec or the file.
"""
from __future__ import annotations

import abc
import codecs
import fnmatch
import glob as glob_lib
import gzip
import json
import os
import re
from typing import Iterator
from urllib.parse import unquote

from lmtiny.corpus.embedded import iter_embedded_documents, PARTS as EMBEDDED_PARTS
from lmtiny.corpus.hub import hub_offline, quiet_hub_logger
from lmtiny.errors import first_line, UserError

RECORD_SEPARATOR = "\n\n\x1e\n\n"
# ClimbMix as nanochat HEAD downloads it (nanochat/dataset.py): shard_00000 ... shard_06542.parquet
# at the repository's root, text in column `text`; nanochat keeps the last shard for validation.
CLIMBMIX_REPO = "karpathy/climbmix-400b-shuffle"
CLIMBMIX_PATTERN = "shard_*.parquet"
NAMED_DELIMITERS = {"record": RECORD_SEPARATOR, "line": "\n", "blank": "\n\n"}
_CHUNK_BYTES = 1 << 20
_PARQUET_BATCH_ROWS = 512
_TFDS_BATCH = 256


class SourceError(UserError):
  """A source spec or source file a user can fix; the message names it."""


def decode_counting(data: bytes) -> tuple[str, int]:
  """Decodes UTF-8, replacing each invalid byte sequence with U+FFFD; returns (text, count)."""
  try:
    return data.decode("utf-8"), 0
  except UnicodeDecodeError:
    pass
  parts, bad, pos = [], 0, 0
  while True:
    try:
      parts.append(data[pos:].decode("utf-8"))
      return "".join(parts), bad
    except UnicodeDecodeError as e:
      parts.append(data[pos:pos + e.start].decode("utf-8"))
      parts.append("\ufffd")
      bad += 1
      pos += e.end


def _open_binary(path: str):
  """Opens a file for reading bytes, transparently un-gzipping by magic number."""
  with open(path, "rb") as f:
    magic = f.read(2)
  return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


class Source(abc.ABC):
  """A stream of documents. Subclasses implement `_documents`."""

  def __init__(self, name: str):
    self.name = name
    self.undecodable = 0   # invalid UTF-8 sequences replaced so far
    self.null_rows = 0     # null (missing) values in a parquet text column, skipped
    self.files: list[str] = []

  def _decode(self, data: bytes) -> str:
    text, bad = decode_counting(data)
    self.undecodable += bad
    return text

  @abc.abstractmethod
  def _documents(self) -> Iterator[str]:
    """Yields documents, possibly empty ones (`iter_documents` drops those)."""

  def iter_documents(self) -> Iterator[str]:
    """Yields the non-empty documents in a deterministic order; raises if there are none."""
    count = 0
    for doc in self._documents():
      if doc:
        count += 1
        yield doc
    if count == 0:
      raise SourceError(f"{self.name}: no documents (the source is empty)")

  def __repr__(self):
    return f"{type(self).__name__}({self.name!r})"


def _expand_glob(spec: str, pattern: str) -> list[str]:
  if not pattern:
    raise SourceError(f"{spec}: no path given")
  paths = sorted(p for p in glob_lib.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise SourceError(f"{spec}: no files match {pattern!r}")
  return paths


def parse_delimiter(value: str) -> str:
  """`record` | `line` | `blank` | a string with Python escapes (`\\n\\n`)."""
  if value in NAMED_DELIMITERS:
    return NAMED_DELIMITERS[value]
  text = codecs.decode(value.encode("latin-1", "backslashreplace"), "unicode_escape")
  if not text:
    raise ValueError("empty delimiter")
  return text


class TextFileSource(Source):
  """Plain or gzip'd text files: one document per file, split by a delimiter, or split before
  each line that matches a regex (`doc_start`)."""

  def __init__(self, name: str, pattern: str, delimiter: str | None = None,
               doc_start: re.Pattern | None = None):
    super().__init__(name)
    if delimiter is not None and doc_start is not None:
      raise SourceError(f"{name}: give delimiter or doc_start, not both")
    self.files = _expand_glob(name, pattern)
    self.delimiter = delimiter
    self.doc_start = doc_start

  def _split_at_lines(self, f):
    lines = []
    for raw in f:
      line = self._decode(raw)
      if lines and self.doc_start.match(line.rstrip("\r\n")):
        yield "".join(lines)
        lines = []
      lines.append(line)
    yield "".join(lines)

  def _documents(self):
    for path in self.files:
      with _open_binary(path) as f:
        if self.doc_start is not None:
          yield from self._split_at_lines(f)
          continue
        if self.delimiter is None:
          yield self._decode(f.read())
          continue
        yield from self._split_at_delimiter(f, self.delimiter.encode("utf-8"))

  def _split_at_delimiter(self, f, sep: bytes):
    """Streams chunks; a long document is kept as a list of chunks (no quadratic re-scans)."""
    pending, tail = [], b""          # tail: the last len(sep) - 1 bytes of the pending text
    keep = len(sep) - 1
    while chunk := f.read(_CHUNK_BYTES):
      if sep not in tail + chunk:
        pending.append(chunk)
        tail = (tail + chunk)[-keep:] if keep else b""
        continue
      *complete, rest = b"".join(pending + [chunk]).split(sep)
      for part in complete:
        yield self._decode(part)
      pending, tail = [rest], (rest[-keep:] if keep else b"")
    yield self._decode(b"".join(pending))


def _text_of(value, where: str) -> str:
  """A text field's value as one string: a str, or a list of strings / messages joined by \\n."""
  if isinstance(value, str):
    return value
  if isinstance(value, list):
    parts = []
    for item in value:
      if isinstance(item, dict):
        item = item.get("content", item.get("text"))
      if not isinstance(item, str):
        raise SourceError(f"{where}: list items must be strings or messages with 'content'")
      parts.append(item)
    return "\n".join(parts)
  raise SourceError(f"{where}: expected text, got {type(value).__name__}")


class JsonlSource(Source):
  """JSON lines (optionally gzip'd); one document per object, taken from `field`."""

  def __init__(self, name: str, pattern: str, field: str):
    super().__init__(name)
    self.files = _expand_glob(name, pattern)
    self.field = field

  def _documents(self):
    for path in self.files:
      for where, record in jsonl_records(path, self.field, self._decode):
        yield _text_of(record[self.field], where)


def jsonl_records(path: str, field: str, decode=lambda line: line) -> Iterator[tuple[str, dict]]:
  """(path:line, object) for each non-blank line of a JSON-lines file (gzip'd or not) whose object
  has `field`; a SourceError naming the file and line otherwise."""
  with _open_binary(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        record = json.loads(decode(line))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{where}: invalid JSON ({getattr(e, 'msg', e)})") from None
      if not isinstance(record, dict) or field not in record:
        raise SourceError(f"{where}: no field {field!r}")
      yield where, record


def _may_hold_text(kind) -> bool:
  """An arrow type whose values _text_of can take: strings, bytes, lists of strings or messages."""
  import pyarrow as pa
  if pa.types.is_list(kind) or pa.types.is_large_list(kind):
    return _may_hold_text(kind.value_type) or pa.types.is_struct(kind.value_type)
  return (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
          or pa.types.is_large_binary(kind) or pa.types.is_null(kind))


class ParquetSource(Source):
  """Parquet files with a string (or binary) column, streamed in record batches."""

  def __init__(self, name: str, pattern: str | None, column: str, files: list[str] | None = None,
               max_files: int = 0):
    super().__init__(name)
    self.column = column
    if files is None:
      self.files = _expand_glob(name, pattern)[:max_files or None]
      for path in self.files:
        self._check(path)
    else:
      self.files = files[:max_files or None]

  def _check(self, path: str):
    import pyarrow.parquet as pq
    try:
      names = pq.ParquetFile(path).schema_arrow.names
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
      raise SourceError(f"{path}: not a readable parquet file ({type(e).__name__})") from None
    if self.column not in names:
      raise SourceError(f"{path}: no column {self.column!r} (columns: {', '.join(names)})")
    kind = pq.ParquetFile(path).schema_arrow.field(self.column).type
    if not _may_hold_text(kind):
      raise SourceError(f"{path}: column {self.column!r} holds {kind}, not text")

  def _paths(self) -> Iterator[str]:
    yield from self.files

  def iter_rows(self) -> Iterator[dict]:
    """Whole rows (every column) as dicts, in file order (for structured data such as eval tasks)."""
    import pyarrow.parquet as pq
    for path in self._paths():
      for batch in pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        yield from batch.to_pylist()

  def iter_values(self) -> Iterator[tuple[str, object]]:
    """(where, value) of the column's non-null values as stored (bytes decoded): text, or lists
    such as SmolTalk's `messages` for the conversation reader."""
    import pyarrow.parquet as pq
    for path in self._paths():
      reader = pq.ParquetFile(path)
      row = 0
      for batch in reader.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[self.column]):
        for value in batch.column(0).to_pylist():
          row += 1
          if isinstance(value, bytes):
            value = self._decode(value)
          if value is None:
            self.null_rows += 1
          else:
            yield f"{path}: column {self.column!r}, row {row}", value

  def _documents(self):
    for where, value in self.iter_values():
      yield _text_of(value, where)


class HuggingFaceSource(ParquetSource):
  """Parquet shards of a Hugging Face dataset repository, fetched lazily one shard at a time.
  `offline_hint` is the way out an error names when the hub cannot be reached (default: a
  parquet: spec over a local copy of the same files)."""

  def __init__(self, name: str, repo_id: str, pattern: str, column: str, revision: str | None,
               offline_hint: str | None = None, max_files: int = 0):
    try:
      import huggingface_hub
      list_repo_files = huggingface_hub.list_repo_files
    except ImportError:
      raise SourceError(f"{name}: needs huggingface_hub (pip install huggingface_hub)") from None
    offline = hub_offline()
    if offline:
      hint = offline_hint or (f"download {repo_id}'s {pattern} files where there is network and use "
                                f"parquet:DIR/*.parquet?column={column} instead")
      raise SourceError(f"{name}: {offline}; {hint}")
    try:
      with quiet_hub_logger():
        listed = list_repo_files(repo_id, repo_type="dataset", revision=revision)
    except Exception as e:  # unknown repo, gated repo, a network that fails mid-way: all user-fixable
      raise SourceError(f"{name}: cannot list {repo_id!r} on the hub ({type(e).__name__})") from None
    files = sorted(f for f in listed if fnmatch.fnmatch(f, pattern))
    if not files:
      raise SourceError(f"{name}: no files in {repo_id!r} match {pattern!r}")
    super().__init__(name, None, column, files=files, max_files=max_files)
    self.repo_id, self.revision = repo_id, revision

  def _paths(self):
    import huggingface_hub
    download = huggingface_hub.hf_hub_download
    for remote in self.files:
      try:
        with quiet_hub_logger():
          path = download(self.repo_id, remote, repo_type="dataset", revision=self.revision)
      except Exception as e:
        raise SourceError(f"{self.name}: cannot download {remote!r} ({type(e).__name__})") from None
      self._check(path)
      yield path


_WIKI40B_MARKERS = re.compile(r"_START_(ARTICLE|SECTION|PARAGRAPH)_\n")


def clean_wiki40b(text: str) -> str:
  """wiki40b's markup to plain text: drops _START_*_ markers, _NEWLINE_ becomes a newline."""
  return _WIKI40B_MARKERS.sub("", text).replace("_NEWLINE_", "\n").strip("\n")


class TfdsSource(Source):
  """A TFDS dataset through `tfds.data_source` (array_record, random access, no TensorFlow)."""

  def __init__(self, name: str, dataset: str, split: str, field: str, data_dir: str | None):
    super().__init__(name)
    self.dataset, self.split, self.field, self.data_dir = dataset, split, field, data_dir

  def _open(self):
    try:
      import tensorflow_datasets as tfds
    except ImportError:
      raise SourceError(f"{self.name}: needs tensorflow-datasets") from None
    try:
      return tfds.data_source(self.dataset, split=self.split, data_dir=self.data_dir)
    except Exception as e:  # not found / not prepared / no network: one line, not a traceback
      detail = first_line(e)
      raise SourceError(f"{self.name}: cannot open TFDS dataset ({detail})") from None

  def _documents(self):
    records = self._open()
    clean = clean_wiki40b if self.dataset.startswith("wiki40b") else None
    for start in range(0, len(records), _TFDS_BATCH):
      stop = min(start + _TFDS_BATCH, len(records))
      getitems = getattr(records, "__getitems__", None)
      batch = getitems(list(range(start, stop))) if getitems else [records[i] for i in
                                                                  range(start, stop)]
      for record in batch:
        if self.field not in record:
          raise SourceError(f"{self.name}: records have no field {self.field!r}")
        value = record[self.field]
        text = self._decode(value) if isinstance(value, bytes) else _text_of(value, self.name)
        yield clean(text) if clean else text


class EmbeddedSource(Source):
  """The standard-library corpus every Python installation carries."""

  def __init__(self, name: str, max_chars: int, parts: tuple[str, ...] = EMBEDDED_PARTS):
    super().__init__(name)
    self.max_chars, self.parts = max_chars, parts

  def _documents(self):
    yield from iter_embedded_documents(self.max_chars, self.parts)


def _take(spec: str, options: dict, key: str, default=None, cast=str):
  value = options.pop(key, default)
  if value is None:
    return None
  try:
    return cast(value)
  except ValueError:
    raise SourceError(f"{spec}: bad value for {key}: {value!r}") from None


def _compile_regex(value: str) -> re.Pattern:
  try:
    return re.compile(value)
  except re.error as e:
    raise ValueError(str(e)) from None


def open_climbmix(spec: str, options: dict, offline_hint: str | None = None) -> Source:
  """`climbmix?shards=N&data_dir=DIR` (see the module docstring): the hub's shards, or DIR's."""
  shards = _take(spec, options, "shards", 0, int)
  if shards < 0:
    raise SourceError(f"{spec}: shards={shards}: must be >= 0 (0: all)")
  data_dir = _take(spec, options, "data_dir")
  if data_dir is None:
    hint = offline_hint or (f"download {CLIMBMIX_REPO}'s {CLIMBMIX_PATTERN} files where there is network "
                            "(nanochat: python -m nanochat.dataset -n 170) and use climbmix?data_dir=DIR")
    return HuggingFaceSource(spec, CLIMBMIX_REPO, CLIMBMIX_PATTERN, "text", None, hint, max_files=shards)
  if not os.path.isdir(os.path.expanduser(data_dir)):
    raise SourceError(f"{spec}: data_dir {data_dir!r} is not a directory")
  pattern = os.path.join(glob_lib.escape(os.path.expanduser(data_dir)), CLIMBMIX_PATTERN)
  if not glob_lib.glob(pattern):
    raise SourceError(f"{spec}: data_dir {data_dir!r} holds no {CLIMBMIX_PATTERN} files "
                      f"(ClimbMix's shards, from {CLIMBMIX_REPO})")
  return ParquetSource(spec, pattern, "text", max_files=shards)


def open_source(spec: str, offline_hint: str | None = None) -> Source:
  """Parses a spec (see the module docstring) and opens the source it names. `offline_hint`: what
  an `hf:` source's error tells the user to do when the hub cannot be reached."""
  spec = spec.strip()
  body, _, query = spec.partition("?")
  kind, _, location = body.partition(":")
  options = {}
  for item in filter(None, query.split("&")):
    key, _, value = item.partition("=")
    options[unquote(key)] = unquote(value)
  if kind == "txt":
    delimiter = _take(spec, options, "delimiter", cast=parse_delimiter)
    doc_start = _take(spec, options, "doc_start", cast=_compile_regex)
    source = TextFileSource(spec, location, delimiter, doc_start)
  elif kind == "jsonl":
    source = JsonlSource(spec, location, _take(spec, options, "field", "text"))
  elif kind == "parquet":
    source = ParquetSource(spec, location, _take(spec, options, "column", "text"))
  elif kind == "tfds":
    if not location:
      raise SourceError(f"{spec}: no dataset name given")
    source = TfdsSource(spec, location, _take(spec, options, "split", "train"),
                        _take(spec, options, "field", "text"), _take(spec, options, "data_dir"))
  elif kind == "hf":
    if not location:
      raise SourceError(f"{spec}: no repository id given")
    source = HuggingFaceSource(spec, location, _take(spec, options, "pattern", "*.parquet"),
                               _take(spec, options, "column", "text"),
                               _take(spec, options, "revision"), offline_hint)
  elif kind == "embedded":
    if location:
      raise SourceError(f"{spec}: the embedded source takes no path")
    parts = _take(spec, options, "parts", ",".join(EMBEDDED_PARTS))
    parts = tuple(p for p in parts.split(",") if p)
    if not parts or set(parts) - set(EMBEDDED_PARTS):
      raise SourceError(f"{spec}: parts must be a comma list of {', '.join(EMBEDDED_PARTS)}")
    source = EmbeddedSource(spec, _take(spec, options, "max_chars", 0, int), parts)
  elif kind == "climbmix":
    if location:
      raise SourceError(f"{spec}: the climbmix source takes no path (a local copy: climbmix?data_dir=DIR)")
    source = open_climbmix(spec, options, offline_hint)
  else:
    raise SourceError(f"{spec}: unknown source type {kind!r} "
                      "(expected txt, jsonl, parquet, tfds, hf, embedded or climbmix)")
  if options:
    raise SourceError(f"{spec}: unknown option(s) {', '.join(sorted(options))} for {kind}")
  return source
