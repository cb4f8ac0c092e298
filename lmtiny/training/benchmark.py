"""The train-step benchmark behind `python -m lmtiny.bench`: the jitted train step (the trainer's own,
sharded over the configured mesh) timed on synthetic tokens, XLA's memory analysis of the compiled
step next to lmtiny.plan.memory's estimate, and whether a cuDNN fused-attention call is in its HLO.

MFU = training FLOP/s / (chips x dense bf16 peak), training FLOPs per token
    causal-half: 6 * N_matmul + 6 * L * T * H * Dh   (MaxText: half the score matrix is masked)
    nanochat:    6 * N_matmul + 12 * L * T * H * Dh  (the full square)
(lmtiny.plan.counts.train_flops_per_token).
"""
from __future__ import annotations

import json
import statistics
import time

import jax
import numpy as np

from lmtiny import config as config_lib
from lmtiny.model import attention as attn_lib, transformer as model_lib
from lmtiny.plan import counts, memory
from lmtiny.plan.units import human, human_bytes
from lmtiny.runs import metrics as metrics_lib
from lmtiny.plan.roofline import HBM_BANDWIDTH
from lmtiny.training import kernel_roofline, lowering, profiling, step_cost
from lmtiny.training.resolved import resolve_run
from lmtiny.training.steps import build_steps, device_batch


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


def memory_analysis(compiled, platform: str) -> dict | None:
  """XLA's per-device figures for a program compiled for `platform`, in bytes; `peak` = arguments
  + outputs - aliased (donated buffers reused for outputs) + temporaries.

  XLA:TPU's temp figure is not its heap: d20's step at 11 sequences a v5e chip (fsdp=8) read
  2.3 GiB more than its heap (17.23 GiB by that sum) and compiled for the chip's 15.75 GiB, whose
  out-of-memory check refused 12. There XLA's peak_memory_in_bytes is the heap its buffer
  assignment lays out (its memory-usage report's total), so the temporaries are that less the
  arguments and outputs. XLA:CPU's peak_memory_in_bytes leaves temporaries out: the sum it is."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  out = {k: int(getattr(stats, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
  held = out["argument"] + out["output"] - out["alias"]
  if platform == "tpu" and stats.peak_memory_in_bytes > 0:
    out["temp"] = int(stats.peak_memory_in_bytes) - held
  out["peak"] = held + out["temp"]
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
  m, platform = cfg.model, mesh.devices.flat[0].platform
  impl = attn_lib.resolve_impl(m.attention, model_lib.compute_dtype(m), platform=platform,
                               seq_len=cfg.train.seq_len, packed=cfg.data.document_mask)
  return memory.estimate(cfg, dict(mesh.shape), attention=impl, platform=platform)


def compile_report(cfg, topology: str | None = None) -> dict:
  """Compile only: XLA's memory analysis and lmtiny.plan.memory's estimate, no arrays allocated; for
  this machine's devices, or with XLA:TPU for the TPU slice `topology` names (lmtiny.training.lowering)."""
  if topology:
    compiled, compile_s, cfg, mesh = lowering.compile_for_topology(cfg, topology)
  else:
    compiled, compile_s, cfg, mesh = lowering.compile_train_step(cfg)
  device, hlo_text = mesh.devices.flat[0], compiled.as_text()  # the text of a d20 step is megabytes: once
  return {"params": counts.count_params(cfg.model), "compile_s": compile_s, "xla_memory": memory_analysis(compiled, device.platform),
          "estimate": estimate(cfg, mesh), "device": device.device_kind,
          "chip_bytes": counts.HBM_BYTES.get(metrics_lib.chip_name(device)), "devices": mesh.size,
          "mesh": dict(mesh.shape), "attention": cfg.model.attention, "dtype": cfg.model.dtype,
          "reductions": dict(lowering.gradient_reductions(hlo_text)), "ring_steps": dict(lowering.ring_steps(hlo_text)),
          "reductions_in_loops": dict(lowering.gradient_reductions(lowering.loop_bodies(hlo_text))),
          "kernels": kernel_report(hlo_text, cfg, device, mesh.size)}


def kernel_report(hlo_text: str, cfg, device, devices: int) -> dict | None:
  """On a GPU, real or described: the compiled step's kernels on the chip's roofline and the step
  time, tokens/s and MFU they predict (lmtiny.training.kernel_roofline); None elsewhere."""
  chip = metrics_lib.chip_name(device)
  if device.platform != "gpu" or chip not in counts.PEAK_FLOPS or chip not in HBM_BANDWIDTH:
    return None
  m, seq_len = cfg.model, cfg.train.seq_len
  k = kernel_roofline.kernels(hlo_text, chip, seq_len * step_cost.keys_fraction(m, seq_len))
  tokens = config_lib.global_batch_size(cfg.train) * seq_len
  predicted = {convention: kernel_roofline.predict(k, tokens * counts.train_flops_per_token(m, seq_len, convention),
                                                   tokens, devices, chip)
               for convention in counts.MFU_CONVENTIONS}
  every = lambda totals: {c: totals[c] for c in kernel_roofline.CATEGORIES}  # zeros for kinds absent
  return {"chip": chip, "launches": every(k.launches), "flops": every(k.flops), "bytes": every(k.bytes),
          "seconds": every(k.seconds), "predicted": predicted}


