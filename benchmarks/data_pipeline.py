"""Data benchmarks: `prepare` throughput (MB/s of text) and pipeline throughput (tokens/s).

  python benchmarks/data_pipeline.py [--corpus ../shared/corpora/train/gutenberg_en_200MB.txt.gz]
      [--prepare-mb 50] [--vocab 32768] [--workdir /tmp/lmtiny_data_bench]
  python benchmarks/data_pipeline.py --prefetch-only [--step-ms 8]

1. Takes the first --prepare-mb MB of the books corpus (whole books, record-separated), trains a
   tokenizer on its first few MB, and times `prepare_dataset` with 1 process, with sentencepiece
   threads in one process, and with worker processes.
2. Times the training iterator at seq_len 2048, batch 32 (tokens delivered per second, median of
   timed windows after a warm-up) on: in-memory documents, the book shards (long documents), and
   shards of the same tokens cut into ~1K-token documents (web-like) -- each in-process and with
   grain worker processes.
3. The prefetch thread (data.prefetch): tokens/s a training loop gets with prefetch 0 and 2, when
   the loop only pulls batches and when each batch is followed by a simulated device step of
   --step-ms (the host waits, holding no GIL, as it does for a step's metrics), idle and while
   another process compiles XLA programs on the same cores. With --prefetch-only this part runs
   alone on synthetic ~1K-token documents (no corpus needed).
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmtiny.data import pipeline, shard_writer, shards  # noqa: E402
from lmtiny.corpus.sources import RECORD_SEPARATOR, open_source  # noqa: E402
from lmtiny.fs.atomic import atomic_write_json  # noqa: E402
from lmtiny.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

SEQ_LEN, BATCH = 2048, 32


def slice_corpus(corpus: str, out_path: str, megabytes: int) -> int:
  """Whole documents from the start of the corpus until `megabytes` MB of text; returns bytes."""
  sep = RECORD_SEPARATOR.encode()
  with gzip.open(corpus, "rb") as f:
    data = f.read(megabytes * 1_000_000)
    cut = data.rfind(sep)
    data = data[:cut] if cut > 0 else data
  with open(out_path, "wb") as f:
    f.write(data)
  return len(data)


def bench_prepare(text_path: str, num_bytes: int, tokenizer, workdir: str) -> str:
  print(f"prepare: {num_bytes / 1e6:.1f} MB of books, vocab {tokenizer.vocab_size}, {os.cpu_count()} cores")
  cpus = os.cpu_count() or 1
  for label, workers in (("1 process, 1 thread", 1), (f"1 process, {cpus} sentencepiece threads", 0),
                         (f"{cpus} worker processes", cpus)):
    out = os.path.join(workdir, f"shards-w{workers}")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    manifest = shard_writer.prepare_dataset(open_source(f"txt:{text_path}?delimiter=record"), tokenizer, out,
                                       val_fraction=0.01, workers=workers)
    seconds = time.perf_counter() - start
    tokens = sum(manifest["splits"][s]["tokens"] for s in shards.SPLITS)
    print(f"  {label:38s} {num_bytes / 1e6 / seconds:6.2f} MB/s  {tokens / seconds / 1e6:5.2f} M tokens/s "
          f"({seconds:.1f} s, {tokens:,} tokens)")
  return out


def chop_into_short_docs(shard_dir: str, out_dir: str, doc_tokens: int = 1000) -> None:
  """The book shards re-cut into ~doc_tokens-token documents (web-like lengths)."""
  m = shards.load_manifest(shard_dir)
  docs = shards.open_split(shard_dir, m, "train")
  os.makedirs(out_dir, exist_ok=True)
  rng = np.random.default_rng(0)
  writer = shards.ShardWriter(out_dir, shards.shard_name("train", 0), m["dtype"])
  for i in range(len(docs)):
    doc = docs[i]
    pos = 0
    while pos < doc.size:
      n = int(rng.exponential(doc_tokens)) + 1
      writer.write(doc[pos:pos + n], 0)
      pos += n
  record = writer.finish()
  m = dict(m, splits={"train": shards.split_totals([record]), "val": shards.split_totals([])})
  atomic_write_json(os.path.join(out_dir, shards.MANIFEST_FILE), m)


def time_iterator(docs, num_workers: int, windows: int = 5, per_window: int = 20, prefetch: int = 0,
                  step_seconds: float = 0.0) -> float:
  it = pipeline.make_train_iterator(docs, seq_len=SEQ_LEN, batch_size=BATCH, bos_id=1, seed=0,
                                    num_workers=num_workers, prefetch=prefetch)
  try:
    for _ in range(5):
      next(it)
    rates = []
    for _ in range(windows):
      start = time.perf_counter()
      for _ in range(per_window):
        batch = next(it)
        if step_seconds:
          time.sleep(step_seconds)  # the device step: the host waits without the GIL
      rates.append(per_window * batch["inputs"].size / (time.perf_counter() - start))
  finally:
    it.close()
  return statistics.median(rates)


def bench_pipeline(book_dir: str, short_dir: str, workers: int) -> None:
  print(f"pipeline: seq_len {SEQ_LEN}, batch {BATCH}, tokens/s delivered (median of 5 windows x 20 batches)")
  book_docs = shards.open_split(book_dir, shards.load_manifest(book_dir), "train")
  short_docs = shards.open_split(short_dir, shards.load_manifest(short_dir), "train")
  in_memory = [short_docs[i] for i in range(len(short_docs))]
  cases = (("in-memory list, ~1K-token docs", in_memory), ("shards, ~1K-token docs", short_docs),
           (f"shards, books (~{book_docs_mean(book_docs)}K-token docs)", book_docs))
  for label, docs in cases:
    for num_workers in (0, workers):
      rate = time_iterator(docs, num_workers)
      print(f"  {label:38s} workers={num_workers}: {rate / 1e6:6.2f} M tokens/s")


# Compiles one XLA program after another (each new, so nothing is cached) until killed: the
# CPU load of a step or evaluation compile sharing the cores with the data pipeline.
_COMPILE_LOAD = """
import jax, jax.numpy as jnp
i = 0
while True:
  def f(x, i=i):
    for k in range(60):
      x = jnp.tanh(x @ x.T + k + i)[:, :64] * jnp.cos(x)
    return x.sum()
  jax.jit(f).lower(jnp.ones((64, 64))).compile()
  i += 1
