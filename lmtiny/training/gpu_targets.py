"""NVIDIA GPUs described for XLA:GPU, so that the train step compiles for them on a machine with
none (jax's CUDA plugin installed): `python -m lmtiny.bench --topology h100:8`.

XLA:GPU compiles for the device a GpuTargetConfig describes: the compute capability picks the
kernels, the SM count and memory bandwidth its cost model, the memory size the point past which
it rematerialises on its own. Memory and bandwidth are the figures lmtiny's plans use
(lmtiny.plan.counts.HBM_BYTES, lmtiny.plan.roofline.HBM_BANDWIDTH); the rest is each part's data
sheet. Nothing is autotuned without the GPU: XLA takes its default GEMM choices.
"""
from __future__ import annotations

from typing import NamedTuple

from lmtiny.plan import counts, roofline


class Gpu(NamedTuple):
  description: str       # what the CUDA driver calls it: jax's device_kind, lmtiny.parallel.chips
  capability: tuple[int, int]
  sms: int
  l2_bytes: int
  clock_ghz: float


GPUS = {
    "h100": Gpu("NVIDIA H100 80GB HBM3", (9, 0), 132, 50 * 2**20, 1.98),
    "h200": Gpu("NVIDIA H200", (9, 0), 132, 50 * 2**20, 1.98),
    "a100": Gpu("NVIDIA A100-SXM4-80GB", (8, 0), 108, 40 * 2**20, 1.41),
}
# The cuDNN a described GPU has, for XLA:GPU and for jax.nn's cuDNN attention (lowering.target):
# it gates features, not the lowering itself. The GPU runs of docs/performance.md had 9.19; jax
# 0.10.2's plugin wheels bring 9.28.
CUDNN_VERSION = (9, 24, 0)


def target_config(name: str) -> str:
  """The GpuTargetConfig (text proto) of GPU `name`, a key of GPUS."""
  gpu = GPUS[name]
  major, minor = gpu.capability
  cudnn_major, cudnn_minor, cudnn_patch = CUDNN_VERSION
  return f"""gpu_device_info {{
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: {227 * 1024 if major >= 9 else 163 * 1024}
  shared_memory_per_core: {228 * 1024 if major >= 9 else 164 * 1024}
  threads_per_core_limit: 2048
  core_count: {gpu.sms}
  fpus_per_core: {128 if major >= 9 else 64}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(roofline.HBM_BANDWIDTH[name])}
  l2_cache_size: {gpu.l2_bytes}
  clock_rate_ghz: {gpu.clock_ghz}
  device_memory_size: {int(counts.HBM_BYTES[name])}
}}
platform_name: "CUDA"
dnn_version_info {{ major: {cudnn_major} minor: {cudnn_minor} patch: {cudnn_patch} }}
device_description_str: "{gpu.description}"
"""
