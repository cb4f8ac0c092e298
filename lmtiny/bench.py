"""python -m lmtiny.bench --config configs/<size>.py [--steps 20] [--config.x=...]

Times the jitted train step (the trainer's own, sharded over the configured mesh) on synthetic
tokens and prints: compile time, median / min step time, tokens/s, MFU and peak device memory
where the backend reports it. MFU uses training FLOPs per token = 6 * N_matmul + 6 * L * T * H * Dh
(see lmtiny.arch / lmtiny.metrics) over the dense bf16 peak of the chips.
"""
from __future__ import annotations

import statistics
import sys
import time

import jax
import numpy as np

from lmtiny import arch, cli, config as config_lib, metrics as metrics_lib, sharding
from lmtiny.trainer import build_steps, check_batch_divisibility, device_batch


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
  return {"params": arch.count_params(cfg.model), "compile_s": compile_s, "median_step_s": median,
          "min_step_s": min(times), "tokens_per_s": tokens_per_s, "mfu": metrics_lib.mfu(flops, tokens_per_s),
          "flops_per_token": flops, "peak_memory_bytes": peak_memory_bytes(), "final_loss": float(m["loss"]),
          "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "mesh": dict(mesh.shape)}


def format_report(r: dict, cfg) -> str:
  mem = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if r["peak_memory_bytes"] else "n/a (backend does not report)"
  mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (unknown chip)"
  t = cfg.train
  return "\n".join([
      f"model        {r['params'] / 1e6:.2f}M params, {arch.human(r['flops_per_token'])}FLOPs/token (train)",
      f"device       {r['devices']} x {r['device']}, mesh {r['mesh']}",
      f"batch        {t.batch_tokens} tokens = {config_lib.global_batch_size(t)} x {t.seq_len}"
      f" (accumulation {config_lib.accumulation_steps(t)}), dtype {cfg.model.dtype}, remat {cfg.model.remat}",
      f"compile      {r['compile_s']:.1f} s",
      f"step         median {1e3 * r['median_step_s']:.1f} ms, min {1e3 * r['min_step_s']:.1f} ms",
      f"throughput   {r['tokens_per_s']:,.0f} tokens/s",
      f"MFU          {mfu}",
      f"peak memory  {mem}",
  ])


def _define_flags(fv):
  from absl import flags
  return {"steps": flags.DEFINE_integer("steps", 20, "Timed steps.", flag_values=fv),
          "warmup": flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.", flag_values=fv)}


def run(argv: list[str]) -> int:
  parsed = cli.parse_config_flags(argv, _define_flags, __doc__)
  if parsed is None:
    return 0
  values, cfg = parsed
  if values["steps"] < 1 or values["warmup"] < 0:
    bad = "steps" if values["steps"] < 1 else "warmup"
    raise config_lib.ConfigError(f"--{bad}={values[bad]}: must be {'>= 1' if bad == 'steps' else '>= 0'}")
  report = benchmark(cfg, steps=values["steps"], warmup=values["warmup"])
  print(format_report(report, cfg))
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run_main(run, argv)


if __name__ == "__main__":
  sys.exit(main())
