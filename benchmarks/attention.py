"""Attention backends side by side: forward+backward time, XLA's temp memory, and each fused
backend checked against the xla path on the device this runs on.

  python benchmarks/attention.py                       # GPU/TPU: seq 2048, bf16; CPU: tiny sizes
  python benchmarks/attention.py --seq 2048 --batch 8 --heads 16 --kv-heads 4 --head-dim 128
  python benchmarks/attention.py --backends xla cudnn --layouts causal packed --repeats 20

Backends tried per platform: GPU xla + cudnn, TPU xla + splash, CPU xla + splash (Pallas
interpret mode: slow, for checking only). Layouts: `causal` (one document per row, no segment
ids: cuDNN's causal mask type), `packed` (segment ids with several documents per row and a
padding tail: cuDNN's packed-sequence runs, splash's SegmentIds) and `packed1` (segment ids, but
one document filling every row: the packed kernels' cost over the causal one with the work held
equal, which isolates what the run bound T // 64 costs). For every (backend, layout)
it prints the median time of a jitted value_and_grad of sum(attention(q, k, v) * w), the
achieved TFLOP/s, XLA's temp-buffer figure (`compiled.memory_analysis()`), whether the compiled
HLO holds the cuDNN fused-attention call, and the largest difference of the output and of
dq/dk/dv from the xla path relative to the xla value's largest magnitude. A fused backend that
differs by more than --tolerance prints MISMATCH and the script exits 1. `--json PATH` also
writes the rows (and the device, shapes and verdict) as JSON, for benchmarks/gpu_suite.sh.

FLOPs (causal half, MaxText's convention, the one lmtiny.runs.metrics uses): forward
2 * B * H * T^2 * Dh (QK^T and PV over the visible half), forward+backward 3x that. Packed
rows are counted as if causal over the whole row (an upper bound on the work).

Needs only jax, numpy and lmtiny (lmtiny.config imports ml_collections at module level; if
it is missing, as on the bare GPU machines, a stand-in module is installed: nothing here
reads a config).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

try:
  import ml_collections  # noqa: F401
except ImportError:  # lmtiny.config's import only; attention never builds a ConfigDict
  sys.modules["ml_collections"] = types.ModuleType("ml_collections")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lmtiny.model import attention as attn_lib  # noqa: E402

PLATFORM_BACKENDS = {"gpu": ("xla", "cudnn"), "tpu": ("xla", "splash"), "cpu": ("xla", "splash")}


def packed_segments(batch: int, seq: int, seed: int = 0) -> np.ndarray:
  """1..k documents of random lengths (at least 16 tokens) per row, then a padding tail of 0s."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((batch, seq), np.int32)
  for row in range(batch):
    cuts = np.sort(rng.choice(np.arange(16, seq - 16, 16), size=min(5, seq // 64), replace=False))
    for doc, (a, b) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, seq])):
      seg[row, a:b] = doc + 1
    seg[row, seq - int(rng.integers(0, seq // 8)):] = 0
  return seg


def step_fn(impl: str, segments):
  def loss(q, k, v, w):
    out = attn_lib.attention(q, k, v, q_segment_ids=segments, kv_segment_ids=segments, impl=impl)
    return jnp.sum(out.astype(jnp.float32) * w), out

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def run_one(impl, segments, args_, repeats):
  fn = step_fn(impl, segments)
  compiled = fn.lower(*args_).compile()
  hlo = compiled.as_text() or ""
  temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", float("nan"))
  result = jax.block_until_ready(compiled(*args_))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args_))
    times.append(time.perf_counter() - start)
  (_, out), grads = result
  return statistics.median(times), temp, "cudnn$fmha" in hlo or "__cudnn" in hlo, out, grads


def rel_diff(got, want) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def main(argv=None) -> int:
  platform = jax.default_backend()
  accel = platform in ("gpu", "tpu")
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq", type=int, default=2048 if accel else 256)
  p.add_argument("--batch", type=int, default=8 if accel else 2)
  p.add_argument("--heads", type=int, default=16 if accel else 4)
  p.add_argument("--kv-heads", type=int, default=4 if accel else 2)
  p.add_argument("--head-dim", type=int, default=128 if accel else 64)
  p.add_argument("--dtype", default="bfloat16" if accel else "float32", choices=("bfloat16", "float16", "float32"))
  p.add_argument("--backends", nargs="+", default=None, help="default: xla plus the platform's fused backend")
  p.add_argument("--layouts", nargs="+", default=["causal", "packed"], choices=("causal", "packed", "packed1"))
  p.add_argument("--repeats", type=int, default=10 if accel else 2)
  p.add_argument("--tolerance", type=float, default=None, help="relative; default 2e-2 (half) / 1e-4 (fp32)")
  p.add_argument("--json", default=None, help="also write the rows as JSON to this path")
  a = p.parse_args(argv)
  backends = a.backends or list(PLATFORM_BACKENDS.get(platform, ("xla",)))
  if "xla" not in backends:
    backends = ["xla"] + backends
  dtype = jnp.dtype(a.dtype)
  tol = a.tolerance or (1e-4 if dtype == jnp.float32 else 2e-2)
  print(f"device: {jax.devices()[0].device_kind} ({platform}), jax {jax.__version__}")
  print(f"B={a.batch} T={a.seq} H={a.heads} K={a.kv_heads} Dh={a.head_dim} {a.dtype}, "
        f"median of {a.repeats}; fwd+bwd FLOPs causal-half")
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((a.batch, a.seq, a.heads, a.head_dim)), dtype)
  k, v = (jnp.asarray(rng.standard_normal((a.batch, a.seq, a.kv_heads, a.head_dim)), dtype) for _ in range(2))
  w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  flops = 3 * 2 * a.batch * a.heads * a.seq ** 2 * a.head_dim
  failed = False
  rows = []
  print(f"{'backend':8} {'layout':7} {'ms':>9} {'TFLOP/s':>8} {'temp MiB':>9} {'cudnn':>5} "
        f"{'out diff':>9} {'dq':>9} {'dk':>9} {'dv':>9}")
  for layout in a.layouts:
    segments = {"causal": None, "packed": lambda: jnp.asarray(packed_segments(a.batch, a.seq)),
                "packed1": lambda: jnp.ones((a.batch, a.seq), jnp.int32)}[layout]
    segments = segments() if segments else None
    reference = None
    for impl in backends:
      try:
        sec, temp, fused, out, grads = run_one(impl, segments, (q, k, v, w), a.repeats)
      except Exception as e:  # one line per failing backend, keep going  # pylint: disable=broad-except
        error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        print(f"{impl:8} {layout:7} failed: {error}")
        failed = failed or impl != "xla"
        rows.append({"backend": impl, "layout": layout, "error": error})
        continue
      diffs, d, bad = "", None, False
      if impl == "xla":
        reference = (out, grads)
      elif reference is not None:
        d = [rel_diff(out, reference[0])] + [rel_diff(g, r) for g, r in zip(grads, reference[1])]
        bad = max(d) > tol
        failed |= bad
        diffs = " ".join(f"{x:9.2e}" for x in d) + ("  MISMATCH" if bad else "  ok")
      print(f"{impl:8} {layout:7} {sec * 1e3:9.3f} {flops / sec / 1e12:8.2f} {temp / 2**20:9.1f} "
            f"{'yes' if fused else 'no':>5} {diffs}")
      rows.append({"backend": impl, "layout": layout, "ms": sec * 1e3, "tflops": flops / sec / 1e12,
                   "temp_mib": temp / 2**20, "cudnn_in_hlo": fused, "mismatch": bad,
                   "rel_diff_vs_xla": dict(zip(("out", "dq", "dk", "dv"), d)) if d else None})
  if a.json:
    shape = dict(batch=a.batch, seq=a.seq, heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim, dtype=a.dtype)
    with open(a.json, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "platform": platform, "jax": jax.__version__, **shape,
                 "repeats": a.repeats, "tolerance": tol, "failed": failed, "rows": rows}, f, indent=1)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
