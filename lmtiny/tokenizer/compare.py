"""Compression comparison: bytes per token of our tokenizers against GPT-2 and GPT-4.

The reference tokenizers come from tiktoken (an optional extra). It downloads their BPE files
unless they are cached (TIKTOKEN_CACHE_DIR); `load_references` gives up after a timeout or on
any error and says why in one line, so an offline machine still gets our columns.
"""
from __future__ import annotations

import threading
from typing import Callable

from lmtiny.tokenizer.spm import Tokenizer

REFERENCES = (("gpt2", "gpt2"), ("gpt4", "cl100k_base"))   # (column name, tiktoken encoding)
_CHUNK_CHARS = 1 << 16

Counter = Callable[[str], int]


def load_references(timeout_s: float = 30.0) -> tuple[dict[str, Counter], str | None]:
  """Token counters for GPT-2 and GPT-4, or ({}, reason) when tiktoken cannot provide them."""
  try:
    import tiktoken
  except ImportError:
    return {}, "tiktoken is not installed (pip install tiktoken): showing our tokenizers only"
  result: dict = {}

  def load():
    try:
      result["encodings"] = {name: tiktoken.get_encoding(enc) for name, enc in REFERENCES}
    except Exception as e:  # network errors come in many types
      result["error"] = f"{type(e).__name__}"

  worker = threading.Thread(target=load, daemon=True)
  worker.start()
  worker.join(timeout_s)
  if "encodings" not in result:
    why = result.get("error", f"no answer in {timeout_s:.0f} s")
    return {}, (f"GPT-2/GPT-4 unavailable ({why}): tiktoken needs the network or "
                "TIKTOKEN_CACHE_DIR; showing our tokenizers only")
  return {name: (lambda text, e=enc: len(e.encode_ordinary(text)))
          for name, enc in result["encodings"].items()}, None


def _chunks(text: str) -> list[str]:
  """Pieces of `text` cut just after a newline. A token that would join that newline with the next
  line's indentation is split in two there: a few extra tokens per MB (4-13 measured), not exact."""
  chunks, start = [], 0
  while start < len(text):
    end = text.find("\n", start + _CHUNK_CHARS)
    end = len(text) if end < 0 else end + 1
    chunks.append(text[start:end])
    start = end
  return chunks


def token_counter(tok: Tokenizer, num_threads: int = 0) -> Counter:
  """Counts our tokens of a long text, encoding newline-cut chunks in parallel."""
  return lambda text: sum(len(ids) for ids in tok.encode_batch(_chunks(text), num_threads))


def compression_rows(texts: dict[str, str], counters: dict[str, Counter]) -> list[dict]:
  """Per text: its UTF-8 bytes and, per tokenizer, its token count."""
  rows = []
  for name, text in texts.items():
    rows.append(dict(text=name, bytes=len(text.encode("utf-8")),
                     tokens={k: count(text) for k, count in counters.items()}))
  return rows


def relative_diff(reference_tokens: int, our_tokens: int) -> float:
  """Percent fewer tokens than the reference (positive: ours compresses better)."""
  return 100.0 * (reference_tokens - our_tokens) / max(reference_tokens, 1)


def format_table(rows: list[dict], reference_names: list[str], our_names: list[str]) -> str:
  """The comparison table: tokens and bytes/token per tokenizer, ours vs each reference, best."""
  names = reference_names + our_names
  head = [f"{'text':<13}{'bytes':>12}"]
  for n in names:
    head.append(f"{n + ' tok':>15}{'B/tok':>7}")
  for ours in our_names:
    for ref in reference_names:
      head.append(f"{ours + ' vs ' + ref:>{max(9, len(ours) + len(ref) + 5)}}")
  head.append("  best")
  lines = [" ".join(head)]
  for row in rows:
    cells = [f"{row['text']:<13}{row['bytes']:>12,}"]
    ratios = {}
    for n in names:
      t = row["tokens"][n]
      ratios[n] = row["bytes"] / max(t, 1)
      cells.append(f"{t:>15,}{ratios[n]:>7.2f}")
    for ours in our_names:
      for ref in reference_names:
        diff = relative_diff(row["tokens"][ref], row["tokens"][ours])
        cells.append(f"{diff:>+{max(9, len(ours) + len(ref) + 5) - 1}.1f}%")
    cells.append(f"  {max(names, key=lambda n: ratios[n])}")
    lines.append(" ".join(cells))
  return "\n".join(lines)
