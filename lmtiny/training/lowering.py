"""Lower the train step for a GPU or TPU this machine lacks, and say what the program calls.

    python -m lmtiny.bench --config configs/d20.py --lower-for cuda     # or: --lower-for tpu

Lowering (jit -> StableHLO) needs no device of the target kind; compiling and running do.
So this shows, on any machine, what the accelerator would be handed: which attention kernel
each layer calls (cuDNN fused attention with its mask type and packed-run bound, or splash's
Mosaic kernels), how often (a remat policy that reruns the attention forward doubles the
forward calls), and whether a [T, T] score tensor is left anywhere in the step.

cuDNN's jax entry point asks the CUDA plugin for the cuDNN version and the GPU for its compute
capability before it lowers; `target("cuda")` answers both as an H100 would (sm90, cuDNN 9.x)
for the duration of the lowering, and attention resolves `auto` as it would there. Under a
mesh, cuDNN's call is wrapped in XLA's custom partitioning and lowered per shard only when the
program is compiled: the count of those wrappers stands for it. Splash lowers fully (Mosaic).

    python -m lmtiny.bench --config configs/d20.py --topology v5e:2x4 [--config.mesh.fsdp=8 ...]

goes one step further for TPUs: with libtpu installed (`pip install -e ".[tpu]"`), XLA:TPU
compiles the step here for the devices of a slice described by name (libtpu's topology
description, as MaxText's ahead-of-time compile does), splash kernels included, and its memory
analysis is the real per-chip figure, no TPU needed.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from collections import Counter

import jax
import numpy as np
from jax.experimental import topologies

from lmtiny import config as config_lib
from lmtiny.errors import ConfigError, first_line
from lmtiny.kernels import pallas_cross_entropy
from lmtiny.model import attention as attn_lib
from lmtiny.parallel import sharding
from lmtiny.plan.units import human_bytes
from lmtiny.runs.checkpoint import abstract_with_shardings
from lmtiny.training import gpu_targets, hlo_cost
from lmtiny.training.objectives import TOKEN_KEYS
from lmtiny.training.resolved import resolve_run
from lmtiny.training.steps import build_steps

PLATFORMS = ("cuda", "tpu")
H100_CAPABILITY = gpu_targets.GPUS["h100"].capability  # what `target("cuda")` answers jax's probes with
CUDNN_VERSION = int("{}{:02d}{:02d}".format(*gpu_targets.CUDNN_VERSION))  # as cudnnGetVersion() encodes it
CUDNN_CALLS = {"__cudnn$fmhaSoftmax": "forward", "__cudnn$fmhaSoftmaxBackward": "backward"}


def check_platform(platform: str) -> None:
  if platform not in PLATFORMS:
    raise ConfigError(f"--lower-for={platform!r}: must be one of {', '.join(PLATFORMS)}")


@contextlib.contextmanager
def target(platform: str):
  """Attention built for `platform` ("cuda" or "tpu") while the block runs; restored after."""
  check_platform(platform)
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha  # pylint: disable=g-import-not-at-top
  probes = {"check_cudnn_version": lambda: CUDNN_VERSION,
            "check_compute_capability": lambda c: tuple(int(x) for x in c.split(".")) <= H100_CAPABILITY,
            "is_cuda_compute_capability_equal": lambda c: tuple(int(x) for x in c.split(".")) == H100_CAPABILITY}
  saved_probes = {name: getattr(cudnn_fmha, name) for name in probes}
  saved_target = dict(attn_lib.LOWERING_TARGET)
  attn_lib.LOWERING_TARGET.update(platform="gpu" if platform == "cuda" else "tpu",
                                  gpu_capability=H100_CAPABILITY if platform == "cuda" else None)
  if platform == "cuda":
    for name, probe in probes.items():
      setattr(cudnn_fmha, name, probe)
  try:
    yield
  finally:
    attn_lib.LOWERING_TARGET.update(saved_target)
    for name, probe in saved_probes.items():
      setattr(cudnn_fmha, name, probe)


def for_platform(cfg, platform: str):
  """A copy of cfg with the choices `auto` makes on that platform made: bf16 compute, and the
  attention backend lmtiny.model.attention picks there for the config's training rows (packed with
  data.document_mask)."""
  check_platform(platform)
  cfg = cfg.copy_and_resolve_references()
  m = cfg.model
  if m.dtype == "auto":
    m.dtype = "bfloat16"
  m.attention = attn_lib.resolve_impl(m.attention, m.dtype, platform="gpu" if platform == "cuda" else "tpu",
                                      seq_len=cfg.train.seq_len, packed=cfg.data.document_mask,
                                      gpu_capability=H100_CAPABILITY if platform == "cuda" else None)
  return cfg


def lower_train_step(cfg, platform: str, mesh=None) -> tuple[str, float, object]:
  """(StableHLO text of the trainer's jitted step for `platform`, seconds, the config lowered)."""
  lowered, seconds, cfg, _ = _lowered_train_step(cfg, platform, mesh)
  return lowered.as_text(), seconds, cfg


def _lowered_train_step(cfg, platform: str | None = None, mesh=None, devices=None):
  """(the trainer's jitted step lowered on abstract inputs, seconds, the config, the mesh): for
  this machine's backend, or for `platform` as `auto` resolves there; the mesh config is laid
  over `devices` (default: this machine's) unless a mesh is given."""
  if platform is not None:
    cfg = for_platform(cfg, platform)
  run = resolve_run(cfg, mesh, devices=devices)
  cfg, mesh = run.cfg, run.mesh
  t0 = time.perf_counter()
  with target(platform) if platform is not None else contextlib.nullcontext():
    steps = build_steps(cfg, mesh, total_steps=2)
    rows, t = config_lib.global_batch_size(cfg.train), cfg.train.seq_len
    batch = {k: jax.ShapeDtypeStruct((rows, t), np.float32 if k == "loss_mask" else np.int32,
                                     sharding=steps.batch_sharding) for k in TOKEN_KEYS}
    with jax.set_mesh(mesh):
      state = abstract_with_shardings(steps.abstract_state, steps.state_shardings)
      traced = steps.train_step.trace(state, batch)
      lowered = traced.lower() if platform is None else traced.lower(lowering_platforms=(platform,))
  return lowered, time.perf_counter() - t0, cfg, mesh


def compile_train_step(cfg, platform: str | None = None, devices=None, compiler_options=None):
  """XLA's compile of the trainer's step on abstract inputs (nothing allocated, nothing run), as
  (compiled, seconds, the config compiled, mesh): for this machine's devices, or for `devices`
  of `platform` (a described TPU slice: tpu_devices); `compiler_options` go to XLA."""
  lowered, lower_s, cfg, mesh = _lowered_train_step(cfg, platform, devices=devices)
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile(compiler_options=compiler_options)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):  # only the compiler's "it does not fit" is the config's
      raise
    raise ConfigError(f"the step does not fit the chip (mesh {dict(mesh.shape)}): {first_line(e).rstrip('.')}; shard "
                      "it further (mesh.fsdp), run fewer sequences per micro-step (train.device_batch_size) "
                      "or rematerialise (model.remat)") from None
  return compiled, lower_s + time.perf_counter() - t0, cfg, mesh

