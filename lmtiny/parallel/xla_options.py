"""XLA compiler options for lmtiny's jitted steps, per platform (one place, measured).

CPU: XLA:CPU hands both matmuls and reductions to YNNPACK by default. For float32 GEMMs of
this codebase's shapes its Eigen path is faster (2 threads, N x K x M GFLOP/s YNNPACK against
Eigen: 4096x192x192 189 vs 267, 4096x192x768 208 vs 297, the lm_head's 4096x4096x192 253 vs
259), while YNNPACK's reductions beat Eigen's (softmax and norm sums). So on CPU the steps keep
YNNPACK for reductions only: the tiny config's train step is 5% faster
(benchmarks/torch_reference.py, 547 -> 521 ms). And they compile at LLVM's optimisation level 1
instead of XLA's default 3, which costs no speed: `python -m lmtiny.bench --steps 6` on one core
(two runs each, default -> level 1; level 2 reads 5.7 s and 522 ms), tiny compiles in 6.9 / 6.7 s
-> 5.2 / 5.4 s and steps in 524 / 518 ms -> 488 / 498 ms; on two cores 4.6 s -> 3.9 s and 312 / 318 ms -> 307 / 301 ms; tiny_2026 5.9
-> 4.9 s at the same step time (368 / 381 against 384 / 375 ms); d4_38m 3.8 / 4.3 -> 3.0 / 3.1 s,
10.2 / 10.8 s -> 10.2 / 10.4 s a step. (Level 0 compiles the tiny step in 3.1 s and runs it in
1,080 ms: the tests' choice for their few-step programs, lmtiny's never.)

GPU and TPU: the collective-overlap options MaxText sets for FSDP and data-parallel training
(its GPU recipes' XLA_FLAGS and its TPU LIBTPU_INIT_ARGS), so the weight all-gathers and gradient
reduce-scatters / all-reduces run while compute goes on instead of between layers. On one device
they change nothing. Each is passed as a compiler option of the step's jit, for the platform (and,
on TPU, the chip generation) the step compiles for only, and any option the user names in
XLA_FLAGS (CPU, GPU) or LIBTPU_INIT_ARGS / XLA_FLAGS (TPU) is left out, so the user's own setting
always wins. Their names are checked
against this jaxlib (GPU names compile on CPU too) and libtpu by tests/parallel/test_xla_options.py.

JAX accepts compiler options only on an outermost jit: trace a step's Python function
(`step.__wrapped__`) to nest it inside another transformation.

The sampler's, scorer's and checkpoint fingerprint's programs are jitted at import, before any
backend exists: `jit` gives them the same options, for the backend of their first call. On CPU
the demo run's `python -m lmtiny.generate` compiles in 3.7 s instead of 4.1 s (one core, medians
of five runs each, alternating) and decodes as fast (2,369 against 2,400 tok/s).
"""
from __future__ import annotations

import functools
import os
import re
from typing import Callable, Mapping

import jax

from lmtiny.parallel.chips import chip_of_device_kind

_CPU = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE", "xla_backend_optimization_level": 1}

_GPU = {
    # Lets the scheduler move collectives' starts early and their ends late, around independent compute.
    "xla_gpu_enable_latency_hiding_scheduler": True,
    # Runs collectives on a high-priority stream, so they are not queued behind compute kernels.
    "xla_gpu_enable_highest_priority_async_stream": True,
    # Unrolls loops by two so that collective pipelining (on by default: FSDP's next-layer
    # all-gather and last-layer reduce-scatter inside the scan) can cross an iteration boundary.
    # MaxText also sets xla_gpu_enable_pipelined_{all_gather,reduce_scatter,all_reduce}: their
    # default is already true, and jaxlib 0.12 no longer accepts those names as options.
    "xla_gpu_enable_while_loop_double_buffering": True,
}

