"""Weight-only int8 / int4 (lmtiny.model.quant) against full precision: validation bits per byte,
decode tokens/s at batch 1 and 8, and parameter memory.

  python benchmarks/quantization.py --run RUN [--configs d4_38m ...] [--modes none int8 int4]
      [--group-size N] [--batch-sizes 1 8] [--new-tokens 64] [--repeats 3] [--eval-batches N]

--run is a trained run directory (e.g. the demo: python -m lmtiny.train --config
configs/tiny_llama.py --workdir runs/tiny_llama): its newest checkpoint, loaded as lmtiny.eval loads
it, is quantized as `eval --quantize` quantizes it and scored by the same function (the trainer's
evaluation) on the same batches (the run's train.eval_batches, or --eval-batches), so the
full-precision bpb is the val bpb `python -m lmtiny.eval --workdir RUN` prints and each delta is
the quantization's cost. --configs adds random-weight inits of configs/<name>.py (speed and memory
only; their bpb would mean nothing). Decode timing is benchmarks/decode.py's (warm-up compile,
then the median of --repeats, temperature 0.8, top-k 50, top-p 0.95). Memory is the bytes the
parameters occupy: integer values plus float32 scales for quantized weights, float32 otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from decode import load_config, time_decode  # noqa: E402
from lmtiny import cli  # noqa: E402
from lmtiny.errors import UserError  # noqa: E402
from lmtiny.training.bpb import evaluate_bpb  # noqa: E402
from lmtiny.tasks.model_loading import load_model  # noqa: E402
from lmtiny.model.transformer import Transformer  # noqa: E402
from lmtiny.model.quant import param_bytes, quantize_model  # noqa: E402
from lmtiny.model.sampling import Sampler  # noqa: E402


def quantized_bpb(loaded, modes, group_size: int | None = None, eval_batches: int = 0) -> dict[str, float]:
  """{mode: val bpb} of a run's model (lmtiny.tasks.model_loading.LoadedModel) at full precision ("none")
  and quantized, by lmtiny.training.bpb.evaluate_bpb on the run's eval batches."""
  return {mode: evaluate_bpb(dataclasses.replace(loaded, model=_quantized(loaded.model, mode, group_size)),
                             eval_batches=eval_batches)["bpb"] for mode in modes}


def _quantized(model, mode: str, group_size: int | None):
  return model if mode == "none" else quantize_model(model, mode, group_size)


def report(name: str, model, args, bpb: dict[str, float] | None = None) -> None:
  m = model.cfg
  print(f"{name}: {m.num_layers} layers x {m.d_model}, vocab {m.vocab_size}, "
        f"{'tied' if m.tie_embeddings else 'untied'} embeddings")
  for mode in args.modes:
    q = _quantized(model, mode, args.group_size)
    line = f"  {mode:>4}: params {param_bytes(q) / 2**20:7.2f} MiB"
    if bpb is not None:
      base = bpb.get("none", bpb[args.modes[0]])
      line += f" | val bpb {bpb[mode]:.4f} ({bpb[mode] - base:+.4f})"
    sampler = Sampler(q)
    for b in args.batch_sizes:
      tok_s, _, _ = time_decode(sampler, m, b, args.new_tokens, args.prompt_len, args.repeats,
                                np.random.default_rng(0))
      line += f" | decode b{b} {tok_s:8,.0f} tok/s"
    print(line, flush=True)


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python benchmarks/quantization.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run", default="", help="trained run directory (bpb delta measured on its validation data)")
  p.add_argument("--configs", nargs="*", default=[], help="random-weight configs (speed, memory), e.g. d4_38m")
  p.add_argument("--modes", nargs="+", default=["none", "int8", "int4"], choices=("none", "int8", "int4"))
  p.add_argument("--group-size", type=int, default=None, help="default: int8 per channel, int4 64")
  p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--prompt-len", type=int, default=16)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--eval-batches", type=int, default=0, help="bpb batches (default: the run's train.eval_batches)")
  args = p.parse_args(argv)
  if not args.run and not args.configs:
    raise UserError("nothing to measure: give --run RUN (a trained run) and/or --configs NAME ...")
  for name in args.configs:
    if not os.path.exists(os.path.join(ROOT, "configs", f"{name}.py")):
      raise UserError(f"--configs: no configs/{name}.py")
  if args.eval_batches < 0:
    raise UserError(f"--eval-batches={args.eval_batches}: must be >= 0")
  return args


def run(argv: list[str]) -> int:
  args = parse_args(argv)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU "
        f"cores; decode: prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.repeats}")
  if args.run:
    loaded = load_model(os.path.abspath(args.run))
    bpb = quantized_bpb(loaded, args.modes, args.group_size, args.eval_batches)
    report(f"{args.run} (step {loaded.step})", loaded.model, args, bpb)
  for name in args.configs:
    cfg = load_config(name)
    report(f"{name} (random init)", Transformer(cfg.model, nnx.Rngs(0)), args)
  return 0


def main(argv=None) -> int:
  return cli.run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  cli.exit_with(main)
