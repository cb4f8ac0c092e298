"""What fits a chip, and how fast: `python -m lmtiny.arch --config ... --fit CHIP [--chips N]`.

The search: every mesh (data x fsdp x tensor = N chips; tensor dividing the heads; data x fsdp
dividing the global batch's sequences) x every remat policy (model.remat) x every device batch
size (train.device_batch_size, dividing the sequences each data-parallel device gets, so the
accumulation count keeps train.batch_tokens what the config says). A plan fits when
lmtiny.plan.memory's estimate of its step stays under `usable` of the chip's memory (default
memory.PLAN_HEADROOM: 80% of a TPU chip, where the estimate reads 0.93x-1.05x XLA:TPU's own
figure, and 80% of a GPU, where it reads 1.04x-1.09x XLA:GPU's on an H100). For each mesh and
policy the largest device batch that fits is the plan; plans rank by tokens/s.

The speed rule, simple on purpose:
    step seconds = batch_tokens x (training FLOPs per token + the remat policy's recompute)
                   / (chips x dense bf16 peak x MFU)
                 + (accumulation - 1) x (4 x N / tensor + 10 x N per chip) bytes / memory bandwidth
- MFU (--mfu) is what a plan that recomputes nothing and takes one micro-step per step reaches;
  every plan runs its FLOPs at that rate. Training FLOPs are 6 N_matmul + causal-half attention
  (lmtiny.plan.counts).
- Recompute: the forward matmuls jax.checkpoint reruns in the backward because the policy saved
  their outputs nowhere, 2 FLOPs per weight per token (the MLP's down projection never: its
  output feeds only the residual sum, which the backward does not need): full reruns q, k, v,
  o, the MLP's up (and gate) projections and the attention forward; save_attn_out the same less
  the attention; save_qkv o and up (and q and k under model.qk_norm, whose backward needs them);
  minimal, dots_no_batch and dots none (none saves all). The xla attention path (no fused
  kernel: GPUs before Hopper) also reruns Q K^T under every policy but none and dots. Checked
  against the matmuls of the lowered step (tests/plan/test_fit.py).
- Each micro-step past the first re-reads the whole bf16 weights forward and backward (2 x 2
  bytes a parameter, gathered under FSDP, split by tensor) and adds its bf16 gradient into the
  float32 accumulator (4 read + 4 written + 2 bytes a parameter per chip), at the chip's memory
  bandwidth, not overlapped. A larger micro-batch is faster only through fewer micro-steps.
- Collectives are not modelled. Plans within 1% of the fastest count as equally fast; among them
  the one that communicates least ranks first (data before fsdp before tensor), then the policy
  that reruns the least elementwise work, then the smaller memory (`rank`).
Importing this module does not import JAX.
"""
from __future__ import annotations

import copy
import dataclasses
import re

from lmtiny import config as config_lib
from lmtiny.errors import ConfigError
from lmtiny.plan import counts, memory, recipe, roofline
from lmtiny.plan.units import duration, human

GIB = memory.GIB
SAME_SPEED = 0.01  # plans this close in tokens/s rank by communication (rank)
WEIGHT_READ_BYTES, ACCUMULATE_BYTES = 4.0, 10.0  # per parameter per extra micro-step (module docstring)
# The policies searched, fastest first at equal FLOPs (dots_no_batch is minimal's former name).
POLICIES = ("none", "minimal", "dots", "save_qkv", "save_attn_out", "full")


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str          # counts.PEAK_FLOPS key (whose speed --memory alone plans at)
  label: str         # what the table calls it
  memory: float      # bytes per chip
  peak: float        # dense bf16 FLOP/s
  bandwidth: float   # memory bytes/s
  attention: str     # what model.attention=auto runs there for packed training rows