# libtpu probes the TPU VM it expects to run on (metadata server, worker hostnames, accelerator
# type) when it loads, and logs errors where there is none; a topology needs none of it. Its
# lockfile keeps a second process off the chips: compiling for described ones needs no lock.
_OFF_TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost", "TPU_ACCELERATOR_TYPE": "v5litepod-1",
                "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
TOPOLOGY_EXAMPLES = "v5e:2x4, v5p:2x2x2, v6e:4x4, v4:2x2x1"


def tpu_devices(topology: str) -> list:
  """The devices of the TPU slice `topology` names (libtpu's topology description: "v5e:2x4" is
  a v5e-8), for XLA:TPU to compile for on this machine; nothing can run on them."""
  try:
    import libtpu  # noqa: F401  (only whether it imports)
  except ImportError:
    raise ConfigError(f"--topology={topology}: compiling for a TPU slice needs libtpu: "
                                 "pip install -e '.[tpu]'") from None
  for name, value in _OFF_TPU_ENV.items():
    os.environ.setdefault(name, value)
  try:
    try:
      return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:  # pylint: disable=broad-except
      # A slice smaller than libtpu's default host (2x2 chips), e.g. "v5e:1x1", is one host.
      dims = re.fullmatch(r"\w+:(\d+)x(\d+)(?:x(\d+))?", topology)
      if "chips_per_host_bounds" not in str(e) or dims is None:
        raise
      bounds = [int(d or 1) for d in dims.groups()]
      return list(topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                               chips_per_host_bounds=bounds).devices)
  except Exception as e:  # pylint: disable=broad-except  # libtpu's own error types
    reason = first_line(e)
    raise ConfigError(f"--topology={topology!r}: libtpu cannot describe it ({reason}); "
                                 f"names look like {TOPOLOGY_EXAMPLES}") from None


