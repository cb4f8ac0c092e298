"""nanochat's own pretraining script, timed: `scripts/base_train.py` from a nanochat checkout, run
unchanged at a given depth on synthetic text, and its per-step figures collected as JSON.

  git clone https://github.com/karpathy/nanochat .nanochat      # a checkout; never committed here
  python benchmarks/nanochat_train.py --nanochat .nanochat --depth 12 --steps 10 --json d12.json

base_train needs a tokenizer and ClimbMix parquet shards under NANOCHAT_BASE_DIR. This script
writes both to a scratch directory (removed afterwards): a tiktoken encoding with nanochat's split
pattern and special tokens and --vocab-size tokens (the 256 bytes, then byte pairs; the text's
words are all in it, so tokens per character are steady), its token_bytes.pt, and two shards (train,
val) of random-word documents of log-normal length, enough for the run's tokens. Then it starts
`python -m scripts.base_train` in the checkout with evaluation, CORE, sampling and wandb off and
--num-iterations = warmup + steps. base_train imports wandb and rustbpe at module level and uses
neither with --run=dummy and a ready tokenizer; where they are not installed (a bare GPU image),
empty modules stand in for them. Nothing else in nanochat is touched.

Its step lines give dt, tok/sec and bf16_mfu; the JSON has the medians over the steps after
--warmup (the first includes torch.compile) in the shape of benchmarks/torch_reference.py's
`--only torch` report, so benchmarks/gpu_suite.py tables and pairs it with lmtiny.bench's run of
the same config. Exit status: base_train's; 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken
import torch

STEP_LINE = re.compile(r"^step (\d+)/(\d+) .*\| loss: ([\d.]+) .*\| dt: ([\d.]+)ms \| tok/sec: ([\d,]+) \| "
                       r"bf16_mfu: ([\d.]+)")
PEAK_LINE = re.compile(r"^Peak memory usage: ([\d.]+)MiB")
# base_train imports these at module level; with --run=dummy and a ready tokenizer it calls neither.
SHIM = """import importlib.util, runpy, sys, types
for name in ("wandb", "rustbpe"):
    if importlib.util.find_spec(name) is None:
        sys.modules[name] = types.ModuleType(name)
