"""XLA compiler options for lmtiny's jitted steps, per platform (one place, measured).

CPU: XLA:CPU hands both matmuls and reductions to YNNPACK by default. For float32 GEMMs of
this codebase's shapes its Eigen path is faster (2 threads, N x K x M GFLOP/s YNNPACK against
Eigen: 4096x192x192 189 vs 267, 4096x192x768 208 vs 297, the lm_head's 4096x4096x192 253 vs
259), while YNNPACK's reductions beat Eigen's (softmax and norm sums). So on CPU the steps keep
YNNPACK for reductions only: the tiny config's train step is 5% faster
(benchmarks/torch_reference.py, 547 -> 521 ms). Accelerators get no options.

JAX accepts compiler options only on an outermost jit: trace a step's Python function
(`step.__wrapped__`) to nest it inside another transformation.
"""
from __future__ import annotations

import jax

_CPU = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options(platform: str | None = None) -> dict[str, str]:
  """Options for `jax.jit(..., compiler_options=...)` on `platform` (default: jax's backend)."""
  return dict(_CPU) if (platform or jax.default_backend()) == "cpu" else {}