# The chips --fit names (aliases in ALIASES). Attention under `auto` for packed rows is what
# lmtiny.model.attention.resolve_impl picks: cuDNN on Hopper, XLA (with its [T, T] scores) on
# older GPUs, splash on TPUs (`for_rows`: rows without the document mask run cuDNN on all GPUs).
FIT_CHIPS = {
    "h100": ("H100 SXM 80 GB", "cudnn"), "a100": ("A100 80 GB", "xla"), "a100_40": ("A100 40 GB", "xla"),
    "l4": ("L4 24 GB", "xla"), "rtx4090": ("RTX 4090 24 GB", "xla"), "rtx3090": ("RTX 3090 24 GB", "xla"),
    "rtx3080": ("RTX 3080 10 GB", "xla"), "v5e": ("TPU v5e (16 GiB)", "splash"),
    "v5p": ("TPU v5p (95 GiB)", "splash"), "v6e": ("TPU v6e (32 GiB)", "splash"),
}
# Other spellings, compared without '-', '_' and spaces (so "RTX-4090" and "a100-40" work too).
ALIASES = {"4090": "rtx4090", "3090": "rtx3090", "3080": "rtx3080", "a10080": "a100", "a10040gb": "a100_40",
           "a10080gb": "a100", "h10080": "h100", **{k.replace("_", ""): k for k in FIT_CHIPS}}
_UNITS = {"gib": 2**30, "gb": 1e9, "mib": 2**20, "mb": 1e6, "tib": 2**40, "tb": 1e12}


def parse_memory(text: str) -> float:
  """'24GiB' -> 24 * 2**30 bytes, '10GB' -> 10e9 (also MiB, MB, TiB, TB); a unit is required."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", text or "")
  if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
    raise ConfigError(f"--memory={text!r}: expected a positive size with a unit, e.g. 24GiB or 10GB "
                      "(units: GiB, GB, MiB, MB, TiB, TB)")
  return float(m.group(1)) * _UNITS[m.group(2).lower()]


def chip_key(name: str) -> str:
  """'RTX-4090' / '4090' / 'rtx4090' -> 'rtx4090'; ConfigError for a chip --fit does not know."""
  key = ALIASES.get(re.sub(r"[-_\s]", "", name.lower()))
  if key is None:
    raise ConfigError(f"--fit={name!r}: unknown chip; choose one of {', '.join(FIT_CHIPS)} "
                      f"(or give --memory SIZE)")
  return key


def chip(name: str | None, memory_text: str | None = None, speed_of: str = "h100") -> Chip:
  """The chip --fit names, its memory replaced by --memory when given; --memory alone plans that
  memory at `speed_of`'s peak and bandwidth (a PEAK_FLOPS key; its attention backend too)."""
  key = chip_key(name) if name else speed_of
  if key not in counts.PEAK_FLOPS or key not in roofline.HBM_BANDWIDTH:
    raise ConfigError(f"--chip={key!r}: --memory plans at a GPU's or TPU's speed: one of {', '.join(FIT_CHIPS)}")
  label, attention = FIT_CHIPS.get(key, (key, "xla"))
  if memory_text is None:
    return Chip(key, label, counts.HBM_BYTES[key], counts.PEAK_FLOPS[key], roofline.HBM_BANDWIDTH[key], attention)
  size = parse_memory(memory_text)
  return Chip(key, f"{memory_text.strip()} chip at {key}'s speed", size,
              counts.PEAK_FLOPS[key], roofline.HBM_BANDWIDTH[key], attention)


def platform(c: Chip) -> str:
  """"tpu" for the TPU chips (v5e, v5p, v6e), else "gpu": how lmtiny.plan.memory counts the loss."""
  return "tpu" if c.name.startswith("v") else "gpu"


def usable_share(c: Chip, usable: float | None) -> float:
  """`usable`, or by default the share of the chip a plan may use on its platform."""
  return memory.PLAN_HEADROOM[platform(c)] if usable is None else usable


def for_rows(c: Chip, cfg) -> Chip:
  """The chip as the config's rows run on it: FIT_CHIPS holds the backend for packed rows, but
  without data.document_mask every row is one causal sequence, which cuDNN runs on every GPU
  listed (only its packed layout needs Hopper)."""
  if cfg.data.document_mask or c.attention != "xla" or platform(c) == "tpu":
    return c
  return dataclasses.replace(c, attention="cudnn")