GPU_TOPOLOGY = re.compile(r"(\w+):(\d+)")


def gpu_devices(topology: str) -> list:
  """The devices of `topology`, "<gpu>:<count>" of one host ("h100:8": lmtiny.training.gpu_targets
  names the GPUs), for XLA:GPU to compile for on this machine; nothing can run on them."""
  gpu = GPU_TOPOLOGY.fullmatch(topology)
  if gpu is None or gpu.group(1) not in gpu_targets.GPUS:
    raise ConfigError(f"--topology={topology}: GPUs are named {', '.join(gpu_targets.GPUS)} (e.g. h100:8); "
                      f"TPU slices look like {TOPOLOGY_EXAMPLES}")
  name, count = gpu.groups()
  if not 1 <= int(count) <= 8:
    raise ConfigError(f"--topology={topology}: one host of 1 to 8 GPUs")
  try:
    import jax_plugins.xla_cuda12  # noqa: F401  (only whether it imports)
  except ImportError:
    raise ConfigError(f"--topology={topology}: compiling for a GPU needs jax's CUDA plugin: "
                      f"pip install 'jax-cuda12-plugin[with-cuda]=={jax.__version__}'") from None
  if not jax.config.jax_platforms:
    # The plugin checks the CUDA driver when it loads unless the platforms asked for leave CUDA
    # out; a machine without a GPU has none. The described GPUs need no driver.
    jax.config.update("jax_platforms", "cpu")
  try:
    return list(topologies.get_topology_desc(platform="cuda", target_config=gpu_targets.target_config(name),
                                             topology=f"1x1x{count}").devices)
  except NotImplementedError:  # jax registered no CUDA topologies: the plugin failed as it loaded
    raise ConfigError(f"--topology={topology}: jax's CUDA plugin did not load (jax logged why); on a machine "
                      "without a GPU run with JAX_PLATFORMS=cpu") from None


def compile_for_topology(cfg, topology: str):
  """XLA:TPU's compile of the trainer's step for the slice `topology` names, or XLA:GPU's for
  the GPUs it names ("h100:8"), as (compiled, seconds, the config compiled, mesh): the mesh
  config is laid over their devices."""
  if GPU_TOPOLOGY.fullmatch(topology):
    return compile_train_step(cfg, "cuda", gpu_devices(topology))
  return compile_train_step(cfg, "tpu", tpu_devices(topology))

def _tensor_bytes(shape: str) -> int:
  *dims, dtype = shape.split("x")
  return int(np.prod([int(d) for d in dims], dtype=np.int64) * hlo_cost.dtype_bytes(dtype))


