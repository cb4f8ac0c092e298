"""Architecture calculator: parameter split, FLOPs per token, token budget, training time, memory.

    python -m lmtiny.arch --config configs/d4_38m.py [--config.model.num_layers=8]
        [--tokens-per-param 20] [--chip h100] [--chips 1] [--mfu 0.4]
    python -m lmtiny.arch --config configs/d24_2026.py --brief --chip h100 --chips 8 --mfu 0.4 --mfu 0.55
        (--brief: the run's parameters, tokens, steps, FLOPs and time at each --mfu, in four lines)
    python -m lmtiny.arch --search --target-params 38e6 --head-dim 64 [--tied]
        [--vocab 8192,16384,24576,32768,65536] [--depth 2..32] [--config configs/x.py]
"""
from __future__ import annotations

import sys

from absl import flags

from lmtiny import cli, config as config_lib
from lmtiny.errors import ConfigError
from lmtiny.plan import search as arch_search
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
      top=flags.DEFINE_integer("top", 15, "Search: rows to print.", flag_values=fv),
  )


def run(argv: list[str]) -> int:
  """Parses argv, prints the report or the search table; raises ConfigError on bad input."""

  parsed = cli.parse_flags(argv, _define_flags, __doc__)
  if parsed is None:
    return 0
  f, cfg = parsed
  if f["search"]:
    if f["target_params"] is None:
      raise ConfigError("--target-params is required with --search")
    if f["top"] < 1:
      raise ConfigError(f"--top={f['top']}: must be >= 1")
    template = None
    if cfg is not None:
      config_lib.validate_model(cfg.model)
      template = cfg.model
    candidates = arch_search.search(
        target_params=f["target_params"], head_dim=f["head_dim"],
        vocabs=arch_search.parse_int_list(f["vocab"], "--vocab"),
        depths=arch_search.parse_int_list(f["depth"], "--depth"), tied=f["tied"],
        kv_group=f["gqa"], tolerance=f["tolerance"], template=template)
    print(arch_search.format_candidates(candidates[:f["top"]], f["target_params"], f["tied"],
                                   template))
    return 0

  if cfg is None:
    raise ConfigError("give --config configs/<size>.py (or --search --target-params N)")
  config_lib.validate(cfg)
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
  sys.exit(main())
