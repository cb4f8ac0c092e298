"""Inference benchmark: time to first token, decode tokens/s per request and in total, and
memory-bandwidth utilisation, across batch sizes and prompt lengths (lmtiny.model.sampling).

  python benchmarks/infer.py [--configs tiny d4_38m] [--run RUN] [--batch-sizes 1 8 32]
      [--prompt-lens 16 256] [--new-tokens 64] [--repeats 3] [--temperature 0.8]
      [--dtype auto] [--bandwidth GB/s] [--json FILE]

--configs are configs/<name>.py (or paths to config files) at random weights: speed does not
depend on what the model learned. --run is a trained run directory (its newest checkpoint). Each
(batch, prompt length) point gives every row the same number of random prompt tokens (prompt
lengths are capped at the context minus --new-tokens) and no stop token, so every row generates
all --new-tokens. It is generated once with a warm-up compile, then --repeats times; the figures
are medians over those:

  TTFT          time to first token: prefill of every row's prompt plus sampling the first token
                (Generation.prefill_seconds: the whole batch gets its first token at once)
  decode tok/s  tokens after the first, over the decode loop's wall time (host streaming
                between chunks included): batch x (new_tokens - 1) / decode seconds; per
                request = that / batch
  step ms       decode seconds / new_tokens: the loop runs new_tokens forward passes of the batch
                (the first feeds prefill's token, the last computes one that is never emitted)
  util          memory-bandwidth utilisation: bytes a decode step must read / step time / device
                bandwidth. Bytes read = the weights (every matrix in the compute dtype the sampler
                casts them to, plus the float32 norm scales; of a lookup table, the embedding when
                untied and value embeddings, only the batch's rows) + the live KV cache (keys and
                values of the positions each row's new token attends to, averaged over the decode
                steps, sliding windows counted). `util as run` counts the cache as the XLA decode
                path reads it: every slot of the bucketed cache, masked or not. Writes and
                activations are left out (small at decode).

Device bandwidth: on a GPU/TPU the vendor's HBM figure for the device kind
(lmtiny.plan.roofline.HBM_BANDWIDTH, named in the output); on CPU a probe: jit(x * 2) in place
(donated) over a 256 MiB float32 array, (read + written) bytes over the best of 5 timings; or
--bandwidth GB/s for any device. Sampling: temperature 0.8, top-k 50, top-p 0.95 (decode.py's;
--temperature 0 is greedy). --json FILE writes every figure unrounded, again after every point.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from lmtiny import cli  # noqa: E402
from lmtiny import config as config_lib  # noqa: E402
from lmtiny.errors import UserError  # noqa: E402
from lmtiny.model.sampling import Sampler, SamplingParams, bucket  # noqa: E402
from lmtiny.model.transformer import compute_dtype, Transformer  # noqa: E402
from lmtiny.plan.roofline import HBM_BANDWIDTH  # noqa: E402
from lmtiny.runs.metrics import chip_name  # noqa: E402
from lmtiny.tasks.model_loading import load_model  # noqa: E402

PROBE_BYTES = 256 * 2**20
PROBE_REPEATS = 5
DTYPES = ("auto", "float32", "bfloat16")
HEADER = ("batch", "prompt", "cache", "TTFT ms", "prefill tok/s", "decode tok/s", "per request", "step ms",
          "MB/step", "GB/s", "util", "util as run")


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are a UserError: one `error:` line and exit status 2 (cli.run_main)."""

  def error(self, message):
    raise UserError(message)


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = _Parser(prog="python benchmarks/infer.py", description=__doc__,
              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", nargs="*", default=None, help="configs/<name>.py or config files (default: tiny "
                 "d4_38m unless --run is given)")
  p.add_argument("--run", default="", help="a trained run directory (its newest checkpoint)")
  p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
  p.add_argument("--prompt-lens", nargs="+", type=int, default=[16, 256])
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; else top-k 50, top-p 0.95")
  p.add_argument("--dtype", default="auto", choices=DTYPES, help="model.dtype (compute dtype) of --configs")
  p.add_argument("--bandwidth", type=float, default=None, help="device bandwidth in GB/s (default: the chip's "
                 "HBM figure, or a probe on CPU)")
  p.add_argument("--json", default="", help="write every figure to this file")
  args = p.parse_args(argv)
  if args.configs is None:
    args.configs = [] if args.run else ["tiny", "d4_38m"]
  args.config_paths = [config_path(name) for name in args.configs]
  for flag in ("batch_sizes", "prompt_lens"):
    bad = [n for n in getattr(args, flag) if n < 1]
    if bad:
      raise UserError(f"--{flag.replace('_', '-')}={bad[0]}: must be >= 1")
  if args.new_tokens < 2:
    raise UserError(f"--new-tokens={args.new_tokens}: must be >= 2 (the first token is prefill's)")
  if args.repeats < 1:
    raise UserError(f"--repeats={args.repeats}: must be >= 1")
  if not 0 <= args.temperature < float("inf"):
    raise UserError(f"--temperature={args.temperature}: must be a finite number >= 0")
  if args.bandwidth is not None and not 0 < args.bandwidth < float("inf"):
    raise UserError(f"--bandwidth={args.bandwidth}: must be a positive number of GB/s")
  if args.run and not os.path.isdir(args.run):
    raise UserError(f"--run={args.run}: no such directory")
  if args.json and (os.path.isdir(args.json) or not os.path.isdir(os.path.dirname(os.path.abspath(args.json)))):
    raise UserError(f"--json={args.json}: a directory, or in a directory that does not exist")
  if not args.configs and not args.run:
    raise UserError("nothing to measure: give --configs NAME ... and/or --run RUN")
  greedy = args.temperature == 0
  args.sampling = SamplingParams(args.temperature, top_k=0 if greedy else 50, top_p=1.0 if greedy else 0.95)
  return args


def config_path(name: str) -> str:
  """The repository's configs/<name>.py, or `name` itself when it ends in .py."""
  if name.endswith(".py"):
    path, shown = name, name
  else:
    path, shown = os.path.join(ROOT, "configs", f"{name}.py"), f"configs/{name}.py"
  if not os.path.isfile(path):
    raise UserError(f"--configs: no {shown}")
  return path


# ---------------------------------------------------------------------------------------------
# The device's bandwidth.


def probe_bandwidth(nbytes: int = PROBE_BYTES, repeats: int = PROBE_REPEATS) -> float:
  """Bytes/s of jit(x * 2) in place over a float32 array of `nbytes`: (read + written) bytes over
  the best of `repeats` timings (after one that compiles)."""
  scale = jax.jit(lambda x: x * 2.0, donate_argnums=0)
  x = scale(jnp.ones((nbytes // 4,), jnp.float32)).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    x = scale(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * x.nbytes / best


def device_bandwidth(gb_per_s: float | None) -> tuple[float | None, str]:
  """(bytes/s or None, where the figure comes from)."""
  if gb_per_s is not None:
    return gb_per_s * 1e9, f"{gb_per_s:g} GB/s, given (--bandwidth)"
  chip = chip_name()
  if chip == "cpu":
    bw = probe_bandwidth()
    return bw, (f"{bw / 1e9:,.1f} GB/s, measured: jit(x * 2) in place over a {PROBE_BYTES // 2**20} MiB float32 "
                f"array, (read + written) bytes / best of {PROBE_REPEATS}")
  if chip in HBM_BANDWIDTH:
    return HBM_BANDWIDTH[chip], (f"{HBM_BANDWIDTH[chip] / 1e9:,.0f} GB/s, the vendor's HBM figure for {chip} "
                                 "(lmtiny.plan.roofline.HBM_BANDWIDTH)")
  kind = jax.devices()[0].device_kind
  return None, f"none known for device kind {kind!r} (util n/a): pass --bandwidth GB/s"


# ---------------------------------------------------------------------------------------------
# Bytes a decode step reads.


def _is_lookup(names: list[str], m) -> bool:
  """A table the decode step gathers rows from rather than multiplies with."""
  return "value_embed" in names or ("embed" in names and not m.tie_embeddings)


def weight_bytes(params, m) -> tuple[int, int]:
  """(bytes read in full each decode step, bytes of one token's rows of the lookup tables) of the
  parameters as the sampler computes with them."""
  full = rows = 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    nbytes = x.size * x.dtype.itemsize
    if _is_lookup([str(getattr(k, "key", k)) for k in path], m):
      rows += nbytes // x.shape[0]
    else:
      full += nbytes
  return full, rows


def kv_bytes_per_step(m, batch: int, prompt_len: int, steps: int, cache_len: int) -> tuple[float, int]:
  """(live KV bytes a decode step reads, averaged over the `steps` steps; the bytes of the whole
  cache, every slot, that the XLA decode path reads). Step i feeds the token at position
  prompt_len + i, whose query attends to positions 0..prompt_len + i (the last window + 1 of them
  on a sliding-window layer)."""
  per_position = 2 * config_lib.num_kv_heads(m) * config_lib.head_dim(m) * np.dtype(compute_dtype(m)).itemsize
  positions = prompt_len + 1 + np.arange(steps)
  live = sum(np.minimum(positions, w + 1).sum() if w else positions.sum() for w in config_lib.layer_windows(m))
  return batch * per_position * float(live) / steps, batch * per_position * m.num_layers * cache_len


# ---------------------------------------------------------------------------------------------
# Timing.


def measure(sampler: Sampler, batch: int, prompt_len: int, new_tokens: int, repeats: int,
            sampling: SamplingParams, rng: np.random.Generator) -> dict:
  """One warm-up generation (compiles), then `repeats` timed ones of `batch` random prompts of
  `prompt_len` tokens and `new_tokens` new tokens each (no stop token): medians of the time to
  first token and of the decode loop's seconds, and the token counts."""
  m = sampler.cfg
  prompts = [rng.integers(10, m.vocab_size, prompt_len).tolist() for _ in range(batch)]
  compile_s = sampler.generate(prompts, max_new_tokens=new_tokens, sampling=sampling, warmup=True).compile_seconds
  ttft, decode = [], []
  for seed in range(repeats):
    gen = sampler.generate(prompts, max_new_tokens=new_tokens, sampling=sampling, seed=seed)
    generated = sum(len(t) for t in gen.tokens)
    if generated != batch * new_tokens or gen.decode_tokens != batch * (new_tokens - 1):
      raise RuntimeError(f"batch {batch}: {generated} tokens generated, {gen.decode_tokens} decoded; "
                         f"expected {batch} x {new_tokens}")
    ttft.append(gen.prefill_seconds)
    decode.append(gen.decode_seconds)
  return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
          "cache_len": min(m.max_seq_len, bucket(prompt_len + new_tokens)), "repeats": repeats,
          "compile_s": compile_s, "ttft_s": statistics.median(ttft), "decode_s": statistics.median(decode),
          "generated_tokens": generated, "decode_tokens": gen.decode_tokens, "decode_steps": new_tokens}


def figures(t: dict, m, weights: tuple[int, int], bandwidth: float | None) -> dict:
  """The measurement `t` (measure's) with the rates and the bandwidth utilisation."""
  full, rows = weights
  w = full + t["batch"] * rows
  kv, kv_as_run = kv_bytes_per_step(m, t["batch"], t["prompt_len"], t["decode_steps"], t["cache_len"])
  step_s = t["decode_s"] / t["decode_steps"]
  total = t["decode_tokens"] / t["decode_s"]
  out = dict(t, prefill_tokens_per_s=t["batch"] * t["prompt_len"] / t["ttft_s"], decode_tokens_per_s=total,
             decode_tokens_per_s_per_request=total / t["batch"], step_s=step_s, weight_bytes_per_step=w,
             kv_bytes_per_step=kv, kv_bytes_per_step_as_run=kv_as_run, bytes_per_step=w + kv,
             bytes_per_s=(w + kv) / step_s, bandwidth_utilisation=None, bandwidth_utilisation_as_run=None)
  if bandwidth:
    out.update(bandwidth_utilisation=(w + kv) / step_s / bandwidth,
               bandwidth_utilisation_as_run=(w + kv_as_run) / step_s / bandwidth)
  return out


def capped_prompt_lens(prompt_lens: list[int], new_tokens: int, context: int) -> tuple[list[int], list[str]]:
  """Prompt lengths that leave room for new_tokens in the context (duplicates dropped), and a
  note for each one capped."""
  limit = context - new_tokens
  if limit < 1:
    raise UserError(f"--new-tokens={new_tokens}: the model's context is {context} (model.max_seq_len), "
                    "which leaves no room for a prompt")
  notes = [f"prompt {n} capped to {limit} (context {context} - {new_tokens} new tokens)"
           for n in prompt_lens if n > limit]
  return list(dict.fromkeys(min(n, limit) for n in prompt_lens)), notes


# ---------------------------------------------------------------------------------------------
# One model, and the command.


def bench_model(name: str, model, args, bandwidth: float | None, models: list, save=lambda: None) -> None:
  """Every (batch, prompt length) point of one model: prints its table and appends its figures to
  `models`, calling save() after each point (a run cut off at a time limit keeps the points so far)."""
  m = model.cfg
  sampler = Sampler(model)
  weights = weight_bytes(sampler.compute_params(), m)
  prompt_lens, notes = capped_prompt_lens(args.prompt_lens, args.new_tokens, m.max_seq_len)
  params = sum(x.size for x in jax.tree.leaves(sampler.params))
  dtype = np.dtype(compute_dtype(m)).name
  print(f"{name}: {params / 1e6:.1f}M params, {m.num_layers} layers x {m.d_model}, vocab {m.vocab_size}, {dtype}; "
        f"weights read per step {weights[0] / 1e6:,.1f} MB + {weights[1] / 1e3:,.1f} kB of lookup rows per request"
        + "".join(f"; {n}" for n in notes))
  print(format_row(HEADER), flush=True)
  entry = {"name": name, "params": params, "layers": m.num_layers, "d_model": m.d_model, "vocab": m.vocab_size,
           "compute_dtype": dtype, "weight_bytes_full": weights[0], "weight_bytes_lookup_row": weights[1],
           "notes": notes, "rows": []}
  models.append(entry)
  rng = np.random.default_rng(0)
  for prompt_len in prompt_lens:
    for batch in args.batch_sizes:
      t = measure(sampler, batch, prompt_len, args.new_tokens, args.repeats, args.sampling, rng)
      entry["rows"].append(figures(t, m, weights, bandwidth))
      print(format_row(table_cells(entry["rows"][-1])), flush=True)
      save()


def _percent(x: float | None) -> str:
  return "n/a" if x is None else f"{100 * x:.1f}%"


def table_cells(r: dict) -> tuple[str, ...]:
  return (str(r["batch"]), str(r["prompt_len"]), str(r["cache_len"]), f"{r['ttft_s'] * 1e3:,.1f}",
          f"{r['prefill_tokens_per_s']:,.0f}", f"{r['decode_tokens_per_s']:,.0f}",
          f"{r['decode_tokens_per_s_per_request']:,.1f}", f"{r['step_s'] * 1e3:,.2f}",
          f"{r['bytes_per_step'] / 1e6:,.1f}", f"{r['bytes_per_s'] / 1e9:,.1f}",
          _percent(r["bandwidth_utilisation"]), _percent(r["bandwidth_utilisation_as_run"]))


def format_row(cells) -> str:
  widths = (5, 6, 5, 9, 13, 12, 11, 8, 8, 7, 6, 11)
  return "  " + " ".join(c.rjust(w) for c, w in zip(cells, widths))


def run(argv: list[str]) -> int:
  args = parse_args(argv)
  device = jax.devices()[0]
  bandwidth, source = device_bandwidth(args.bandwidth)
  sampling = args.sampling
  print(f"jax {jax.__version__} on {device.device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores; "
        f"{args.new_tokens} new tokens per request, median of {args.repeats} after a warm-up compile; "
        f"temperature {sampling.temperature:g}, top-k {sampling.top_k}, top-p {sampling.top_p:g}")
  print(f"bandwidth: {source}")
  result = {"jax": jax.__version__, "backend": jax.default_backend(), "device_kind": device.device_kind,
            "cpu_cores": os.cpu_count(), "bandwidth_bytes_per_s": bandwidth, "bandwidth_source": source,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "temperature": sampling.temperature,
            "top_k": sampling.top_k, "top_p": sampling.top_p, "models": []}

  def save():  # whole or not at all: a run killed at a time limit leaves the last complete file
    if args.json:
      with open(args.json + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
      os.replace(args.json + ".tmp", args.json)

  if args.run:
    loaded = load_model(os.path.abspath(args.run))
    bench_model(f"{args.run} (step {loaded.step})", loaded.model, args, bandwidth, result["models"], save)
  for name, path in zip(args.configs, args.config_paths):
    cfg = config_lib.load_file(path)
    if args.dtype != "auto":
      cfg.model.dtype = args.dtype
    bench_model(f"{name} (random init)", Transformer(cfg.model, nnx.Rngs(0)), args, bandwidth, result["models"],
                save)
  save()
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  sys.exit(main())
