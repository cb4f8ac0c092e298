"""Compare tokenizers' compression (bytes per token) with GPT-2 and GPT-4.

  python -m lmtiny.tokenizer.evaluate --tokenizer tokenizers/32k --tokenizer 64k=tokenizers/64k \\
      --texts english=held_out/english.txt --texts korean=held_out/ko.txt.gz

--texts takes a file (plain or gzip'd text) or any source spec (see lmtiny.corpus.sources), whose
documents are joined by blank lines. Without --texts it uses samples of the embedded
standard-library corpus, which a tokenizer trained on that corpus has already seen.
"""
from __future__ import annotations

import argparse
import os
import sys

from lmtiny import cli
from lmtiny.corpus.embedded import embedded_sample_texts
from lmtiny.corpus.sources import open_source
from lmtiny.tokenizer.compare import compression_rows, format_table, load_references, token_counter
from lmtiny.tokenizer.spm import Tokenizer, TokenizerError

_SOURCE_KINDS = ("txt:", "jsonl:", "parquet:", "tfds:", "hf:", "embedded")


def _named(value: str, flag: str) -> tuple[str, str]:
  name, sep, rest = value.partition("=")
  if not sep or not name or not rest:
    raise TokenizerError(f"{flag} {value!r}: expected NAME=PATH")
  return name, rest


def read_text(location: str, max_chars: int) -> str:
  """A file's text, or a source spec's documents joined by blank lines; cut at max_chars."""
  if location.startswith(_SOURCE_KINDS):  # a spec: its source names what is missing (a txt: glob too)
    spec = location
  elif os.path.isfile(location):
    spec = f"txt:{location}"
  else:
    raise TokenizerError(f"{location}: no such file")
  parts, size = [], 0
  for doc in open_source(spec).iter_documents():
    parts.append(doc)
    size += len(doc) + 2
    if max_chars and size >= max_chars:
      break
  text = "\n\n".join(parts)
  return text[:max_chars] if max_chars else text


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m lmtiny.tokenizer.evaluate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokenizer", action="append", required=True,
                 help="a tokenizer dir, or NAME=DIR (repeat to compare several)")
  p.add_argument("--texts", action="append", default=[], help="NAME=FILE or NAME=SPEC (repeat)")
  p.add_argument("--max-chars", type=int, default=5_000_000, help="per text; 0: no cap")
  p.add_argument("--no-reference", action="store_true", help="skip GPT-2/GPT-4")
  p.add_argument("--threads", type=int, default=0, help="encode threads (0: all cores)")
  return p.parse_args(argv)


def run(args) -> str:
  if args.max_chars < 0:
    raise TokenizerError(f"--max-chars={args.max_chars}: must be >= 0 (0: no cap)")
  ours = {}
  for value in args.tokenizer:
    name, path = _named(value, "--tokenizer") if "=" in value else (
        os.path.basename(os.path.normpath(value)), value)
    ours[name] = Tokenizer.load(path)
  if args.texts:
    texts = {}
    for value in args.texts:
      name, location = _named(value, "--texts")
      texts[name] = read_text(location, args.max_chars)
  else:
    print("texts: samples of the embedded standard-library corpus (seen in training by a "
          "tokenizer trained on it; pass --texts for held-out text)")
    texts = embedded_sample_texts(args.max_chars or 1_000_000)
  references, why_not = ({}, None) if args.no_reference else load_references()
  if why_not:
    print(why_not)
  counters = dict(references)
  counters.update({name: token_counter(tok, args.threads) for name, tok in ours.items()})
  table = format_table(compression_rows(texts, counters), list(references), list(ours))
  print(table)
  return table


def main(argv=None) -> int:
  """`argv` without the program name, as argparse takes it."""
  return cli.run_main(lambda args: run(parse_args(args)) and 0, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  cli.exit_with(main)