def _call_counts(text: str, vocab: int = 0) -> Counter:
  """How many times each custom call runs per step: its sites in each function, multiplied out
  through the calls from @main (jax outlines repeated sub-programs, e.g. splash's wrapper, into
  private functions called once per layer). A kernel is named by its Mosaic kernel_name when it
  has one, else by its custom-call target. With `vocab`, "lm_head_gemm" counts the sites of
  dot_generals with a vocab-wide operand or result (a loop body's site counts once: the loss's
  GEMMs, whatever its chunking)."""
  direct, calls = {}, {}
  for chunk in re.split(r"\n(?=\s*func\.func )", text):
    head = re.match(r"\s*func\.func (?:public |private )?@([\w$.]+)", chunk)
    if head is None:
      continue
    name = head.group(1)
    direct[name] = Counter()
    for line in chunk.splitlines():
      site = re.search(r"custom_call @([\w$]+)\(", line)
      if site:
        kernel = re.search(r'kernel_name = "(\w+)"', line)
        direct[name][kernel.group(1) if kernel else site.group(1)] += 1
      # vocab-wide after some other dimension: a [tokens, D] operand whose token count happens to
      # equal the vocab (d24_2026: 16 x 2048 = 32,768) is a block GEMM, not the lm_head's
      if vocab and "stablehlo.dot_general" in line and re.search(rf"tensor<(\d+x)+{vocab}x", line):
        direct[name]["lm_head_gemm"] += 1
    calls[name] = Counter(re.findall(r"(?<!custom_)call @([\w$.]+)\(", chunk))
  totals: dict[str, Counter] = {}

  def total(name: str) -> Counter:
    if name not in totals:
      out = Counter(direct.get(name, {}))
      for callee, n in calls.get(name, {}).items():
        for key, m in total(callee).items():
          out[key] += n * m
      totals[name] = out
    return totals[name]

  return total("main")


# XLA's cross-device sums in a compiled (HLO) module, async forms and TPU's fused all-reduce-scatter
# included; and its collective-permutes, the ring steps it decomposes some all-gathers and
# reduce-scatters into (XLA:TPU does so for scanned layers under FSDP).
_REDUCTION_OP = re.compile(r"\s*(?:ROOT )?%\S+ = (.*?) (?:(?:all-reduce|reduce-scatter)(?:-start)?\(|fusion\(.*calls=%all-reduce-scatter)")
_PERMUTE_OP = re.compile(r"\s*(?:ROOT )?%\S+ = (.*?) collective-permute(?:-start)?\(")


def _weight_sized(pattern, hlo_text: str) -> Counter:
  """Element types of the rank >= 2 results (weight-sized: scalar sums are left out) of the ops
  `pattern` matches, counted."""
  counts = Counter()
  for line in hlo_text.splitlines():
    m = pattern.match(line)
    if m:
      counts.update(dtype for dtype, dims in re.findall(r"\b([a-z]+\d+)\[([\d,]+)\]", m.group(1)) if "," in dims)
  return counts


def gradient_reductions(hlo_text: str) -> Counter:
  """How many weight-sized arrays XLA's compiled step sums across devices (all-reduce,
  reduce-scatter), by element type. Under data or FSDP parallelism these are the weight
  gradients; a bf16 count means gradients rounded to bf16 before they are summed."""
  return _weight_sized(_REDUCTION_OP, hlo_text)


def loop_bodies(hlo_text: str) -> str:
  """The text of the computations a compiled (HLO) module runs as `while` bodies: what runs once
  per iteration (the step's micro-step loop, scanned layers)."""
  bodies = set(re.findall(r"\bwhile\(.*?\bbody=%([\w.\-]+)", hlo_text))
  return "\n".join(text for name, _, text in hlo_cost.computations(hlo_text) if name in bodies)


def max_reductions(hlo_text: str, within: str | None = None) -> list[str]:
  """The jax op names of the all-reduces with a max reduction in a compiled (HLO) module (all of
  them, or those in the text `within`, e.g. `loop_bodies(hlo_text)`): an fp8 scale's global amax
  left to the partitioner is one; the vocab-parallel loss's `pmax` another."""
  maxima = {name for name, is_entry, text in hlo_cost.computations(hlo_text)
            if not is_entry and re.search(r"ROOT %\S+ = \w+\[\] maximum\(", text)}
  names = []
  for line in (hlo_text if within is None else within).splitlines():
    reduction = re.search(r"all-reduce(?:-start)?\(.*\bto_apply=%([\w.\-]+)", line)
    if reduction and reduction.group(1) in maxima:
      op_name = re.search(r'op_name="([^"]*)"', line)
      names.append(op_name.group(1) if op_name else "")
  return names