def recompute_flops_per_token(m, seq_len: int, remat: str, attention: str = "splash") -> float:
  """Forward FLOPs per token the backward reruns under `remat` (see the module docstring), with
  attention run by `attention` (xla keeps no fused kernel's residuals: it reruns the scores)."""
  hd, kv, f = config_lib.head_dim(m), config_lib.num_kv_heads(m), config_lib.mlp_dim(m)
  d, q = m.d_model, m.num_heads * hd
  qk, v, o = 2 * d * (q + kv * hd), 2 * d * kv * hd, 2 * q * d
  up = 2 * (2 if m.activation == "swiglu" else 1) * d * f
  per_layer = {"none": 0, "minimal": 0, "dots_no_batch": 0, "dots": 0,
               "save_qkv": o + up + (qk if m.qk_norm else 0),  # QK-norm's backward needs the projections
               "save_attn_out": qk + v + o + up, "full": qk + v + o + up}[remat]
  attention_forward = counts.inference_flops_per_token(m, seq_len) - 2 * counts.matmul_params(m)
  if remat == "full":
    per_layer_attention = attention_forward  # the whole attention forward, kernel or not
  elif attention == "xla" and remat not in ("none", "dots"):
    per_layer_attention = attention_forward / 2  # Q K^T again, for the probabilities
  else:
    per_layer_attention = 0.0
  return m.num_layers * per_layer + per_layer_attention


@dataclasses.dataclass(frozen=True)
class Plan:
  data: int
  fsdp: int
  tensor: int
  device_batch_size: int
  remat: str
  accumulation: int
  bytes: float        # lmtiny.plan.memory's estimate per chip
  fits: bool
  step_s: float
  tokens_per_s: float
  mfu: float          # model FLOPs (6N + attention) utilisation the plan reaches
  horizon_s: float    # the run's steps x step_s

  def overrides(self) -> str:
    """The plan as config overrides lmtiny.train (and launch/speedrun.sh) accept verbatim."""
    return (f"--config.train.device_batch_size={self.device_batch_size} --config.model.remat={self.remat} "
            f"--config.mesh.data={self.data} --config.mesh.fsdp={self.fsdp} --config.mesh.tensor={self.tensor}")


def with_plan(cfg, plan: Plan):
  """A copy of cfg with the plan's overrides applied (what pasting them does)."""
  cfg = copy.deepcopy(cfg)
  cfg.train.device_batch_size = plan.device_batch_size
  cfg.model.remat = plan.remat
  cfg.mesh.update(data=plan.data, fsdp=plan.fsdp, tensor=plan.tensor)
  return cfg


# libtpu topology names (lmtiny.training.lowering.tpu_devices) for --check's slices, by chip count.
_TOPOLOGIES = {"v5e": {1: "1x1", 4: "2x2", 8: "2x4"}, "v6e": {1: "1x1", 4: "2x2", 8: "2x4"},
               "v5p": {1: "1x1x1", 4: "2x2x1", 8: "2x2x2"}}


def topology(c: Chip, chips: int) -> str:
  """The TPU slice --check compiles for: 'v5e:2x4' for 8 v5e chips."""
  if c.name not in _TOPOLOGIES or chips not in _TOPOLOGIES[c.name]:
    raise ConfigError(f"--check compiles with XLA:TPU for 1, 4 or 8 chips of {', '.join(_TOPOLOGIES)} "
                      f"(got {chips} x {c.name})")
  return f"{c.name}:{_TOPOLOGIES[c.name][chips]}"


