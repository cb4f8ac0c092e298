"""The train step's cost per token, from its lowering: FLOPs, bytes, collectives and the MFU they bound.

    python -m lmtiny.bench --config configs/d20.py --lower-for cuda     # prints it under the kernels

`lmtiny.training.hlo_cost` counts the lowered program (what each figure counts is said there);
this module divides by the tokens of the global batch, sets the 6N + attention model FLOPs
beside them (lmtiny.plan.counts, causal-half) and bounds MFU on an H100, a v5p and a v6e
(lmtiny.plan.roofline). Under a mesh of more than one device, the collectives are those XLA's
SPMD partitioner puts in the sharded step: the same step (with XLA attention, as this machine
cannot compile the fused kernels, which add none) compiled for this machine's devices, counted
per step through its loops at the dtypes the partitioner gave them (`step_collectives`).
"""
from __future__ import annotations

import contextlib
import math
import pathlib
import tempfile
from typing import Callable, TypeVar

import jax
from jax.experimental.compilation_cache import compilation_cache

from lmtiny import config as config_lib
from lmtiny.parallel import sharding
from lmtiny.plan import counts, roofline
from lmtiny.plan.units import human, human_bytes
from lmtiny.training import hlo_cost, lowering


# Only the partitioned program's text is read, never run: XLA:CPU may skip its costly code generation.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
T = TypeVar("T")


def keys_fraction(m, seq_len: int) -> float:
  """The share of the key length a query attends to on average over the layers, as the
  causal-half convention counts it: 1/2 causal, less in sliding-window layers."""
  attention = counts.train_flops_per_token(m, seq_len) - 6.0 * counts.matmul_params(m)
  return attention / (12.0 * m.num_layers * seq_len * m.num_heads * config_lib.head_dim(m))


