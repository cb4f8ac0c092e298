"""Train a tokenizer on a mixture recipe.

  python -m lmtiny.tokenizer.train --mixture tokenizer_data/embedded.py --vocab-size 32768 \\
      --out tokenizers/embedded32k
  python -m lmtiny.tokenizer.train --source climbmix --total-chars 2000000000 --out tokenizers/climbmix32k

`--source SPEC` trains on one source (lmtiny.corpus.sources) instead of a recipe, as nanochat trains
its tokenizer on the head of its pretraining text.

Writes DIR/tokenizer.model, tokenizer.vocab, token_bytes.npy and report.json (all at once, at the
end); a DIR that holds a tokenizer already is refused (shards made with it need it unchanged). Bad
input prints one `error:` line and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from lmtiny import cli
from lmtiny.fs.outputs import check_output_dir
from lmtiny.tokenizer.bpe import check_out_dir, check_vocab_size, DIGIT_MODES, TokenizerError, train_tokenizer
from lmtiny.tokenizer.mixture import load_recipe, MixtureSampler, single_source_recipe


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m lmtiny.tokenizer.train", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  text = p.add_mutually_exclusive_group(required=True)
  text.add_argument("--mixture", help="recipe file, e.g. tokenizer_data/seed.py")
  text.add_argument("--source", help="one source spec instead of a recipe, e.g. climbmix (lmtiny.corpus.sources)")
  p.add_argument("--vocab-size", type=int, default=32768, help="a multiple of 128")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--total-chars", type=int, default=None, help="override the recipe's budget (> 0)")
  p.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
  p.add_argument("--threads", type=int, default=2, help="sentencepiece trainer threads")
  p.add_argument("--digits", choices=DIGIT_MODES, default="pairs",
                 help="pieces hold at most two digits (pairs) or one (single)")
  p.add_argument("--character-coverage", type=float, default=0.9999,
                 help="share of characters given their own piece, in [0.98, 1]; the rest use byte fallback")
  p.add_argument("--split-by-unicode-script", action="store_true",
                 help="sentencepiece's script split (off: lets \"'s\" join words)")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.add_argument("--verbose", action="store_true", help="show sentencepiece's training log")
  return p.parse_args(argv)


def run(args) -> dict:
  check_vocab_size(args.vocab_size)
  if not 0.98 <= args.character_coverage <= 1:  # sentencepiece's own bounds, checked before sampling
    raise TokenizerError(f"--character-coverage={args.character_coverage:g}: must be in [0.98, 1]")
  if args.threads < 1:
    raise TokenizerError(f"--threads={args.threads}: must be >= 1")
  if args.total_chars is not None and args.total_chars < 1:
    raise TokenizerError(f"--total-chars={args.total_chars}: must be >= 1 (leave it out for the recipe's budget)")
  if args.seed is not None and not 0 <= args.seed < 2**32:
    raise TokenizerError(f"--seed={args.seed}: must be an integer in [0, 2**32)")
  check_output_dir(args.out, "--out")  # before the (long) training, not after it
  check_out_dir(args.out)
  if os.path.exists(os.path.join(args.out, "tokenizer.model")):  # shards made with it would stop matching
    raise TokenizerError(f"--out={args.out}: holds a tokenizer already; shards and runs made with it need it "
                         "unchanged: choose a new --out (or remove it yourself first)")
  if args.source is not None:
    recipe_file = f"--source {args.source}"
    recipe = single_source_recipe(args.source, total_chars=args.total_chars, seed=args.seed)
  else:
    recipe_file = args.mixture
    recipe = load_recipe(recipe_file, total_chars=args.total_chars, seed=args.seed)
  sampler = MixtureSampler(recipe, progress=not args.quiet)
  extra = dict(recipe=recipe_file, total_chars=recipe["total_chars"], sources=sampler.stats)
  tok = train_tokenizer(iter(sampler), args.vocab_size, args.out, seed=recipe["seed"],
                        num_threads=args.threads, digits=args.digits,
                        split_by_unicode_script=args.split_by_unicode_script,
                        character_coverage=args.character_coverage, report_extra=extra,
                        verbose=args.verbose)
  with open(f"{args.out}/report.json", encoding="utf-8") as f:
    report = json.load(f)
  print(f"wrote {args.out}: vocab {tok.vocab_size}, {report['characters']:,} characters from "
        f"{len(report['sources'])} source(s), {report['byte_fallback_chars']:,} needed byte "
        f"fallback, trained in {report['train_seconds']:.1f} s, hash {tok.hash[:12]}")
  return report


def main(argv=None) -> int:
  """`argv` without the program name, as argparse takes it."""
  return cli.run_main(lambda args: run(parse_args(args)) and 0, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  cli.exit_with(main)