_TPU = {
    # Fuses collectives into asynchronous fusions that overlap with compute on the TensorCore,
    "xla_tpu_enable_async_collective_fusion": True,
    # ... spread over several steps of the schedule, to hide longer transfers.
    "xla_tpu_enable_async_collective_fusion_multiple_steps": True,
    # Overlaps those collectives with the TensorCore's compute.
    "xla_tpu_overlap_compute_collective_tc": True,
    # Issues all-gathers and all-reduces asynchronously (start/done pairs the scheduler can move).
    "xla_enable_async_all_gather": True,
    "xla_enable_async_all_reduce": True,
    # Data parallel: optimises the gradient all-reduce, also when the reduced arrays differ in size.
    "xla_tpu_enable_data_parallel_all_reduce_opt": True,
    "xla_tpu_data_parallel_opt_different_sized_ops": True,
    # No "windowed einsum" for FSDP's weight gathers (a GEMM whose all-gather runs as a loop of
    # collective permutes, chunk by chunk): the asynchronous gathers above already overlap, and it
    # kept ~0.35 GiB a layer more live at d24_2026's shape, which lmtiny.plan.memory cannot predict
    # (XLA:TPU's peak for cuts on v6e:2x4, fsdp=8, 8 sequences: 2 / 4 layers 2.25 / 4.88 GiB with
    # it, 2.02 / 3.95 without). Without it the whole step (the d24-v6e8 preset) reads 17.04 GiB.
    # Its reduce-scatter twin (the gradients) stays as XLA sets it.
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
}

# Per TPU generation (lmtiny.parallel.chips' name for jax's device_kind). Only a v5e fuses
# FSDP's weight all-gathers into those fusions too: jax 0.12's libtpu refuses the option on
# v4, v5p and v6e ("not supported/recommended on platforms other than TPU v5e ... incorrect
# results, hang, SDC"), and jax 0.10's took it silently.
_TPU_BY_CHIP = {"v5e": {"xla_tpu_enable_async_collective_fusion_fuse_all_gather": True}}

_PLATFORMS = {"cpu": _CPU, "gpu": _GPU, "cuda": _GPU, "rocm": _GPU, "tpu": _TPU}
# Where a user sets XLA options per platform; ours yield to any option named there.
_USER_VARIABLES = {"cpu": ("XLA_FLAGS",), "gpu": ("XLA_FLAGS",), "cuda": ("XLA_FLAGS",), "rocm": ("XLA_FLAGS",),
                   "tpu": ("LIBTPU_INIT_ARGS", "XLA_FLAGS")}


def user_flag_names(platform: str, environ: Mapping[str, str] | None = None) -> set[str]:
  """The XLA option names the user set for `platform` in its environment variables."""
  environ = os.environ if environ is None else environ
  text = " ".join(environ.get(name, "") for name in _USER_VARIABLES.get(platform, ()))
  return set(re.findall(r"--([A-Za-z0-9_]+)", text))


def compiler_options(platform: str | None = None, environ: Mapping[str, str] | None = None,
                     device_kind: str = "") -> dict:
  """Options for `jax.jit(..., compiler_options=...)` on `platform` (default: jax's backend) and
  its chip (`device_kind`, jax's name for it: a TPU generation's own options), less any the user
  set in the environment (`environ`, default os.environ)."""
  platform = platform or jax.default_backend()
  options = dict(_PLATFORMS.get(platform, {}))
  if platform == "tpu":
    options.update(_TPU_BY_CHIP.get(chip_of_device_kind(device_kind), {}))
  user = user_flag_names(platform, environ)
  return {name: value for name, value in options.items() if name not in user}


def device_options(device, environ: Mapping[str, str] | None = None) -> dict:
  """compiler_options() for the platform and chip of `device` (a jax Device)."""
  return compiler_options(device.platform, environ, device.device_kind)


def jit(fun: Callable, **jit_kwargs) -> Callable:
  """`jax.jit(fun, **jit_kwargs)` compiled with the options of jax's first device (its backend
  and chip), read at the first call (so that a module-level program starts no backend at import)."""
  return _DefaultBackendJit(fun, jit_kwargs)


class _DefaultBackendJit:

  def __init__(self, fun: Callable, jit_kwargs: dict):
    functools.update_wrapper(self, fun)  # __wrapped__, __name__: as jax.jit's
    self._fun, self._jit_kwargs = fun, jit_kwargs

  @functools.cached_property
  def _jitted(self):
    return jax.jit(self._fun, compiler_options=device_options(jax.devices()[0]), **self._jit_kwargs)

  def __call__(self, *args, **kwargs):
    return self._jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    return self._jitted.lower(*args, **kwargs)