def ring_steps(hlo_text: str) -> Counter:
  """Weight-sized collective-permutes by element type: the steps of the rings XLA builds for
  all-gathers (of bf16 weights) and reduce-scatters (of gradients) it decomposes."""
  return _weight_sized(_PERMUTE_OP, hlo_text)


_RELAYOUT_OP = re.compile(r"^\s*(?:ROOT )?%\S+ = ([a-z]+\d*)\[([\d,]*)\]\S* (?:copy|transpose)\(", re.M)


def relayout_bytes(hlo_text: str) -> int:
  """Bytes the copies and transposes of a compiled (HLO) module write outside fusions, each site
  once (a while body's once, not per iteration): XLA moving whole arrays from one layout to
  another between the ops that compute them."""
  fused = set(re.findall(r"\bfusion\(.*?\bcalls=%([\w.\-]+)", hlo_text))
  return int(hlo_cost.nbytes((tuple(int(d) for d in dims.split(",") if d), dtype)
                             for name, _, text in hlo_cost.computations(hlo_text) if name not in fused
                             for dtype, dims in _RELAYOUT_OP.findall(text)))


_BF16_SUM = re.compile(r"stablehlo\.reduce\(.*applies stablehlo\.add.*: \(tensor<((?:\d+x){3,})bf16>, tensor<bf16>\)")


def bf16_sums(text: str) -> list[str]:
  """The reduce-adds in lowered StableHLO that sum a rank >= 3 tensor into a bf16 accumulator: in
  a bf16 train step, a scalar's gradient summed over batch x sequence x width at bf16 precision
  (a float32 scalar cast to bf16 before it multiplies an activation makes one)."""
  return [line.strip() for line in text.splitlines() if _BF16_SUM.search(line)]


def model_widths(m) -> set[int]:
  """Every width a tensor of the model has besides the sequence (a [.., T, T] search is blind
  when T is one of them: d32's [B, T, D] is [B, 2048, 2048])."""
  h, k, dh = m.num_heads, config_lib.num_kv_heads(m), config_lib.head_dim(m)
  return {m.d_model, config_lib.mlp_dim(m), m.vocab_size, h * dh, k * dh}


def summarize(text: str, seq_len: int, widths: set[int] = frozenset(), vocab: int = 0) -> dict:
  """What a lowered program calls: attention kernels per step, cuDNN mask types and packed-run
  bounds, custom-partitioned calls, tensor types with a [T, T] tail (None: not told apart,
  T is in `widths`), the lm_head GEMMs and the largest float32 [.., V] type (with `vocab`), and
  the largest types."""
  calls = _call_counts(text, vocab)
  tensors = Counter(re.findall(r"tensor<((?:\d+x)+[a-z]+\d+)>", text))
  vocab_f32 = sorted((s for s in tensors if vocab and re.search(rf"(^|x){vocab}xf32$", s) and s.count("x") > 1),
                     key=_tensor_bytes, reverse=True)
  square = None if seq_len in widths else {
      s: n for s, n in tensors.items() if re.search(rf"(^|x){seq_len}x{seq_len}x[a-z]+\d+$", s)}
  largest = sorted(tensors, key=_tensor_bytes, reverse=True)[:4]
  return {"cudnn": {role: calls.get(name, 0) for name, role in CUDNN_CALLS.items()},
          "partitioned": calls.get("CustomSPMDPartitioning", 0),
          "splash": {k: n for k, n in calls.items() if k.startswith("splash_")},
          "loss_kernels": {k: n for k, n in calls.items() if k in pallas_cross_entropy.KERNEL_NAMES},
          "mask_types": sorted(set(re.findall(r"mask_type\\22: \\22(\w+)\\22", text))),
          "max_runs": sorted({int(x) for x in re.findall(r"max_seg_per_batch\\22: (?:\\22)?(\d+)", text)}),
          "windows": sorted({int(x) for x in re.findall(r"sliding_window_length\\22: (\d+)", text)} - {0}),
          "square": square, "largest": [(s, _tensor_bytes(s), tensors[s]) for s in largest],
          "lm_head_gemms": calls.get("lm_head_gemm", 0), "bf16_sums": len(bf16_sums(text)),
          "vocab_f32": [(s, _tensor_bytes(s), tensors[s]) for s in vocab_f32[:1]]}


