"""Architecture calculator: parameter split, FLOPs per token, token budget, training time, memory.

    python -m lmtiny.arch --config configs/d4_38m.py [--config.model.num_layers=8]
        [--tokens-per-param 20] [--chip h100] [--chips 1] [--mfu 0.4]
    python -m lmtiny.arch --config configs/d24_2026.py --brief --chip h100 --chips 8 --mfu 0.4 --mfu 0.55
        (--brief: the run's parameters, tokens, steps, FLOPs and time at each --mfu, in four lines)
    python -m lmtiny.arch --search --target-params 38e6 --head-dim 64 [--tied]
        [--vocab 8192,16384,24576,32768,65536] [--depth 2..32] [--config configs/x.py]
    python -m lmtiny.arch --config configs/d12_2026.py --fit rtx3080 [--chips N] [--mfu 0.4] [--memory 24GiB]
        (--fit: the device batch, remat and mesh that fit the chip, fastest first, and the best as
        overrides lmtiny.train takes; several chips, comma-separated: the best plan on each;
        --markdown: those as rows of docs/scale-out.md's table. Exit status 0 when a plan fits,
        1 when none does (one line says what comes closest), 2 for bad input)
"""
from __future__ import annotations

from absl import flags

from lmtiny import cli, config as config_lib
from lmtiny.errors import ConfigError
from lmtiny.plan import fit, memory, recipe, search as arch_search
from lmtiny.plan.counts import PEAK_FLOPS
from lmtiny.plan.summary import report, run_plan


def _define_flags(fv: flags.FlagValues) -> dict:
  return dict(
      tokens_per_param=flags.DEFINE_float("tokens_per_param", None, "Training tokens per parameter (default: "
                                          "the config's train.tokens_per_param, or 20).", flag_values=fv),
      chip=flags.DEFINE_string("chip", "h100", f"Accelerator: {' | '.join(PEAK_FLOPS)}.", flag_values=fv),
      chips=flags.DEFINE_integer("chips", 1, "Number of chips for the time estimate.", flag_values=fv),
      mfu=flags.DEFINE_multi_float("mfu", [0.4], "Model FLOPs utilisation for the time estimate (--brief: "
                                   "repeat it for several).", flag_values=fv),
      brief=flags.DEFINE_bool("brief", False, "Only the run's plan: parameters, tokens, steps, FLOPs and "
                              "time at each --mfu.", flag_values=fv),
      search=flags.DEFINE_bool("search", False, "Enumerate architectures near --target-params.", flag_values=fv),
      target_params=flags.DEFINE_float("target_params", None, "Search: target parameter count.", flag_values=fv),
      head_dim=flags.DEFINE_integer("head_dim", 64, "Search: head dimension (even).", flag_values=fv),
      tied=flags.DEFINE_bool("tied", False, "Search: tie embedding and lm_head.", flag_values=fv),
      vocab=flags.DEFINE_string("vocab", "8192,16384,24576,32768,65536", "Search: vocab sizes.", flag_values=fv),
      depth=flags.DEFINE_string("depth", "2..32", "Search: depths, 'A..B' or 'A,B,C'.", flag_values=fv),
      gqa=flags.DEFINE_integer("gqa", 1, "Search: query heads per kv head (1 = no GQA).", flag_values=fv),
      tolerance=flags.DEFINE_float("tolerance", 0.1, "Search: keep designs within this fraction of the target.",
                                   flag_values=fv),
      top=flags.DEFINE_integer("top", None, "Rows to print (--search: 15, --fit: 5).", flag_values=fv),
      fit=flags.DEFINE_string("fit", None, f"Plan device batch x remat x mesh for a chip: {' | '.join(fit.FIT_CHIPS)} "
                              "(also 4090, 3090, 3080); comma-separated for several.", flag_values=fv),
      memory=flags.DEFINE_string("memory", None, "--fit: memory per chip, e.g. 24GiB or 10GB (alone: at --chip's "
                                 "speed).", flag_values=fv),
      usable=flags.DEFINE_float("usable", None, "--fit: the fraction of a chip's memory a plan's estimate may use "
                                f"(default {memory.PLAN_HEADROOM['tpu']:g} on TPU chips, "
                                f"{memory.PLAN_HEADROOM['gpu']:g} on GPUs).", flag_values=fv),
      check=flags.DEFINE_bool("check", False, "--fit on a TPU chip: compile the best plan with XLA:TPU (libtpu) and "
                              "print its memory beside the estimate.", flag_values=fv),
      markdown=flags.DEFINE_bool("markdown", False, "--fit: one Markdown row a chip (docs/scale-out.md).",
                                 flag_values=fv),
  )


