"""Decode speed of lmtiny.model.sampling: tokens/s at batch 1 and 8 for the tiny and d4_38m configs.

  python benchmarks/decode.py [--configs tiny d4_38m] [--batch-sizes 1 8] [--new-tokens 128]
      [--prompt-len 16] [--repeats 5]

Weights are random (a fresh init: speed does not depend on what the model learned); no stop
tokens, so every row decodes all --new-tokens. Each setting is compiled first (warm-up), then
timed --repeats times; the medians are printed. Decode tokens/s counts every generated token
of every row after the first (which prefill samples); prefill tokens/s counts prompt tokens.
The timing is benchmarks/infer.py's, which also sweeps prompt lengths and reports time to first
token and memory-bandwidth utilisation.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from infer import measure  # noqa: E402
from lmtiny import config as config_lib  # noqa: E402
from lmtiny.model import transformer as model_lib  # noqa: E402
from lmtiny.model.transformer import compute_dtype  # noqa: E402
from lmtiny.model.sampling import Sampler, SamplingParams, bucket  # noqa: E402


def load_config(name: str):
  return config_lib.load_file(os.path.join(ROOT, "configs", f"{name}.py"))


def bench(name: str, batch_sizes, new_tokens: int, prompt_len: int, repeats: int) -> None:
  m = load_config(name).model
  model = model_lib.Transformer(m, nnx.Rngs(0))
  sampler = Sampler(model)
  rng = np.random.default_rng(0)
  cache_len = min(m.max_seq_len, bucket(prompt_len + new_tokens))
  params = model_lib.count_params(m)
  print(f"{name}: {params / 1e6:.1f}M params, {m.num_layers} layers x {m.d_model}, vocab {m.vocab_size}, "
        f"{np.dtype(compute_dtype(m)).name}, KV cache {cache_len} positions")
  for b in batch_sizes:
    med, prefill, compile_s = time_decode(sampler, m, b, new_tokens, prompt_len, repeats, rng)
    print(f"  batch {b:>2}: decode {med:>9,.0f} tok/s ({med / b:,.0f} per sequence, "
          f"{1e3 * b / med:.2f} ms/step) | prefill {prefill:>9,.0f} tok/s | "
          f"compile {compile_s:.1f} s | median of {repeats}")


def time_decode(sampler, m, b: int, new_tokens: int, prompt_len: int, repeats: int, rng):
  """(decode tok/s, prefill tok/s, compile seconds) of `sampler` at batch b: benchmarks/infer.py's
  measure (a warm-up compile, then medians of --repeats timings)."""
  t = measure(sampler, b, prompt_len, new_tokens, repeats, SamplingParams(temperature=0.8, top_k=50, top_p=0.95), rng)
  return t["decode_tokens"] / t["decode_s"], b * prompt_len / t["ttft_s"], t["compile_s"]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", nargs="+", default=["tiny", "d4_38m"])
  p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--prompt-len", type=int, default=16)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{os.cpu_count()} CPU cores; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
        f"temperature 0.8, top-k 50, top-p 0.95")
  for name in args.configs:
    bench(name, args.batch_sizes, args.new_tokens, args.prompt_len, args.repeats)


if __name__ == "__main__":
  main()
