"""Tokenize a document source into array_record shards (the layout: lmtiny.data.shards).

  python -m lmtiny.data.prepare --source 'parquet:data/*.parquet' --tokenizer tok/ --out shards/

Re-running the same command after a crash keeps the finished shards and continues; a full disk
stops it with one `error:` line (exit status 1). See lmtiny.data.shard_writer for the details.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from lmtiny import cli
from lmtiny.corpus.sources import open_source, SourceError
from lmtiny.data import shards as shards_lib
from lmtiny.data.shard_writer import DEFAULT_DOCS_PER_SHARD, DiskFull, prepare_dataset, resumed_bytes, summary
from lmtiny.data.shards import DataError
from lmtiny.fs.outputs import check_output_dir, OutputError
from lmtiny.tokenizer import Tokenizer, TokenizerError


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lmtiny.data.prepare", description=__doc__.split("\n\n")[0])
  parser.add_argument("--source", required=True, help="source spec, see lmtiny.corpus.sources "
                      "(txt:GLOB, jsonl:GLOB?field=text, parquet:GLOB?column=text, tfds:NAME, hf:REPO, embedded)")
  parser.add_argument("--tokenizer", required=True, help="tokenizer directory (lmtiny.tokenizer.train)")
  parser.add_argument("--out", required=True, help="output directory for shards and manifest.json")
  parser.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for validation")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="tokenizer processes (1: in this process; 0: in this process on C++ threads)")
  parser.add_argument("--docs-per-shard", type=int, default=DEFAULT_DOCS_PER_SHARD,
                      help="source documents per shard pair (train + val)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  try:
    check_output_dir(args.out, "--out")
    if args.workers < 0:
      raise DataError(f"--workers {args.workers}: must be >= 0 (0: C++ threads in this process)")
    tokenizer = Tokenizer.load(args.tokenizer)
    source = open_source(args.source)
    resumed = resumed_bytes(args.out)
    start = time.perf_counter()
    manifest = prepare_dataset(source, tokenizer, args.out, val_fraction=args.val_fraction,
                               workers=args.workers, docs_per_shard=args.docs_per_shard,
                               progress_bar=not args.no_progress)
  except (DataError, SourceError, TokenizerError, OutputError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except DiskFull as e:  # a fault, not bad input: status 1 (as a checkpoint save that fails)
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"interrupted: re-run the same command to finish {args.out}", file=sys.stderr)
    return 130
  seconds = time.perf_counter() - start
  path = os.path.join(args.out, shards_lib.MANIFEST_FILE)
  done = resumed == sum(manifest["splits"][s]["bytes"] for s in shards_lib.SPLITS)
  print(f"{path}: already complete" if done else f"wrote {path}")
  print(summary(manifest, None if done else seconds, resumed))
  return 0


if __name__ == "__main__":
  cli.exit_with(main)