def format_summary(s: dict, cfg, platform: str, seconds: float, mesh_shape: dict) -> str:
  m = cfg.model
  body = "the layer body appears once (scan)" if m.scan_layers else f"{m.num_layers} layers unrolled"
  lines = [f"lowered      for {platform} in {seconds:.1f} s ({'sm90, cuDNN 9.x assumed' if platform == 'cuda' else 'Mosaic'}), "
           f"mesh {mesh_shape}, attention={m.attention}, dtype {m.dtype}, remat {m.remat}; {body}"]
  if any(s["cudnn"].values()):
    lines.append(f"attention    cuDNN fused attention: {s['cudnn']['forward']} forward, {s['cudnn']['backward']} backward "
                 f"calls; mask {', '.join(sorted(s['mask_types'])) or '-'}; packed runs per row <= "
                 f"{', '.join(map(str, s['max_runs'])) or '-'}"
                 + (f"; sliding windows of {', '.join(map(str, s['windows']))} keys" if s.get("windows") else ""))
  if s["splash"]:
    lines.append("attention    splash (Mosaic): " + ", ".join(f"{k} x{v}" for k, v in sorted(s["splash"].items())))
  if s["partitioned"]:
    lines.append(f"partitioned  {s['partitioned']} custom-partitioned calls (cuDNN attention under a mesh, "
                 "partitioned and lowered per shard when XLA compiles)")
  if not (any(s["cudnn"].values()) or s["splash"] or s["partitioned"]):
    lines.append("attention    no fused kernel: XLA attention")
  if s["square"] is None:
    lines.append(f"[T, T]       not checked: T = {cfg.train.seq_len} is also a model width")
  else:
    square = ", ".join(f"{k} x{v}" for k, v in sorted(s["square"].items()))
    lines.append(f"[T, T]       {square or 'none'} (T = {cfg.train.seq_len})")
  if s.get("lm_head_gemms") or s.get("loss_kernels"):
    widest = ", ".join(f"{shape} ({human_bytes(n)}) x{count}" for shape, n, count in s["vocab_f32"]) or "none"
    kernels = "".join(f", {k} x{n}" for k, n in sorted(s.get("loss_kernels", {}).items()))
    lines.append(f"loss         {m.loss_kernel} kernel: {s['lm_head_gemms']} lm_head GEMMs{kernels}; "
                 f"largest float32 [.., V] {widest}")
  lines.append(f"bf16 sums    {s['bf16_sums']} reductions of rank >= 3 tensors with a bf16 accumulator"
               + ("" if not s["bf16_sums"] else " (gradients summed at bf16 precision)"))
  lines.append("largest      " + ", ".join(f"{shape} ({human_bytes(n)}) x{count}" for shape, n, count in s["largest"]))
  return "\n".join(lines)


def report(cfg, platform: str) -> tuple[str, str]:
  """(the lowered step's StableHLO text, the summary bench --lower-for prints)."""
  text, seconds, lowered_cfg = lower_train_step(cfg, platform)
  mesh_shape = sharding.mesh_shape(cfg.mesh, jax.device_count())
  summary = summarize(text, cfg.train.seq_len, model_widths(lowered_cfg.model), lowered_cfg.model.vocab_size)
  return text, format_summary(summary, lowered_cfg, platform, seconds, mesh_shape)