sys.argv = ["scripts.base_train", *sys.argv[1:]]
runpy.run_module("scripts.base_train", run_name="__main__", alter_sys=True)
"""


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--nanochat", required=True, help="a nanochat checkout (holds scripts/base_train.py)")
  p.add_argument("--depth", type=int, default=12)
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps before them (the first compiles)")
  p.add_argument("--device-batch-size", type=int, default=32)
  p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per step")
  p.add_argument("--max-seq-len", type=int, default=2048)
  p.add_argument("--window-pattern", default="SSSL")
  p.add_argument("--vocab-size", type=int, default=32768, help="nanochat's tok_train default")
  p.add_argument("--fp8", action="store_true", help="base_train --fp8 (tensorwise; CUDA only)")
  p.add_argument("--device-type", default="", help="cuda | cpu (default: nanochat autodetects)")
  p.add_argument("--json", help="write the figures here")
  args = p.parse_args(argv)
  if not os.path.isfile(os.path.join(args.nanochat, "scripts", "base_train.py")):
    p.exit(2, f"error: --nanochat {args.nanochat!r}: no scripts/base_train.py there (a nanochat checkout)\n")
  for name in ("depth", "steps", "device_batch_size", "total_batch_size", "max_seq_len", "vocab_size"):
    if getattr(args, name) < 1:
      p.exit(2, f"error: --{name.replace('_', '-')} must be at least 1\n")
  if args.warmup < 1:
    p.exit(2, "error: --warmup must be at least 1 (the first step compiles)\n")
  return args


def nanochat_tokens(nanochat: str) -> tuple[list[str], str]:
  """SPECIAL_TOKENS and SPLIT_PATTERN from the checkout's nanochat/tokenizer.py (read, not imported:
  that module imports rustbpe)."""
  path = os.path.join(nanochat, "nanochat", "tokenizer.py")
  with open(path) as f:
    tree = ast.parse(f.read())
  values = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id in ("SPECIAL_TOKENS", "SPLIT_PATTERN")}
  if len(values) != 2:
    raise SystemExit(f"error: {path}: SPECIAL_TOKENS or SPLIT_PATTERN not found")
  return values["SPECIAL_TOKENS"], values["SPLIT_PATTERN"]


def synthetic_ranks(vocab: int, specials: int) -> dict[bytes, int]:
  """256 byte tokens, then two-byte tokens, lowercase letters and space first: a valid tiktoken BPE."""
  ranks = {bytes([b]): b for b in range(256)}
  first = b" abcdefghijklmnopqrstuvwxyz"
  pairs = [bytes([a, b]) for a in first for b in first] + [bytes([a, b]) for a in range(256) for b in range(256)]
  for pair in pairs:
    if len(ranks) == vocab - specials:
      break
    ranks.setdefault(pair, len(ranks))
  return ranks


def write_tokenizer(base: str, nanochat: str, vocab: int) -> None:
  specials, pattern = nanochat_tokens(nanochat)
  ranks = synthetic_ranks(vocab, len(specials))
  enc = tiktoken.Encoding(name="synthetic", pat_str=pattern, mergeable_ranks=ranks,
                          special_tokens={s: len(ranks) + i for i, s in enumerate(specials)})
  tok_dir = os.path.join(base, "tokenizer")
  os.makedirs(tok_dir)
  with open(os.path.join(tok_dir, "tokenizer.pkl"), "wb") as f:
    pickle.dump(enc, f)
  lengths = [len(t) for t in sorted(ranks, key=ranks.get)] + [0] * len(specials)
  torch.save(torch.tensor(lengths, dtype=torch.int32), os.path.join(tok_dir, "token_bytes.pt"))


def write_shards(base: str, tokens: int, seed: int = 0) -> None:
  """Train and val shards of random-word documents, ~2 characters per token with byte-pair tokens:
  twice the tokens asked for in train, since best-fit rows crop what overflows them (on the H200,
  base_train went round a shard of exactly the tokens needed twice in 10 steps)."""
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  words = ["".join(rng.choice(letters, size=n)) for n in rng.integers(2, 10, size=4096)]
  data_dir = os.path.join(base, "base_data_climbmix")
  os.makedirs(data_dir)
  for shard, need in (("shard_00000.parquet", tokens), ("shard_00001.parquet", 200_000)):
    docs, chars = [], 0
    while chars < 4 * need:
      n = int(min(8000, math.exp(rng.normal(6.0, 0.8))))  # words per document, median ~400
      doc = " ".join(words[i] for i in rng.integers(0, len(words), size=n))
      docs.append(doc)
      chars += len(doc)
    pq.write_table(pa.table({"text": docs}), os.path.join(data_dir, shard), row_group_size=1024)


def run_base_train(args, base: str) -> tuple[int, list[dict], float | None]:
  flags = [f"--depth={args.depth}", f"--max-seq-len={args.max_seq_len}", f"--device-batch-size={args.device_batch_size}",
           f"--total-batch-size={args.total_batch_size}", f"--window-pattern={args.window_pattern}",
           f"--num-iterations={args.warmup + args.steps}", "--eval-every=-1", "--core-metric-every=-1",
           "--sample-every=-1", "--run=dummy"]
  flags += ["--fp8"] if args.fp8 else []
  flags += [f"--device-type={args.device_type}"] if args.device_type else []
  env = dict(os.environ, NANOCHAT_BASE_DIR=base, PYTHONUNBUFFERED="1",
             PYTHONPATH=os.path.abspath(args.nanochat) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  print(f"=== nanochat base_train {' '.join(flags)}", flush=True)
  steps, peak = [], None
  proc = subprocess.Popen([sys.executable, "-c", SHIM, *flags], cwd=args.nanochat, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  for line in proc.stdout:
    print(line, end="", flush=True)
    if m := STEP_LINE.match(line):
      steps.append({"step": int(m[1]), "loss": float(m[3]), "dt_s": float(m[4]) / 1e3,
                    "tokens_per_s": int(m[5].replace(",", "")), "mfu_nanochat": float(m[6]) / 100})
    elif m := PEAK_LINE.match(line):
      peak = float(m[1]) * 2**20
  return proc.wait(), steps, peak


def report(args, steps: list[dict], peak: float | None) -> dict:
  timed = [s for s in steps if s["step"] >= args.warmup]
  side = {"device": args.device_type or "auto", "first_step_s": steps[0]["dt_s"] if steps else None,
          "peak_memory_bytes": peak, "mfu": None, "final_loss": steps[-1]["loss"] if steps else None}
  if timed:
    side.update(median_step_s=statistics.median(s["dt_s"] for s in timed),
                tokens_per_s=statistics.median(s["tokens_per_s"] for s in timed),
                mfu_nanochat=statistics.median(s["mfu_nanochat"] for s in timed))
  accumulation = args.total_batch_size // (args.device_batch_size * args.max_seq_len)
  return {"source": "nanochat scripts/base_train.py", "depth": args.depth, "window_pattern": args.window_pattern,
          "global_batch": args.total_batch_size // args.max_seq_len, "seq_len": args.max_seq_len,
          "batch_tokens": args.total_batch_size, "accumulation": accumulation,
          "dtype": "fp8" if args.fp8 else "float32" if args.device_type == "cpu" else "bfloat16", "compile": True, "steps": steps, "sides": {"torch": side}}


def main(argv=None) -> int:
  args = parse_args(argv)
  base = tempfile.mkdtemp(prefix="nanochat-base-")
  try:
    write_tokenizer(base, args.nanochat, args.vocab_size)
    write_shards(base, args.total_batch_size * (args.warmup + args.steps + 2))
    rc, steps, peak = run_base_train(args, base)
  finally:
    shutil.rmtree(base, ignore_errors=True)
  result = report(args, steps, peak)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  side = result["sides"]["torch"]
  if "tokens_per_s" in side:
    print(f"nanochat d{args.depth} {result['dtype']}: {side['tokens_per_s']:,.0f} tokens/s, "
          f"{side['median_step_s'] * 1e3:.1f} ms/step, bf16 MFU {100 * side['mfu_nanochat']:.1f}% (nanochat's count), "
          f"median of {len(steps) - args.warmup} steps")
  return rc


if __name__ == "__main__":
  sys.exit(main())
