"""Sweeps: a grid or list of config overrides, each a training run under one directory, then a table,
plots and scaling-law fits.

    python -m lmtiny.sweep --config configs/tiny.py --workdir runs/sweep \\
        --grid model.num_layers=1,2 --grid train.flops_budget=1e12,3e12 [--config.train.eval_every=50]
    python -m lmtiny.sweep ... --run "model.num_layers=2,model.d_model=128" --runs FILE [--part K/N]
    python -m lmtiny.sweep --workdir runs/sweep --summarize

Every run (--run, one per --runs line) is crossed with every point of the grid; `--config.*`
overrides apply to every child. Each child trains as `python -m lmtiny.train` would in
WORKDIR/<name from its overrides>. The plan is recorded in WORKDIR/sweep.json: the same command
again resumes (finished children are left as they are, an interrupted one resumes from its
checkpoint); another plan on that directory is refused. `--part K/N` trains children K, K+N, ...
(`auto`: this host's share under launch/gpu.sh --hosts or Slurm). At the end, and with
--summarize: WORKDIR/results.csv, results.md, report.md and plots (lmtiny.research.report).
Exit status: 0 done or stopped (SIGTERM: re-run to resume), 1 a checkpoint failed to save, 2 bad
flags, config or directory.
"""
from __future__ import annotations

from absl import flags, logging
from etils import epath

from lmtiny import cli
from lmtiny.errors import ConfigError
from lmtiny.fs import outputs
from lmtiny.research import plan as plan_lib
from lmtiny.research.report import summarize
from lmtiny.research.sweep import child_configs, run_children
from lmtiny.runs.config_file import over_defaults
from lmtiny.runs.preemption import Preemption


def _define_flags(fv: flags.FlagValues) -> dict:
  return dict(
      workdir=flags.DEFINE_string("workdir", None, "The sweep's directory (a child run per subdirectory).",
                                  flag_values=fv),
      grid=flags.DEFINE_multi_string("grid", [], "FIELD=V1,V2,...: one axis of the grid (repeatable).",
                                     flag_values=fv),
      run=flags.DEFINE_multi_string("run", [], '"FIELD=V,FIELD=V": one run of the list (repeatable).',
                                    flag_values=fv),
      runs=flags.DEFINE_string("runs", None, "A file of runs, one --run value per line (# comments).",
                               flag_values=fv),
      part=flags.DEFINE_string("part", "1/1", "K/N: train children K, K+N, ... only (hosts split a sweep); "
                               "auto: from LMTINY_PROCESS_ID/LMTINY_NUM_PROCESSES or Slurm.", flag_values=fv),
      summarize=flags.DEFINE_bool("summarize", False, "Only write the table, plots and report of --workdir.",
                                  flag_values=fv),
  )


def _summarize_only(f: dict) -> int:
  if f["config"] or f["grid"] or f["run"] or f["runs"]:
    raise ConfigError("--summarize reads the plan from WORKDIR/sweep.json: give it --workdir alone")
  plan = plan_lib.read_plan(f["workdir"])
  if plan is None:
    raise ConfigError(f"--workdir={f['workdir']}: no {plan_lib.PLAN_FILE} (not a sweep directory)")
  runs = child_configs(over_defaults(plan["base"], where=plan_lib.PLAN_FILE), plan_lib.children_of(plan))
  print("\n".join(summarize(f["workdir"], runs)))
  return 0


def run(argv: list[str]) -> int:
  with Preemption():  # a SIGTERM during start-up stops the child cleanly (the loop inherits it)
    logging.set_verbosity(logging.WARNING)
    parsed = cli.parse_flags(argv, _define_flags, __doc__)
    if parsed is None:
      return 0
    f, cfg = parsed
    if not f["workdir"]:
      raise ConfigError("--workdir is required (the sweep's directory)")
    if f["summarize"]:
      return _summarize_only(f)
    if cfg is None:
      raise ConfigError("--config is required, e.g. --config configs/tiny.py")
    runs = [plan_lib.parse_run(text) for text in f["run"]] + (plan_lib.read_runs_file(f["runs"]) if f["runs"] else [])
    grid = plan_lib.parse_grid(f["grid"])
    if not grid and not runs:
      raise ConfigError('nothing to sweep: give --grid FIELD=V1,V2 and/or --run "FIELD=V,FIELD=V" or --runs FILE')
    part = plan_lib.parse_part(f["part"])
    children = plan_lib.expand(grid, runs)
    if not cfg.train.tracker_group:  # W&B shows a sweep's runs as one group (train.trackers=...,wandb)
      cfg.train.tracker_group = epath.Path(f["workdir"]).name
    checked = child_configs(cfg, children)  # every child's config, before anything is written
    outputs.check_output_dir(f["workdir"], "--workdir")
    fresh = plan_lib.record_plan(f["workdir"], plan_lib.make_plan(cfg, children, f["config"]))
    mine = plan_lib.part_of(checked, part)
    print(f"sweep: {len(children)} children in {f['workdir']} ({'new' if fresh else 'resumed'}); "
          f"part {part[0]}/{part[1]}: {len(mine)} of them")
    happened = run_children(mine, f["workdir"])
    if "stopped" in happened.values():
      return 0
    print("\n".join(summarize(f["workdir"], checked)))
    return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run_main(run, argv)


if __name__ == "__main__":
  cli.exit_with(main)
