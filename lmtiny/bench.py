"""python -m lmtiny.bench --config configs/<size>.py [--steps 20] [--compile-only] [--config.x=...]

Times the jitted train step (the trainer's own, sharded over the configured mesh) on synthetic
tokens and prints: compile time, median / min step time, tokens/s, MFU in both conventions,
XLA's own memory figure for the compiled step (`compiled.memory_analysis()`: arguments, outputs,
aliased (donated) bytes and temporaries, per device) next to lmtiny.plan.memory's estimate, and the
peak device memory where the backend reports it. `--compile-only` lowers and compiles the step on
abstract inputs (no parameters are allocated, nothing runs): the memory check for big configs.
A timed run also reads the compiled step's HLO for a cuDNN fused-attention call, so the report
says which kernel `model.attention=auto` really ran; `--json PATH` writes the report as JSON too.
`--lower-for cuda|tpu` lowers the step for a GPU or TPU this machine need not have and prints
the attention kernels it calls per step and any [T, T] tensor left (lmtiny.training.lowering).
`--topology v5e:2x4` (libtpu installed) compiles it with XLA:TPU for that slice's chips, here:
XLA:TPU's per-chip memory figure and whether it fits the chip, no TPU needed.

MFU = training FLOP/s / (chips x dense bf16 peak), training FLOPs per token
    causal-half: 6 * N_matmul + 6 * L * T * H * Dh   (MaxText: half the score matrix is masked)
    nanochat:    6 * N_matmul + 12 * L * T * H * Dh  (the full square)
(lmtiny.plan.arch.train_flops_per_token).
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import jax
import numpy as np
from etils import epath

from lmtiny import cli, config as config_lib
from lmtiny.errors import ConfigError
from lmtiny.fs import atomic as files, outputs
from lmtiny.model import attention as attn_lib, transformer as model_lib
from lmtiny.parallel import sharding
from lmtiny.plan import arch, memory
from lmtiny.plan.units import human, human_bytes
from lmtiny.runs import metrics as metrics_lib
from lmtiny.training import lowering
from lmtiny.training.steps import build_steps, check_batch_divisibility, device_batch


def synthetic_batch(cfg, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
  t = cfg.train
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.model.vocab_size, size=(rows, t.seq_len + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((rows, t.seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(t.seq_len, dtype=np.int32), (rows, t.seq_len)).copy(),
          "loss_mask": np.ones((rows, t.seq_len), np.float32)}


def peak_memory_bytes() -> int | None:
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  peaks = [s.get("peak_bytes_in_use") for s in stats if s.get("peak_bytes_in_use") is not None]
  return max(peaks) if peaks else None


def memory_analysis(compiled) -> dict | None:
  """XLA's per-device figures for a compiled program, in bytes; `peak` = arguments + outputs -
  aliased (donated buffers reused for outputs) + temporaries."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  out = {k: int(getattr(stats, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def cudnn_attention_in_hlo(compiled) -> bool | None:
  """Whether the compiled program calls cuDNN's fused attention (custom call `__cudnn$fmha...`):
  what `model.attention=auto` resolved to, after any fallback to xla. None if XLA gives no text."""
  try:
    return "__cudnn$fmha" in (compiled.as_text() or "")
  except Exception:  # as_text is best effort on some backends  # pylint: disable=broad-except
    return None


def estimate(cfg, mesh) -> dict:
  """lmtiny.plan.memory's estimate for the attention backend that runs on the mesh's platform."""
  m = cfg.model
  impl = attn_lib.resolve_impl(m.attention, model_lib.compute_dtype(m), platform=mesh.devices.flat[0].platform,
                               seq_len=cfg.train.seq_len, packed=True)
  return memory.estimate(cfg, dict(mesh.shape), attention=impl)