def format_kernels(r: dict) -> list[str]:
  """On a GPU: the kernels line and the predicted step, against the measured one after a timed run."""
  k = r.get("kernels")
  if not k:
    return []
  s, chip = k["seconds"], k["chip"]
  p = k["predicted"]["causal-half"]
  eff = ", ".join(f"{c} {100 * kernel_roofline.EFFICIENCY[c]:.0f}%" for c in kernel_roofline.CATEGORIES)
  measured = (f"; the measured median step is {r['median_step_s'] / p['seconds']:.2f}x that"
              if "median_step_s" in r else "")
  return [f"kernels      {sum(k['launches'].values()):,.0f} launches a step per device; on the {chip}'s roofline: matmul "
          f"{human(k['flops']['matmul'])} FLOPs {1e3 * s['matmul']:.0f} ms, attention {1e3 * s['attention']:.0f} ms, "
          f"elementwise {human(k['bytes']['elementwise'])} bytes {1e3 * s['elementwise']:.0f} ms "
          f"({HBM_BANDWIDTH[chip] / 1e12:.2f} TB/s); {1e3 * sum(s.values()):.0f} ms",
          f"predicted    {p['seconds']:.2f} s a step, {p['tokens_per_s']:,.0f} tokens/s, MFU {100 * p['mfu']:.3g}% "
          f"causal-half, {100 * k['predicted']['nanochat']['mfu']:.3g}% nanochat (at the shares of peak an H100 "
          f"reached: {eff}){measured}"]


def benchmark(cfg, steps: int = 20, warmup: int = 2, profile_dir: str | None = None) -> dict:
  """Compile once, run `warmup` untimed steps, then time `steps` steps one by one. With
  `profile_dir`, then trace one more step there (lmtiny.training.profiling, not timed): its summary
  is the report's "profile"."""
  run = resolve_run(cfg)
  cfg, mesh = run.cfg, run.mesh
  bench_steps = build_steps(cfg, mesh, total_steps=max(steps + warmup, 2))
  rows = config_lib.global_batch_size(cfg.train) // jax.process_count()
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    state = bench_steps.init()
    batch = device_batch(synthetic_batch(cfg, rows), mesh)
    compiled = bench_steps.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    device = mesh.devices.flat[0]
    xla_memory = memory_analysis(compiled, device.platform)
    cudnn_attention = cudnn_attention_in_hlo(compiled)
    # the prediction beside the measurement: each GPU run checks kernel_roofline's calibration
    kernels = kernel_report(compiled.as_text(), cfg, device, mesh.size) if device.platform == "gpu" else None
    times, profile = [], {}
    for i in range(warmup + steps):
      t0 = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready(m["loss"])
      if i >= warmup:
        times.append(time.perf_counter() - t0)
    if profile_dir:
      jax.block_until_ready(state)  # the trace holds the profiled step's work only
      profile = {"profile": profiling.profile_call(profile_dir, lambda: compiled(state, batch))}
  median = statistics.median(times)
  tokens_per_s = cfg.train.batch_tokens / median
  flops = counts.train_flops_per_token(cfg.model, cfg.train.seq_len)
  flops_nanochat = counts.train_flops_per_token(cfg.model, cfg.train.seq_len, "nanochat")
  return {"params": counts.count_params(cfg.model), "compile_s": compile_s, "median_step_s": median,
          "min_step_s": min(times), "tokens_per_s": tokens_per_s, "mfu": metrics_lib.mfu(flops, tokens_per_s),
          "mfu_nanochat": metrics_lib.mfu(flops_nanochat, tokens_per_s), "xla_memory": xla_memory,
          "estimate": estimate(cfg, mesh), "step_times": times,
          "flops_per_token": flops, "peak_memory_bytes": peak_memory_bytes(), "final_loss": float(m["loss"]),
          "attention": cfg.model.attention, "cudnn_attention": cudnn_attention,
          "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "mesh": dict(mesh.shape),
          "kernels": kernels, **profile}


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


def format_reductions(r: dict) -> list[str]:
  """The compiled step's cross-device sums of weight-sized arrays by dtype, and its ring steps
  (none on one device)."""
  by_dtype = lambda counts: ", ".join(f"{n} {dtype}" for dtype, n in sorted(counts.items()))
  sums, ring = r.get("reductions"), r.get("ring_steps")
  if not (sums or ring):
    return []
  line = f"reductions   {by_dtype(sums) or 'none'} (all-reduce / reduce-scatter of weight-sized arrays: the gradients)"
  if sums:
    looped = sum(r.get("reductions_in_loops", {}).values())
    line += f", {looped} of them in loop bodies (per micro-step or layer)" if looped else ", none in a loop body"
  if ring:
    line += f"; ring steps {by_dtype(ring)} (collective-permutes: XLA's decomposed gathers and reduce-scatters)"
  return [line]


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
    return "\n".join(head + format_memory(r) + format_reductions(r) + format_kernels(r))
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
  ] + format_memory(r) + format_kernels(r) + format_profile(r))


def format_profile(r: dict) -> list[str]:
  """With --profile: the profiled step's shares of device time and top operations, and its trace."""
  if "profile" not in r:
    return []
  summary = r["profile"]
  if summary is None:
    return ["profile: no perfetto_trace.json.gz appeared (jax.profiler wrote no trace)"]
  return profiling.format_profile(summary, steps=1, span="1 step after the timed ones") + [
      f"profile: trace {summary['trace']} (ui.perfetto.dev; TensorBoard's Profile tab)"]


def report_json(r: dict, cfg) -> dict:
  """The report plus the run's shape, for tools that collect several runs (benchmarks/gpu_suite.sh)."""
  t = cfg.train
  resolved = config_lib.resolve_batch(cfg, r["mesh"]["data"] * r["mesh"]["fsdp"]).train
  out = dict(r, seq_len=t.seq_len, batch_tokens=t.batch_tokens, global_batch=config_lib.global_batch_size(t),
             accumulation=config_lib.accumulation_steps(resolved), dtype=cfg.model.dtype, remat=cfg.model.remat,
             attention=cfg.model.attention)
  return json.loads(json.dumps(out, default=float))  # numpy scalars -> float
