"""python -m lmtiny.lora merge --workdir RUN/sft --out RUN/merged [--step N]

Folds a LoRA fine-tuning run's adapters (W + alpha / rank * A @ B) into its base run's weights
and writes a full run directory (config.json, the tokenizer, one checkpoint) that
`lmtiny.generate` and `lmtiny.serve` load like any other run. --out must be new (or an empty
directory); it is built in a temporary sibling and renamed into place, so it appears whole or not
at all. Bad input: one `error:` line, exit 2.
"""
from __future__ import annotations

import argparse
import sys

from lmtiny import cli
from lmtiny.runs.directory import merge_lora_run


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m lmtiny.lora", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="verb", required=True)
  merge = sub.add_parser("merge", help="fold the adapters into a full checkpoint")
  merge.add_argument("--workdir", required=True, help="the LoRA run directory (lmtiny.sft with lora.rank > 0)")
  merge.add_argument("--out", required=True, help="the merged run directory to write")
  merge.add_argument("--step", type=int, default=None, help="adapter checkpoint step (default: the newest)")
  return p.parse_args(argv)


def run(argv: list[str]) -> int:
  args = parse_args(argv)
  out = merge_lora_run(args.workdir, args.out, args.step)
  print(f"merged {args.workdir} into {out}: sample with python -m lmtiny.generate --workdir {out} --chat")
  return 0


def main(argv=None) -> int:
  """`argv` without the program name, as argparse takes it."""
  return cli.run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  cli.exit_with(main)
