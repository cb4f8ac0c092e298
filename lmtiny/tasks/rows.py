"""Rows of an evaluation data set: a local file (jsonl or parquet, the source's own layout) or the
task's public source on the Hugging Face hub (through lmtiny.corpus.sources' `hf:` source)."""
from __future__ import annotations

import json
import os
from typing import Iterator

from lmtiny.corpus.sources import open_source, ParquetSource
from lmtiny.errors import first_line, UserError


class EvalDataError(UserError):
  """Missing or malformed task data; the message names the file or source."""


def _unreadable(path: str, error: OSError) -> EvalDataError:
  return EvalDataError(f"{path}: cannot read ({error.strerror or first_line(error)})")


def _not_utf8(where: str, error: UnicodeDecodeError, position: str) -> EvalDataError:
  return EvalDataError(f"{where}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at {position})")


def jsonl_rows(path: str) -> Iterator[dict]:
  """The JSON value of each non-blank line of `path`; a line that is not UTF-8 or not JSON, or a
  path that cannot be read (a directory), is an EvalDataError naming the file (and line)."""
  try:
    f = open(path, "rb")  # decoded line by line, so that an error names its line
  except OSError as e:
    raise _unreadable(path, e) from None
  with f:
    for lineno, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise _not_utf8(f"{path}:{lineno}", e, f"column {e.start + 1}") from None
      if line.strip():
        try:
          yield json.loads(line)
        except json.JSONDecodeError as e:
          raise EvalDataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


def read_text(path: str) -> str:
  """The whole of `path` as UTF-8 text (line endings as they are); an EvalDataError naming the file
  when it cannot be read or is not UTF-8."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise _unreadable(path, e) from None
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise _not_utf8(path, e, f"offset {e.start}") from None


def local_file(data_dir: str, name: str) -> str | None:
  for ext in (".jsonl", ".parquet"):
    path = os.path.join(os.path.expanduser(data_dir), name + ext)
    if os.path.exists(path):
      return path
  return None


def offline_hint(name: str, flag: str = "--data-dir") -> str:
  """The way out an error names when task `name`'s source is on an unreachable hub."""
  return f"point {flag} at a directory holding {name}.jsonl or {name}.parquet (the source's layout)"


def load_rows(name: str, source: str, data_dir: str | None = None, limit: int = 0,
              flag: str = "--data-dir", hint: str | None = None) -> list[dict]:
  """Up to `limit` rows (0 = all) of task `name`: DATA_DIR/<name>.jsonl|.parquet when `data_dir` is
  given, else the `source` spec (e.g. hf:openai/gsm8k?pattern=main/test-*.parquet&column=question).
  `flag` is what an error calls `data_dir` (a command-line flag or a config field); `hint` is the
  way out an error names when the hub cannot be reached (default: `offline_hint(name, flag)`)."""
  if data_dir:
    path = local_file(data_dir, name)
    if path is None:
      raise EvalDataError(f"{flag}={data_dir}: no {name}.jsonl or {name}.parquet")
    rows = jsonl_rows(path) if path.endswith(".jsonl") else ParquetSource(path, path, _first_column(path)).iter_rows()
  else:
    src = open_source(source, hint or offline_hint(name, flag))  # offline: one line, at once
    rows = src.iter_rows()
  out = []
  for row in rows:
    out.append(row)
    if limit and len(out) >= limit:
      break
  if not out:
    raise EvalDataError(f"{name}: no rows in {data_dir or source}")
  return out


def _first_column(path: str) -> str:
  import pyarrow.parquet as pq
  try:
    return pq.ParquetFile(path).schema_arrow.names[0]
  except Exception as e:  # pyarrow raises several types for a file that is not parquet
    raise EvalDataError(f"{path}: not a readable parquet file ({type(e).__name__})") from None