def meshes(cfg, chips: int) -> list[tuple[int, int, int]]:
  """(data, fsdp, tensor) with product `chips`, tensor dividing the query and kv heads and
  data x fsdp dividing the global batch's sequences; least communication first."""
  if chips < 1:
    raise ConfigError(f"--chips={chips}: must be >= 1")
  m, sequences = cfg.model, config_lib.global_batch_size(cfg.train)
  out = []
  for tensor in (t for t in range(1, chips + 1) if chips % t == 0):
    if m.num_heads % tensor or config_lib.num_kv_heads(m) % tensor:
      continue
    if tensor > 1 and cfg.train.grad_reduce == "step":
      continue  # config.validate: grad_reduce=step needs mesh.tensor=1
    for fsdp in (f for f in range(1, chips // tensor + 1) if (chips // tensor) % f == 0):
      data = chips // tensor // fsdp
      if sequences % (data * fsdp) == 0:
        out.append((data, fsdp, tensor))
  return sorted(out, key=lambda x: (x[2], x[1]))


def _plan(trial, mesh: tuple[int, int, int], dbs: int, c: Chip, chips: int, mfu: float, usable: float,
          steps: int) -> Plan:
  data, fsdp, tensor = mesh
  trial.train.device_batch_size = dbs
  est = memory.estimate(trial, {"data": data, "fsdp": fsdp, "tensor": tensor}, attention=c.attention,
                        platform=platform(c))
  m, t = trial.model, trial.train
  accumulation = config_lib.global_batch_size(t) // (data * fsdp) // dbs
  model_flops = counts.train_flops_per_token(m, t.seq_len)
  flops = t.batch_tokens * (model_flops + recompute_flops_per_token(m, t.seq_len, m.remat, c.attention))
  micro_bytes = WEIGHT_READ_BYTES * counts.count_params(m) / tensor + ACCUMULATE_BYTES * est["params"] / 4.0
  step_s = flops / (chips * c.peak * mfu) + (accumulation - 1) * micro_bytes / c.bandwidth
  return Plan(data, fsdp, tensor, dbs, trial.model.remat, accumulation, est["total"], est["total"] <= usable * c.memory,
              step_s, t.batch_tokens / step_s, t.batch_tokens * model_flops / (step_s * chips * c.peak),
              steps * step_s)


def search(cfg, c: Chip, chips: int = 1, mfu: float = 0.4, usable: float | None = None
           ) -> tuple[list[Plan], Plan | None]:
  """(the plans that fit, fastest first: for each mesh and remat policy the largest device batch
  that fits; the smallest plan by memory when none fits, else None). `usable`: the share of the
  chip a plan may use (default usable_share's)."""
  usable = usable_share(c, usable)
  if not 0 < mfu <= 1:
    raise ConfigError(f"--mfu={mfu}: must be in (0, 1]")
  if not 0 < usable <= 1:
    raise ConfigError(f"--usable={usable}: must be in (0, 1]")
  cfg, c = recipe.resolve(cfg), for_rows(c, cfg)
  steps = config_lib.total_steps(cfg, recipe.horizon_params(cfg.model, cfg.train))
  sequences = config_lib.global_batch_size(cfg.train)
  fitting, smallest = [], None
  for mesh in meshes(cfg, chips):
    per_device = sequences // (mesh[0] * mesh[1])
    sizes = [d for d in range(per_device, 0, -1) if per_device % d == 0]
    for remat in (p for p in POLICIES if p != "dots" or c.attention == "xla"):  # else dots saves what minimal does
      trial = copy.deepcopy(cfg)
      trial.model.remat = remat
      for dbs in sizes:
        plan = _plan(trial, mesh, dbs, c, chips, mfu, usable, steps)
        if plan.fits:
          fitting.append(plan)
          break
      else:
        if smallest is None or plan.bytes < smallest.bytes:
          smallest = plan
  return rank(fitting), (None if fitting else smallest)


def rank(plans: list[Plan], within: float = SAME_SPEED) -> list[Plan]:
  """Fastest first, where the plans within `within` of the fastest left count as one speed:
  among those, the least communication (tensor, then fsdp degree), the least elementwise
  recompute (POLICIES' order), the least memory."""
  order = {p: i for i, p in enumerate(POLICIES)}
  left, out = sorted(plans, key=lambda p: -p.tokens_per_s), []
  while left:
    group = [p for p in left if p.tokens_per_s >= (1 - within) * left[0].tokens_per_s]
    out += sorted(group, key=lambda p: (p.tensor, p.fsdp, order[p.remat], p.bytes))
    left = left[len(group):]
  return out


def _row(p: Plan, c: Chip) -> str:
  return (f"{f'{p.data}/{p.fsdp}/{p.tensor}':<12} {p.device_batch_size:>9} {p.remat:>13} {p.accumulation:>5} "
          f"{p.bytes / GIB:>8.2f} GiB {100 * p.bytes / c.memory:>4.0f}% {(c.memory - p.bytes) / GIB:>8.2f} GiB "
          f"{human(p.tokens_per_s):>8} {100 * p.mfu:>5.1f}% {duration(p.step_s):>7} {duration(p.horizon_s):>8}")


def header(cfg, c: Chip, chips: int, mfu: float, usable: float | None) -> list[str]:
  cfg, c, usable = recipe.resolve(cfg), for_rows(c, cfg), usable_share(c, usable)
  t = cfg.train
  steps = config_lib.total_steps(cfg, recipe.horizon_params(cfg.model, t))
  return [f"{chips} x {c.label}: {c.peak / 1e12:g} TFLOP/s dense bf16, {c.memory / GIB:.2f} GiB per chip "
          f"(a plan's estimate may use {usable:.0%}: {usable * c.memory / GIB:.2f} GiB), {c.attention} attention",
          f"global batch {t.batch_tokens:,} tokens = {config_lib.global_batch_size(t)} x {t.seq_len}; horizon "
          f"{steps:,} steps; {100 * mfu:g}% MFU less remat recompute and extra micro-steps (lmtiny.plan.fit)"]


def format_plans(cfg, c: Chip, chips: int = 1, mfu: float = 0.4, usable: float | None = None,
                 top: int = 5) -> tuple[list[str], bool]:
  """(the lines --fit prints, whether any plan fits)."""
  fitting, smallest = search(cfg, c, chips, mfu, usable)
  usable = usable_share(c, usable)
  lines = header(cfg, c, chips, mfu, usable)
  if not fitting:
    s = smallest
    lines.append(f"no plan fits: the smallest, {s.overrides()}, needs {s.bytes / GIB:.2f} GiB per chip "
                 f"({s.bytes / (usable * c.memory):.1f}x the {usable * c.memory / GIB:.2f} GiB usable); "
                 "use more chips (--chips), a shorter train.seq_len or a smaller model")
    return lines, False
  lines.append(f"{'mesh d/f/t':<12} {'dev batch':>9} {'remat':>13} {'accum':>5} {'memory/chip':>12} {'':>5} "
               f"{'headroom':>12} {'tokens/s':>8} {'MFU':>6} {'step':>7} {'horizon':>8}")
  lines += [_row(p, c) for p in fitting[:top]]
  lines.append("best plan: " + fitting[0].overrides())
  return lines, True


def preset_rows(name: str, cfg, chip_names, mfu: float = 0.4, usable: float | None = None) -> list[str]:
  """Markdown rows, one a chip, of the best one-chip plan for `cfg` (`name` its config file)."""
  rows = []
  for key in chip_names:
    c = chip(key)
    fitting, smallest = search(cfg, c, 1, mfu, usable)
    if fitting:
      p = fitting[0]
      rows.append(f"| {name} | {c.label} | {p.device_batch_size} | {p.remat} | {p.accumulation} | "
                  f"{p.bytes / GIB:.1f} GiB | {human(p.tokens_per_s)} | {duration(p.horizon_s)} |")
    else:
      rows.append(f"| {name} | {c.label} | - | - | - | {smallest.bytes / GIB:.1f} GiB at the least: does not fit "
                  f"| - | - |")
  return rows


PRESET_HEADER = ("| config | chip | train.device_batch_size | model.remat | accumulation | memory (estimate) "
                 "| tokens/s at 40% MFU | time to the horizon |\n|---|---|---|---|---|---|---|---|")