"""


def synthetic_docs(num_tokens: int = 20_000_000, mean_tokens: int = 1000, vocab: int = 32768) -> list:
  """~1K-token documents (exponential lengths, as web text) of random ids, in memory."""
  rng = np.random.default_rng(0)
  docs, total = [], 0
  while total < num_tokens:
    n = int(rng.exponential(mean_tokens)) + 1
    docs.append(rng.integers(2, vocab, n, dtype=np.uint16))
    total += n
  return docs


def bench_prefetch(docs, step_ms: float, windows: int = 7, per_window: int = 20) -> None:
  print(f"prefetch: seq_len {SEQ_LEN}, batch {BATCH}, tokens/s a loop gets (median of {windows} windows x "
        f"{per_window} batches; {os.cpu_count()} cores)")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for load in ("idle", "compiling"):
    loader = subprocess.Popen([sys.executable, "-c", _COMPILE_LOAD], env=env) if load == "compiling" else None
    try:
      if loader:
        time.sleep(5)  # past jax's import: compiling
      for step_seconds in (0.0, step_ms / 1000):
        for prefetch in (0, 2):
          rate = time_iterator(docs, 0, windows, per_window, prefetch=prefetch, step_seconds=step_seconds)
          step = f"step {step_ms:g} ms" if step_seconds else "no step"
          print(f"  {load:9s} {step:12s} prefetch={prefetch}: {rate / 1e6:6.2f} M tokens/s")
    finally:
      if loader:
        loader.kill()
        loader.wait()


def book_docs_mean(docs) -> int:
  return round(sum(docs[i].size for i in range(len(docs))) / len(docs) / 1000)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--corpus", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "corpora",
                                                       "train", "gutenberg_en_200MB.txt.gz"))
  parser.add_argument("--prepare-mb", type=int, default=50)
  parser.add_argument("--tokenizer-mb", type=int, default=5)
  parser.add_argument("--vocab", type=int, default=32768)
  parser.add_argument("--workers", type=int, default=2, help="grain worker processes for the pipeline case")
  parser.add_argument("--workdir", default="/tmp/lmtiny_data_bench")
  parser.add_argument("--prefetch-only", action="store_true", help="only part 3, on synthetic documents")
  parser.add_argument("--step-ms", type=float, default=8.0, help="the simulated device step of part 3")
  args = parser.parse_args()
  if args.prefetch_only:
    bench_prefetch(synthetic_docs(), args.step_ms)
    return
  os.makedirs(args.workdir, exist_ok=True)
  text_path = os.path.join(args.workdir, "books.txt")
  num_bytes = slice_corpus(args.corpus, text_path, args.prepare_mb)
  tok_dir = os.path.join(args.workdir, f"tok-{args.vocab}")
  if not os.path.isdir(tok_dir):
    with open(text_path, encoding="utf-8") as f:
      sample = f.read(args.tokenizer_mb * 1_000_000).split(RECORD_SEPARATOR)
    start = time.perf_counter()
    train_tokenizer(sample, args.vocab, tok_dir, seed=0)
    print(f"tokenizer: vocab {args.vocab} on {args.tokenizer_mb} MB in {time.perf_counter() - start:.1f} s")
  tokenizer = Tokenizer.load(tok_dir)
  book_dir = bench_prepare(text_path, num_bytes, tokenizer, args.workdir)
  short_dir = os.path.join(args.workdir, "short-docs")
  shutil.rmtree(short_dir, ignore_errors=True)
  chop_into_short_docs(book_dir, short_dir)
  bench_pipeline(book_dir, short_dir, args.workers)
  short_docs = shards.open_split(short_dir, shards.load_manifest(short_dir), "train")
  bench_prefetch(short_docs, args.step_ms)


if __name__ == "__main__":
  main()
