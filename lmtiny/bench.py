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
the attention kernels it calls per step and any [T, T] tensor left (lmtiny.training.lowering),
then per token of the global batch the FLOPs, bytes and collective bytes the lowered step moves
(lmtiny.training.hlo_cost, lmtiny.training.step_cost) and the MFU they bound on an H100, a v5p and a v6e
(lmtiny.plan.roofline); `--json PATH` writes those figures;
`--hlo-out FILE` also writes the lowered step's StableHLO there, so anyone can count what it does.
`--profile DIR` traces one more step after the timed ones with jax.profiler into DIR (a new or empty
directory; lmtiny.training.profiling) and prints where its device time went: the shares in matmuls,
attention, collectives, elementwise work and idle, and the top operations (lmtiny.runs.trace_summary);
`--json` holds that summary as "profile".
`--topology v5e:2x4` (libtpu installed) compiles it with XLA:TPU for that slice's chips, here:
XLA:TPU's per-chip memory figure and whether it fits the chip, no TPU needed. `--topology h100:8`
(h100, h200, a100; jax's CUDA plugin installed) does the same with XLA:GPU for that many GPUs of
one host (lmtiny.training.gpu_targets).

MFU = training FLOP/s / (chips x dense bf16 peak), training FLOPs per token
    causal-half: 6 * N_matmul + 6 * L * T * H * Dh   (MaxText: half the score matrix is masked)
    nanochat:    6 * N_matmul + 12 * L * T * H * Dh  (the full square)
(lmtiny.plan.counts.train_flops_per_token).
"""
from __future__ import annotations

import os

from absl import flags
from etils import epath

from lmtiny import cli
from lmtiny.plan import recipe
from lmtiny.errors import ConfigError
from lmtiny.fs import atomic as files, outputs
from lmtiny.training import lowering, step_cost
from lmtiny.training.benchmark import benchmark, compile_report, format_report, report_json


def _define_flags(fv):
  return {"steps": flags.DEFINE_integer("steps", 20, "Timed steps.", flag_values=fv),
          "warmup": flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.", flag_values=fv),
          "compile_only": flags.DEFINE_bool("compile_only", False, "Compile on abstract inputs and print XLA's "
                                            "memory analysis; allocate and run nothing.", flag_values=fv),
          "lower_for": flags.DEFINE_string("lower_for", None, "cuda | tpu: lower the step for that platform "
                                           "(no device needed) and print the kernels it calls.", flag_values=fv),
          "topology": flags.DEFINE_string("topology", None, "A TPU slice, e.g. v5e:2x4 (libtpu's topology "
                                          "names), or GPUs of one host, e.g. h100:8: compile the step with XLA "
                                          "for them, here, and print XLA's memory figure (implies --compile-only).",
                                          flag_values=fv),
          "json": flags.DEFINE_string("json", None, "Also write the report as JSON to this path.", flag_values=fv),
          "hlo_out": flags.DEFINE_string("hlo_out", None, "With --lower-for: also write the lowered step's "
                                         "StableHLO text to this file.", flag_values=fv),
          "profile": flags.DEFINE_string("profile", None, "A new or empty directory: trace one more step after "
                                         "the timed ones there and print where its device time went.",
                                         flag_values=fv)}


def _check_profile_dir(values) -> None:
  """--profile names a local directory lmtiny.bench may fill: a timed run's, new or empty (no command
  writes among files it did not create)."""
  path = values["profile"]
  modes = [f"--{name.replace('_', '-')}" for name in ("compile_only", "topology", "lower_for") if values[name]]
  if modes:
    raise ConfigError(f"--profile={path}: traces a timed step; {modes[0]} runs none")
  if not path or "://" in path:
    raise ConfigError(f"--profile={path}: name a local directory (jax.profiler writes local files only)")
  outputs.check_output_dir(path, "--profile")
  if os.path.isdir(path) and os.listdir(path):
    raise ConfigError(f"--profile={path}: exists and is not empty; name a new or empty directory")


def run(argv: list[str]) -> int:
  parsed = cli.parse_config_flags(argv, _define_flags, __doc__)
  if parsed is None:
    return 0
  values, cfg = parsed
  cfg = recipe.resolve(cfg)  # the batch size a run of this config would use
  if values["steps"] < 1 or values["warmup"] < 0:
    bad = "steps" if values["steps"] < 1 else "warmup"
    raise ConfigError(f"--{bad}={values[bad]}: must be {'>= 1' if bad == 'steps' else '>= 0'}")
  if values["json"] is not None:
    outputs.check_output_file(values["json"], "--json")  # before the benchmark, not after it
  if values["hlo_out"] is not None:
    if not values["lower_for"]:
      raise ConfigError("--hlo-out needs --lower-for cuda|tpu (it writes the lowered step)")
    outputs.check_output_file(values["hlo_out"], "--hlo-out")
  if values["profile"] is not None:
    _check_profile_dir(values)
  if values["lower_for"]:
    text, summary = lowering.report(cfg, values["lower_for"])
    figures = step_cost.report(text, cfg, values["lower_for"])
    print(summary + "\n" + step_cost.format_per_token(figures))
    if values["hlo_out"]:
      epath.Path(values["hlo_out"]).parent.mkdir(parents=True, exist_ok=True)
      files.atomic_write(values["hlo_out"], text.encode())
    if values["json"]:
      epath.Path(values["json"]).parent.mkdir(parents=True, exist_ok=True)
      files.atomic_write_json(values["json"], {"platform": values["lower_for"], "per_token": figures})
    return 0
  report = (compile_report(cfg, values["topology"]) if values["compile_only"] or values["topology"]
            else benchmark(cfg, steps=values["steps"], warmup=values["warmup"], profile_dir=values["profile"]))
  print(format_report(report, cfg))
  if values["json"]:
    epath.Path(values["json"]).parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_json(values["json"], report_json(report, cfg))
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run_main(run, argv)


if __name__ == "__main__":
  cli.exit_with(main)