def compile_report(cfg, topology: str | None = None) -> dict:
  """Compile only: XLA's memory analysis and lmtiny.plan.memory's estimate, no arrays allocated; for
  this machine's devices, or with XLA:TPU for the TPU slice `topology` names (lmtiny.training.lowering)."""
  if topology:
    compiled, compile_s, cfg, mesh = lowering.compile_for_topology(cfg, topology)
  else:
    compiled, compile_s, cfg, mesh = lowering.compile_train_step(cfg)
  device = mesh.devices.flat[0]
  return {"params": arch.count_params(cfg.model), "compile_s": compile_s, "xla_memory": memory_analysis(compiled),
          "estimate": estimate(cfg, mesh), "device": device.device_kind,
          "chip_bytes": arch.HBM_BYTES.get(metrics_lib.chip_name(device)), "devices": mesh.size,
          "mesh": dict(mesh.shape), "attention": cfg.model.attention, "dtype": cfg.model.dtype}


def benchmark(cfg, steps: int = 20, warmup: int = 2) -> dict:
  """Compile once, run `warmup` untimed steps, then time `steps` steps one by one."""
  config_lib.validate(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  check_batch_divisibility(cfg, mesh)
  bench_steps = build_steps(cfg, mesh, total_steps=max(steps + warmup, 2))
  rows = config_lib.global_batch_size(cfg.train) // jax.process_count()
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    state = bench_steps.init()
    batch = device_batch(synthetic_batch(cfg, rows), mesh)
    compiled = bench_steps.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    xla_memory = memory_analysis(compiled)
    cudnn_attention = cudnn_attention_in_hlo(compiled)
    times = []
    for i in range(warmup + steps):
      t0 = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready(m["loss"])
      if i >= warmup:
        times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  tokens_per_s = cfg.train.batch_tokens / median
  flops = arch.train_flops_per_token(cfg.model, cfg.train.seq_len)
  flops_nanochat = arch.train_flops_per_token(cfg.model, cfg.train.seq_len, "nanochat")
  return {"params": arch.count_params(cfg.model), "compile_s": compile_s, "median_step_s": median,
          "min_step_s": min(times), "tokens_per_s": tokens_per_s, "mfu": metrics_lib.mfu(flops, tokens_per_s),
          "mfu_nanochat": metrics_lib.mfu(flops_nanochat, tokens_per_s), "xla_memory": xla_memory,
          "estimate": estimate(cfg, mesh), "step_times": times,
          "flops_per_token": flops, "peak_memory_bytes": peak_memory_bytes(), "final_loss": float(m["loss"]),
          "attention": cfg.model.attention, "cudnn_attention": cudnn_attention,
          "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "mesh": dict(mesh.shape)}


def format_memory(r: dict) -> list[str]:
  lines = []
  x = r.get("xla_memory")
  if x is not None:
    lines.append(f"XLA memory   {human_bytes(x['peak'])} per device = arguments {human_bytes(x['argument'])} + "
                 f"outputs {human_bytes(x['output'])} - aliased {human_bytes(x['alias'])} + temporaries "
                 f"{human_bytes(x['temp'])}")
    chip = r.get("chip_bytes")
    if chip:
      verdict = "fits" if x["peak"] <= chip else "does NOT fit"
      lines.append(f"chip         {verdict}: {100 * x['peak'] / chip:.0f}% of the chip's {human_bytes(chip)}")
  e = r.get("estimate")
  if e is not None:
    ratio = f" ({e['total'] / x['peak']:.2f}x XLA's)" if x and x["peak"] else ""
    lines.append(f"estimate     {human_bytes(e['total'])} per device{ratio} (lmtiny.plan.memory: " +
                 ", ".join(f"{k} {human_bytes(v)}" for k, v in e.items() if k != "total") + ")")
  return lines


def format_report(r: dict, cfg) -> str:
  t = cfg.train
  resolved = config_lib.resolve_batch(cfg, r["mesh"]["data"] * r["mesh"]["fsdp"]).train
  head = [
      f"model        {r['params'] / 1e6:.2f}M params",
      f"device       {r['devices']} x {r['device']}, mesh {r['mesh']}",
      f"batch        {t.batch_tokens} tokens = {config_lib.global_batch_size(t)} x {t.seq_len}"
      f" (accumulation {config_lib.accumulation_steps(resolved)}), dtype {r.get('dtype', cfg.model.dtype)}, "
      f"remat {cfg.model.remat}, attention {r.get('attention', cfg.model.attention)}",
      f"compile      {r['compile_s']:.1f} s",
  ]
  if "median_step_s" not in r:  # --compile-only
    return "\n".join(head + format_memory(r))
  mem = human_bytes(r["peak_memory_bytes"]) if r["peak_memory_bytes"] else "n/a (backend does not report)"
  cudnn = {True: "yes", False: "no", None: "unknown"}[r["cudnn_attention"]]
  mfu = (f"{100 * r['mfu']:.3g}% causal-half (6*N + 6*L*T*H*Dh), {100 * r['mfu_nanochat']:.3g}% nanochat "
         f"(6*N + 12*L*T*H*Dh)" if r["mfu"] is not None else "n/a (unknown chip)")
  return "\n".join(head + [
      f"FLOPs/token  {human(r['flops_per_token'])} (train, causal-half)",
      f"step         median {1e3 * r['median_step_s']:.1f} ms, min {1e3 * r['min_step_s']:.1f} ms",
      f"throughput   {r['tokens_per_s']:,.0f} tokens/s",
      f"MFU          {mfu}",
      f"attention    model.attention={r['attention']}; cuDNN fused attention in the compiled step: {cudnn}",
      f"peak memory  {mem} (runtime)",
  ] + format_memory(r))


def report_json(r: dict, cfg) -> dict:
  """The report plus the run's shape, for tools that collect several runs (benchmarks/gpu_suite.sh)."""
  t = cfg.train
  resolved = config_lib.resolve_batch(cfg, r["mesh"]["data"] * r["mesh"]["fsdp"]).train
  out = dict(r, seq_len=t.seq_len, batch_tokens=t.batch_tokens, global_batch=config_lib.global_batch_size(t),
             accumulation=config_lib.accumulation_steps(resolved), dtype=cfg.model.dtype, remat=cfg.model.remat,
             attention=cfg.model.attention)
  return json.loads(json.dumps(out, default=float))  # numpy scalars -> float


def _define_flags(fv):
  from absl import flags
  return {"steps": flags.DEFINE_integer("steps", 20, "Timed steps.", flag_values=fv),
          "warmup": flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.", flag_values=fv),
          "compile_only": flags.DEFINE_bool("compile_only", False, "Compile on abstract inputs and print XLA's "
                                            "memory analysis; allocate and run nothing.", flag_values=fv),
          "lower_for": flags.DEFINE_string("lower_for", None, "cuda | tpu: lower the step for that platform "
                                           "(no device needed) and print the kernels it calls.", flag_values=fv),
          "topology": flags.DEFINE_string("topology", None, "A TPU slice, e.g. v5e:2x4 (libtpu's topology "
                                          "names): compile the step with XLA:TPU for its chips, here, and print "
                                          "XLA's memory figure (implies --compile-only).", flag_values=fv),
          "json": flags.DEFINE_string("json", None, "Also write the report as JSON to this path.", flag_values=fv)}


def run(argv: list[str]) -> int:
  parsed = cli.parse_config_flags(argv, _define_flags, __doc__)
  if parsed is None:
    return 0
  values, cfg = parsed
  if values["steps"] < 1 or values["warmup"] < 0:
    bad = "steps" if values["steps"] < 1 else "warmup"
    raise ConfigError(f"--{bad}={values[bad]}: must be {'>= 1' if bad == 'steps' else '>= 0'}")
  if values["json"] is not None:
    outputs.check_output_file(values["json"], "--json")  # before the benchmark, not after it
  if values["lower_for"]:
    print(lowering.report(cfg, values["lower_for"]))
    return 0
  report = (compile_report(cfg, values["topology"]) if values["compile_only"] or values["topology"]
            else benchmark(cfg, steps=values["steps"], warmup=values["warmup"]))
  print(format_report(report, cfg))
  if values["json"]:
    epath.Path(values["json"]).parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_json(values["json"], report_json(report, cfg))
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run_main(run, argv)


if __name__ == "__main__":
  sys.exit(main())
