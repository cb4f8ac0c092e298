"""Train tokenizers on ../shared/corpora and compare their compression with GPT-2 and GPT-4.

  TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python benchmarks/tokenizer_compare.py

Mixtures: tokenizer_data/shared_corpora.py's RECIPE (the seed's 45/40/15 proportions, ~23 M
characters: all the corpora's encyclopedic and chat text allow) and BROAD (~100 M characters,
adding Korean and code). Each is trained at 32K and 64K.

Evaluation texts, one per type, all held out from every mixture (the recipes' hold-out rules):
  english      the Jargon File (extra/, modern English prose; in no mixture)
  wikipedia    every 10th Wikipedia article, minus the math/science ones below
  books        every 25th Gutenberg book
  conversation every 20th Topical-Chat conversation
  code         every 10th standard-library .py file
  math         Wikipedia's Arithmetic mean, Analysis of variance, Algorithm, Abacus articles and
               the Python docs of math, cmath, statistics, fractions, decimal, numbers
  science      12 Wikipedia science articles (Albedo, Alkane, Atomic number, Acid, Ampere, ...)
  korean       every 50th Korean movie review
Each text is cut at --eval-chars characters.

Prints per tokenizer: sampling and training wall time, byte-fallback characters, encode
throughput (MB/s, median of 3, encode_batch on 2 threads and on 1), then the comparison table.
--ablations also trains seed-mixture 32K variants: single digits, and sentencepiece's
split_by_unicode_script, to show why the defaults are what they are.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmtiny.corpus.embedded import join_documents  # noqa: E402
from lmtiny.corpus.sources import open_source  # noqa: E402
from lmtiny.tokenizer import train_tokenizer  # noqa: E402
from lmtiny.tokenizer.compare import compression_rows, format_table, load_references, token_counter
from lmtiny.tokenizer.mixture import held_out_documents, is_held_out, load_recipe, MixtureSampler
from lmtiny.tokenizer.compare import _chunks  # noqa: E402

RECIPE_FILE = "tokenizer_data/shared_corpora.py"


def eval_texts(max_chars: int) -> dict[str, str]:
  consts = runpy.run_path(RECIPE_FILE)
  entries = {k: load_recipe(f"{RECIPE_FILE}:BROAD")["sources"][i]
             for i, k in enumerate(("wiki", "pydocs", "books", "chat", "korean", "code"))}
  math_titles = tuple(f"= {t} =\n" for t in consts["MATH_ARTICLES"])
  science_titles = tuple(f"= {t} =\n" for t in consts["SCIENCE_ARTICLES"])
  wiki = list(held_out_documents(entries["wiki"]))
  pydocs_math = [d for d in held_out_documents(entries["pydocs"])
                 if any(f":mod:`{m}` ---" in d[:200] or f":mod:`!{m}` ---" in d[:200]
                        for m in consts["MATH_MODULE_DOCS"])]
  jargon = open_source(f"txt:{consts['CORPORA']}/extra/jargon_file_4.4.7.txt.gz")
  return dict(
      english=join_documents(jargon.iter_documents(), max_chars),
      wikipedia=join_documents((d for d in wiki if not d.startswith(math_titles + science_titles)),
                      max_chars),
      books=join_documents(held_out_documents(entries["books"]), max_chars),
      conversation=join_documents(held_out_documents(entries["chat"]), max_chars),
      code=join_documents(held_out_documents(entries["code"]), max_chars),
      math=join_documents([d for d in wiki if d.startswith(math_titles)] + pydocs_math, max_chars),
      science=join_documents((d for d in wiki if d.startswith(science_titles)), max_chars),
      korean=join_documents(held_out_documents(entries["korean"]), max_chars),
  )


def check_disjoint(texts: dict[str, str]):
  """Guards the hold-out: no evaluation document may be drawn by a training mixture."""
  for name in ("RECIPE", "BROAD"):
    recipe = load_recipe(f"{RECIPE_FILE}:{name}")
    for entry in recipe["sources"]:
      for index, doc in enumerate(open_source(entry["spec"]).iter_documents()):
        if not is_held_out(entry, index, doc) and len(doc) > 200 and any(
            doc[:200] in t for t in texts.values()):
          raise SystemExit(f"hold-out broken: a training document of {entry['spec']} is in "
                           "the evaluation texts")


def train(recipe_name: str, vocab: int, out_root: str, **options):
  recipe = load_recipe(f"{RECIPE_FILE}:{recipe_name}")
  tag = "-".join([recipe_name.lower(), f"{vocab // 1024}k"] +
                 [f"{k}={v}" for k, v in sorted(options.items())])
  start = time.perf_counter()
  sampler = MixtureSampler(recipe, progress=False)
  docs = list(sampler)
  sampled = time.perf_counter() - start
  out = os.path.join(out_root, tag)
  tok = train_tokenizer(docs, vocab, out, num_threads=2, **options)
  total = time.perf_counter() - start
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  print(f"{tag:<34} {report['characters'] / 1e6:6.1f} M chars  sample {sampled:5.1f} s  "
        f"train {report['train_seconds']:6.1f} s  total {total:6.1f} s  "
        f"byte-fallback chars {report['byte_fallback_chars']:,}", flush=True)
  return tag, tok


def encode_throughput(tok, texts: dict[str, str], threads: int) -> float:
  chunks = [c for t in texts.values() for c in _chunks(t)]
  size = sum(len(c.encode("utf-8")) for c in chunks)
  times = []
  for _ in range(3):
    start = time.perf_counter()
    tok.encode_batch(chunks, num_threads=threads)
    times.append(time.perf_counter() - start)
  return size / statistics.median(times) / 1e6


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="/tmp/lmtiny_tokenizer_bench")
  p.add_argument("--vocab", type=int, nargs="+", default=[32768, 65536])
  p.add_argument("--recipes", nargs="+", default=["RECIPE", "BROAD"])
  p.add_argument("--eval-chars", type=int, default=1_000_000)
  p.add_argument("--ablations", action="store_true")
  args = p.parse_args()
  if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir("../shared/tiktoken_cache"):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath("../shared/tiktoken_cache")

  texts = eval_texts(args.eval_chars)
  check_disjoint(texts)
  print("evaluation texts (held out):",
        ", ".join(f"{k} {len(v.encode()) / 1e6:.2f} MB" for k, v in texts.items()), flush=True)

  ours = {}
  runs = [(r, v, {}) for r in args.recipes for v in args.vocab]
  if args.ablations:
    runs += [("RECIPE", 32768, dict(digits="single")),
             ("RECIPE", 32768, dict(split_by_unicode_script=True))]
  for recipe_name, vocab, options in runs:
    tag, tok = train(recipe_name, vocab, args.out, **options)
    ours[tag] = tok

  print("\nencode throughput (MB/s of UTF-8, median of 3, all evaluation texts; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores):")
  for tag, tok in ours.items():
    print(f"  {tag:<34} 2 threads {encode_throughput(tok, texts, 2):5.2f}   "
          f"1 thread {encode_throughput(tok, texts, 1):5.2f}", flush=True)

  references, why_not = load_references()
  if why_not:
    print(why_not)
  counters = dict(references)
  counters.update({tag: token_counter(tok, 2) for tag, tok in ours.items()})
  rows = compression_rows(texts, counters)
  main_tags = [t for t in ours if "=" not in t]
  print("\nbytes per token (higher is better); 'vs' = % fewer tokens than the reference\n")
  print(format_table(rows, list(references), main_tags))
  if args.ablations:
    print("\nablations (seed mixture, 32K):\n")
    print(format_table(rows, [], [t for t in ours if t.startswith("recipe-32k")]))


if __name__ == "__main__":
  main()