def _fit(f: dict, cfg) -> int:
  """--fit / --memory: the plans' table (0 when one fits, 1 when none does)."""
  if len(f["mfu"]) > 1:
    raise ConfigError(f"--mfu given {len(f['mfu'])} times: --fit takes one")
  names = [n for n in (f["fit"] or "").split(",") if n.strip()] or [None]
  top = 5 if f["top"] is None else f["top"]
  if top < 1:
    raise ConfigError(f"--top={top}: must be >= 1")
  chips = [fit.chip(n, f["memory"], f["chip"]) for n in names]
  if f["check"] and (len(chips) > 1 or f["markdown"]):
    raise ConfigError("--check compiles one chip's best plan: give one --fit chip, without --markdown")
  if f["check"]:
    fit.topology(chips[0], f["chips"])  # bad input fails before the search
  if f["markdown"]:
    print("\n".join(fit.preset_rows(f["config"], cfg, [c.name for c in chips], f["mfu"][0], f["usable"])))
    return 0
  fits = []
  for i, c in enumerate(chips):
    lines, ok = fit.format_plans(cfg, c, f["chips"], f["mfu"][0], f["usable"], top=1 if len(chips) > 1 else top)
    print(("\n" if i else "") + "\n".join(lines))
    fits.append(ok)
  if f["check"] and fits[0]:
    _check(cfg, chips[0], f)
  return 0 if any(fits) else 1


def _check(cfg, c: fit.Chip, f: dict) -> None:
  """XLA:TPU's own memory figure for the best plan's step, beside the estimate."""
  from lmtiny.training import benchmark  # pylint: disable=g-import-not-at-top  (JAX: only for --check)
  best = fit.search(cfg, c, f["chips"], f["mfu"][0], f["usable"])[0][0]
  slice_name = fit.topology(c, f["chips"])
  r = benchmark.compile_report(fit.with_plan(recipe.resolve(cfg), best), slice_name)
  xla, est = r["xla_memory"]["peak"], r["estimate"]["total"]
  print(f"check: XLA:TPU ({slice_name}, compiled in {r['compile_s']:.0f}s): {xla / memory.GIB:.2f} GiB per chip, "
        f"{xla / c.memory:.0%} of the chip; the estimate {est / memory.GIB:.2f} GiB ({est / xla:.2f}x XLA's)")


def run(argv: list[str]) -> int:
  """Parses argv, prints the report or the search table; raises ConfigError on bad input."""

  parsed = cli.parse_flags(argv, _define_flags, __doc__)
  if parsed is None:
    return 0
  f, cfg = parsed
  if f["search"]:
    if f["target_params"] is None:
      raise ConfigError("--target-params is required with --search")
    top = 15 if f["top"] is None else f["top"]
    if top < 1:
      raise ConfigError(f"--top={top}: must be >= 1")
    template = None
    if cfg is not None:
      config_lib.validate_model(cfg.model)
      template = cfg.model
    candidates = arch_search.search(
        target_params=f["target_params"], head_dim=f["head_dim"],
        vocabs=arch_search.parse_int_list(f["vocab"], "--vocab"),
        depths=arch_search.parse_int_list(f["depth"], "--depth"), tied=f["tied"],
        kv_group=f["gqa"], tolerance=f["tolerance"], template=template)
    print(arch_search.format_candidates(candidates[:top], f["target_params"], f["tied"],
                                   template))
    return 0

  if cfg is None:
    raise ConfigError("give --config configs/<size>.py (or --search --target-params N)")
  config_lib.validate(cfg)
  if f["fit"] is not None or f["memory"] is not None:
    return _fit(f, cfg)
  if f["brief"]:
    print("\n".join(run_plan(cfg, chip=f["chip"], num_chips=f["chips"], mfus=tuple(f["mfu"]))))
    return 0
  if len(f["mfu"]) > 1:
    raise ConfigError(f"--mfu given {len(f['mfu'])} times: the full report takes one (--brief prints several)")
  print(report(cfg, tokens_per_param=f["tokens_per_param"], chip=f["chip"],
               mfu=f["mfu"][0], num_chips=f["chips"]))
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run_main(run, argv)


if __name__ == "__main__":
  cli.exit_with(main)
