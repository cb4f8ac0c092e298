"""Weight-only int8 / int4 (lmtiny.quant) against full precision: validation bits per byte,
decode tokens/s at batch 1 and 8, and parameter memory.

  python benchmarks/quantization.py [--run RUN] [--configs d4_38m] [--modes none int8 int4]
      [--group-size N] [--batch-sizes 1 8] [--new-tokens 64] [--repeats 3] [--eval-batches 8]

--run is a trained run directory (e.g. the demo: python -m lmtiny.train --config
configs/tiny_llama.py --workdir runs/tiny_llama): its checkpoint is quantized and scored on its
own validation split (the embedded corpus or its shards, the same batches the trainer evaluates),
so the bpb delta is the quantization's cost. --configs are random-weight inits (speed and memory
only; their bpb would mean nothing). Decode timing is benchmarks/decode.py's (warm-up compile,
then the median of --repeats, temperature 0.8, top-k 50, top-p 0.95). Memory is the bytes the
parameters occupy: integer values plus float32 scales for quantized weights, float32 otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from decode import load_config, time_decode  # noqa: E402
from lmtiny import metrics as metrics_lib  # noqa: E402
from lmtiny import sharding  # noqa: E402
from lmtiny.model import Transformer  # noqa: E402
from lmtiny.quant import param_bytes, quantize_model  # noqa: E402
from lmtiny.sampling import Sampler  # noqa: E402


def val_bpb(model, cfg, num_batches: int) -> float:
  """Bits per byte of `model` on the run's validation documents (the trainer's eval batches)."""
  from lmtiny import config as config_lib
  from lmtiny.data.dataset import load_data
  from lmtiny.data.pipeline import make_eval_iterator
  t = cfg.train
  data = load_data(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=t.seq_len)
  graphdef, params = nnx.split(model)
  token_bytes = jnp.asarray(data.token_bytes, jnp.int32)

  @jax.jit
  def sums(params, batch):
    logits = nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"])
    losses = sharding.cross_entropy(logits, batch["targets"])
    nbytes = token_bytes[batch["targets"]].astype(jnp.float32)
    mask = batch["loss_mask"].astype(jnp.float32) * (nbytes > 0)
    return jnp.sum(losses * mask), jnp.sum(nbytes * mask)

  loss, nbytes = 0.0, 0.0
  for batch in make_eval_iterator(data.val_docs, seq_len=t.seq_len, batch_size=config_lib.micro_batch_size(t),
                                  bos_id=data.tokenizer.bos_id, num_batches=num_batches, process_index=0,
                                  process_count=1):
    a, b = jax.device_get(sums(params, {k: jnp.asarray(v) for k, v in batch.items()}))
    loss, nbytes = loss + float(a), nbytes + float(b)
  return metrics_lib.bits_per_byte(loss, nbytes)


def report(name: str, model, cfg, args) -> None:
  m = model.cfg
  print(f"{name}: {m.num_layers} layers x {m.d_model}, vocab {m.vocab_size}, "
        f"{'tied' if m.tie_embeddings else 'untied'} embeddings")
  base_bpb = None
  for mode in args.modes:
    q = model if mode == "none" else quantize_model(model, mode, args.group_size)
    line = f"  {mode:>4}: params {param_bytes(q) / 2**20:7.2f} MiB"
    if cfg is not None:
      bpb = val_bpb(q, cfg, args.eval_batches)
      base_bpb = bpb if base_bpb is None else base_bpb
      line += f" | val bpb {bpb:.4f} ({bpb - base_bpb:+.4f})"
    sampler = Sampler(q)
    for b in args.batch_sizes:
      tok_s, _, _ = time_decode(sampler, m, b, args.new_tokens, args.prompt_len, args.repeats,
                                np.random.default_rng(0))
      line += f" | decode b{b} {tok_s:8,.0f} tok/s"
    print(line, flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run", default="", help="trained run directory (bpb delta measured on its validation data)")
  p.add_argument("--configs", nargs="*", default=["d4_38m"], help="random-weight configs (speed, memory)")
  p.add_argument("--modes", nargs="+", default=["none", "int8", "int4"])
  p.add_argument("--group-size", type=int, default=None, help="default: int8 per channel, int4 64")
  p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--prompt-len", type=int, default=16)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--eval-batches", type=int, default=8)
  args = p.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU "
        f"cores; decode: prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.repeats}")
  if args.run:
    from lmtiny.rundir import load_weights
    run, params = load_weights(args.run)
    report(f"{args.run} (step {run.step})", run.model(params), run.cfg, args)
  for name in args.configs:
    cfg = load_config(name)
    report(f"{name} (random init)", Transformer(cfg.model, nnx.Rngs(0)), None, args)


if __name__ == "__main__":
  main()
