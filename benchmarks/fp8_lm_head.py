"""Does an fp8 lm_head hold the loss? The tiny_2026 recipe with fp8 blocks (model.matmul_dtype=fp8)
trained with the lm_head GEMMs in fp8 (model.fp8_lm_head, nanochat's --fp8) and in the compute dtype,
side by side over a few seeds, in bf16, on real text: the embedded corpus as bytes (ids 1-256, 0 =
BOS, vocab 384 so that the lm_head is fp8-eligible), so no tokenizer is needed.

  python benchmarks/fp8_lm_head.py                      # CPU: 60 steps x 3 seeds, about 2-3 minutes
  python benchmarks/fp8_lm_head.py --steps 200 --variants "fp8 blocks, fp8 lm_head"

Prints each run's mean train loss over its last --tail steps, the mean over seeds per variant (plain
bf16 included) and each variant's seed-by-seed difference from fp8 blocks with a bf16 lm_head (the
same initialisation and batches): the spread between seeds is the yardstick for a difference.
XLA:CPU runs the fp8 dots on upcast operands (exact products), so the numerics are the GPU's.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from lmtiny import config as config_lib
from lmtiny.corpus.embedded import iter_embedded_documents
from lmtiny.data.pipeline import make_train_iterator
from lmtiny.parallel import sharding
from lmtiny.training.steps import build_steps, device_batch

VARIANTS = {"bf16": dict(matmul_dtype="default"), "fp8 blocks, bf16 lm_head": dict(matmul_dtype="fp8", fp8_lm_head=False),
            "fp8 blocks, fp8 lm_head": dict(matmul_dtype="fp8", fp8_lm_head=True)}


def _config(seed: int, steps: int, model: dict):
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_2026.py")
  cfg = config_lib.load_file(path)
  cfg.model.update(vocab_size=384, max_seq_len=128, dtype="bfloat16", **model)
  cfg.train.update(seq_len=128, batch_tokens=8 * 128, micro_batch_size=8, steps=steps, seed=seed)
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  return cfg


def _documents(max_chars: int) -> list[np.ndarray]:
  return [np.frombuffer(doc.encode("utf-8"), np.uint8).astype(np.int32) + 1
          for doc in iter_embedded_documents(max_chars) if doc]


def train(cfg, docs) -> list[float]:
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  built = build_steps(cfg, mesh, total_steps=cfg.train.steps)
  batches = make_train_iterator(docs, seq_len=cfg.train.seq_len, batch_size=config_lib.global_batch_size(cfg.train),
                                bos_id=0, seed=cfg.train.seed)
  losses = []
  with jax.set_mesh(mesh):
    state = built.init()
    for _ in range(cfg.train.steps):
      state, metrics = built.train_step(state, device_batch(next(batches), mesh))
      losses.append(float(metrics["loss"]))
  return losses


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--tail", type=int, default=10, help="mean train loss over the last this many steps")
  parser.add_argument("--chars", type=int, default=2_000_000, help="characters of the embedded corpus")
  parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
  args = parser.parse_args()
  docs = _documents(args.chars)
  means, runs = {}, {}
  for name in dict.fromkeys(args.variants + ["fp8 blocks, bf16 lm_head"]):
    model, tails = VARIANTS[name], runs.setdefault(name, [])
    for seed in args.seeds:
      t0 = time.perf_counter()
      losses = train(_config(seed, args.steps, model), docs)
      tails.append(float(np.mean(losses[-args.tail:])))
      print(f"{name:26s} seed {seed}: loss {losses[0]:.4f} -> last {args.tail} mean {tails[-1]:.4f} "
            f"({time.perf_counter() - t0:.0f} s)", flush=True)
    means[name] = (float(np.mean(tails)), float(np.std(tails)))
  base = "fp8 blocks, bf16 lm_head"
  for name, (mean, std) in means.items():
    paired = np.array(runs[name]) - np.array(runs[base])
    print(f"{name:26s} mean over seeds {mean:.4f} (std {std:.4f}); minus bf16 lm_head, seed by seed: "
          f"{' '.join(f'{d:+.4f}' for d in paired)} (mean {paired.mean():+.4f}, {100 * (mean / means[base][0] - 1):+.2f}%)")


if __name__ == "__main__":
  main()