@contextlib.contextmanager
def _without_persistent_cache():
  """Compiles in the block skip JAX's persistent compilation cache (when one is set): an
  executable read from it ran no XLA passes here, so dumps nothing, and the dump options are not
  part of its key."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()  # JAX decides once whether to use it; ask again
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


def with_partitioned_module(compile_with: Callable[[dict], T]) -> tuple[T, str | None]:
  """(compile_with(XLA options), the HLO module as it stood right after SPMD partitioning, before
  the backend's passes; None from an XLA that names the pass otherwise): `compile_with` compiles
  with the options given, FAST_COMPILE's and a dump of that module."""
  with tempfile.TemporaryDirectory() as dump, _without_persistent_cache():
    result = compile_with({**FAST_COMPILE, "xla_dump_to": dump, "xla_dump_hlo_pass_re": "^spmd-partitioning$"})
    found = [p.read_text() for p in pathlib.Path(dump).glob("*.after_spmd-partitioning.*.txt")]
  return result, found[0] if len(found) == 1 else None


def step_collectives(cfg) -> tuple[hlo_cost.Cost, object]:
  """(the collectives per step of `cfg`'s train step compiled for this machine's devices, at the
  widths XLA's SPMD partitioner gave them; the config compiled). XLA:CPU then moves bf16 in
  float32, twice the bytes a GPU or TPU moves: the module right after partitioning gives each
  collective its own dtype back (hlo_cost.partitioned_dtypes; without it, the widths as compiled)."""
  (compiled, _, compiled_cfg, _), partitioned = with_partitioned_module(
      lambda options: lowering.compile_train_step(cfg, compiler_options=options))
  return hlo_cost.compiled_collectives(compiled.as_text(), partitioned), compiled_cfg


def partitioned_collectives(cfg, platform: str) -> hlo_cost.Cost:
  """Per step, the collectives of the sharded step as XLA's SPMD partitioner places them: the
  step `auto` resolves for `platform`, with XLA attention, compiled for this machine's devices
  (`step_collectives`)."""
  cpu_cfg = lowering.for_platform(cfg, platform)
  cpu_cfg.model.attention = "xla"
  return step_collectives(cpu_cfg)[0]


def per_token(text: str, cfg, chips: int, collectives: hlo_cost.Cost | None = None) -> dict:
  """FLOPs, bytes and collective bytes per token of the global batch of the lowered step `text`
  of config `cfg`, the model FLOPs and the MFU bounds. `collectives` (per step, from
  `partitioned_collectives`) replaces the program's own when given."""
  m, seq_len = cfg.model, cfg.train.seq_len
  tokens = config_lib.global_batch_size(cfg.train) * seq_len
  cost = hlo_cost.count(text, keys_fraction(m, seq_len))
  w = {k: v / tokens for k, v in cost.work.items()}
  flops = {"gemm": w.get("flops_gemm", 0.0), "attention_kernels": w.get("flops_attention", 0.0),
           "loss_kernels": w.get("flops_loss_kernel", 0.0), "other": w.get("flops_other", 0.0)}
  flops["matmul"] = flops["gemm"] + flops["attention_kernels"] + flops["loss_kernels"]
  flops["total"] = flops["matmul"] + flops["other"]
  moved = {part: w.get(f"bytes_{part}", 0.0) for part in ("gemm", "kernel", "reduce", "gather", "state")}
  source = collectives if collectives is not None else cost
  links = {k: v / tokens for k, v in source.links.items()}
  link_bytes = sum(v for k, v in links.items() if not k.endswith("_payload"))
  model = {c: counts.train_flops_per_token(m, seq_len, c) for c in counts.MFU_CONVENTIONS}
  bounds = {chip: roofline.bound(chip, model["causal-half"], flops["total"], sum(moved.values()), link_bytes, chips)
            for chip in roofline.REPORT_CHIPS}
  return {"tokens_per_step": tokens, "chips": chips, "flops": flops, "model_flops": model,
          "bytes": {**moved, "total": sum(moved.values())},
          "collectives_source": "partitioned" if collectives is not None else "lowered",
          "collectives": links, "collectives_per_step": dict(collectives.work) if collectives is not None else {},
          "collectives_by_role": by_role(collectives) if collectives is not None else {},
          "link_bytes": link_bytes, "mfu_bound": bounds, "uncounted_kernels": dict(cost.uncounted),
          "loops_of_unknown_length": cost.unknown_loops + (collectives.unknown_loops if collectives else 0)}


def by_role(collectives: hlo_cost.Cost) -> dict:
  """Per step, each role's collectives (hlo_cost.collective_role: the gradients' reductions, the
  optimizer's, the rest) summed over kinds: payload bytes and ops, and how much of each runs
  inside `while` loops (the micro-step loop: once per micro-step)."""
  out = {role: {"payload": 0.0, "ops": 0.0, "payload_in_loops": 0.0, "ops_in_loops": 0.0} for role in hlo_cost.ROLES}
  for key, value in collectives.roles.items():
    role, measure = key.split("_", 1)[0], "payload" if key.endswith("_payload") else "ops"
    out[role][measure] += value
    out[role][measure + "_in_loops"] += collectives.in_loops[key]
  return out


def report(text: str, cfg, platform: str) -> dict:
  """`per_token` of the step lowered for `platform` on the mesh of this machine's devices; with
  more than one device, its collectives compiled (`partitioned_collectives`)."""
  chips = math.prod(sharding.mesh_shape(cfg.mesh, jax.device_count()).values())
  collectives = partitioned_collectives(cfg, platform) if chips > 1 else None
  return per_token(text, cfg, chips, collectives)


def _bytes(n: float) -> str:
  return f"{human(round(n))}B"


def _collective_line(p: dict) -> str:
  kinds = sorted(k for k in p["collectives"] if not k.endswith("_payload"))
  per_step = p["collectives_per_step"]
  found = ", ".join(f"{k} {_bytes(p['collectives'][k + '_payload'])} payload, {_bytes(p['collectives'][k])} over links"
                    + (f" ({per_step[k]:g} per step)" if k in per_step else "") for k in kinds)
  where = ("XLA:CPU's partition of this sharded step, XLA attention" if p["collectives_source"] == "partitioned"
           else "the program's own; a sharded step's partitioner adds its own when XLA compiles it")
  line = f"collectives  {found or 'none'} per token per chip ({where})"
  return f"{line}\n{_role_line(p['collectives_by_role'])}" if p["collectives_by_role"] else line


def _role_part(name: str, r: dict) -> str:
  loops = f", {r['ops_in_loops']:g} of them in loops ({human_bytes(r['payload_in_loops'])})" if r["ops_in_loops"] else ""
  return f"{name} {human_bytes(r['payload'])} in {r['ops']:g} ops{loops}"


def _role_line(roles: dict) -> str:
  """Per step, by role: gradient reductions, the optimizer's collectives, the rest (payloads)."""
  return "by role      per step: " + "; ".join(_role_part(name, roles[role]) for role, name in (
      ("gradient", "gradient reductions"), ("optimizer", "optimizer"), ("other", "other")))


def format_per_token(p: dict) -> str:
  """The per-token block bench --lower-for prints under the kernel summary."""
  f, b, model = p["flops"], p["bytes"], p["model_flops"]["causal-half"]
  kernels = "".join(f", {name} {human(f[key])}" for key, name in (("attention_kernels", "attention kernels"),
                                                                  ("loss_kernels", "loss kernels")) if f[key])
  unknown = "".join(f"; {name} x{n} not counted" for name, n in sorted(p["uncounted_kernels"].items()))
  if p["loops_of_unknown_length"]:
    unknown += f"; {p['loops_of_unknown_length']} loops of unknown length counted once"
  return "\n".join([
      f"per token    {human(f['total'])} FLOPs run: matmul {human(f['matmul'])} (XLA GEMMs {human(f['gemm'])}"
      f"{kernels}), other {human(f['other'])}; 6N + attention {human(model)} (causal-half) = "
      f"{100 * model / f['total']:.0f}% of it; {p['tokens_per_step']:,} tokens per step",
      f"bytes        {human(b['total'])}B per token moved, lower bound if every elementwise op fuses: GEMMs "
      f"{human(b['gemm'])}B, kernels {human(b['kernel'])}B, reductions {human(b['reduce'])}B, gathers/scatters "
      f"{human(b['gather'])}B, step in/out {human(b['state'])}B; {f['total'] / max(b['total'], 1):.0f} FLOPs/byte",
      _collective_line(p),
      f"MFU bound    {roofline.format_bounds(model, f['total'], b['total'], p['link_bytes'], p['chips'])} "
      f"[time >= max(FLOPs/peak, bytes/HBM bandwidth, link bytes/link bandwidth); serial: their sum]{unknown}"])
