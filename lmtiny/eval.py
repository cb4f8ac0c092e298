"""python -m lmtiny.eval --workdir RUN [--step N] --tasks bpb,core,gsm8k [flags]

Tasks: `bpb` (val split of the run's data or --shards DIR), `core` (every CORE-style task:
hellaswag, arc_easy, arc_challenge, piqa, winogrande, lambada) or any of those by name, and
`gsm8k` (generative, chat template, calculator tool; `--gsm8k-data toy` for the self-made
arithmetic set). Task data comes from the tasks' public sources on the Hugging Face hub, or from
--data-dir DIR holding <task>.jsonl|.parquet in the source's layout. Prints a table and merges
the results into RUN/eval.json; the run's report card gets an eval section. A numeric flag out of
range, or a RUN (or the pipeline directory holding its report card) that cannot be written, is
refused in one line before anything is loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from etils import epath

from lmtiny import cli
from lmtiny.errors import UserError
from lmtiny.fs.atomic import atomic_write
from lmtiny.fs.outputs import check_output_dir, check_output_parent
from lmtiny.model.quant import check_flags
from lmtiny.model.sampling import Sampler
from lmtiny.runs import card as report
from lmtiny.runs.directory import load_run
from lmtiny.tasks import core, gsm8k
from lmtiny.tasks.core import core_score, task_names, TASKS
from lmtiny.tasks import model_loading
from lmtiny.tasks.rows import load_rows
from lmtiny.tasks.scoring import Scorer
from lmtiny.tasks.toy import toy_rows
from lmtiny.training.bpb import evaluate_bpb


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m lmtiny.eval", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  p.add_argument("--tasks", default="bpb,core", help="comma list: bpb, core, gsm8k or CORE task names")
  p.add_argument("--shards", default=None, help="bpb: shard directory (default: the run's data)")
  p.add_argument("--eval-batches", type=int, default=0, help="bpb: batches (default: the run's train.eval_batches)")
  p.add_argument("--data-dir", default=None, help="local task files <task>.jsonl|.parquet instead of the hub")
  p.add_argument("--max-items", type=int, default=0, help="items per task (0 = all)")
  p.add_argument("--norm", choices=("token", "char"), default="token", help="CORE: loss normalisation")
  p.add_argument("--gsm8k-data", choices=("gsm8k", "toy"), default="gsm8k")
  p.add_argument("--max-new-tokens", type=int, default=256, help="gsm8k: reply length")
  p.add_argument("--batch", type=int, default=32, help="rows per batch (CORE) / replies per batch (gsm8k)")
  p.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                 help="score the weight-only quantized model (lmtiny.model.quant)")
  p.add_argument("--group-size", type=int, default=None, help="--quantize: input rows per scale")
  return p.parse_args(argv)


# flag -> (smallest value, what it means); None (not given) is always allowed
NUMERIC_FLAGS = {"step": (0, ""), "eval_batches": (0, " (0: the run's train.eval_batches)"),
                 "max_items": (0, " (0: every item)"), "max_new_tokens": (1, ""), "batch": (1, ""),
                 "group_size": (0, " (0: one group per output channel)")}


def check_numbers(args) -> None:
  """Every numeric flag in range, before anything is loaded."""
  for name, (low, meaning) in NUMERIC_FLAGS.items():
    value = getattr(args, name)
    if value is not None and value < low:
      raise UserError(f"--{name.replace('_', '-')}={value}: must be >= {low}{meaning}")


def expand_tasks(spec: str) -> list[str]:
  return task_names(spec, "--tasks", also=("bpb", "gsm8k"))


def evaluate(args) -> dict:
  names = expand_tasks(args.tasks)
  check_numbers(args)
  check_flags(args.quantize, args.group_size)
  run = load_run(args.workdir, args.step)  # the run directory first (cheap), then every task's data,
  rows = {}  # then the weights: a missing file or no network fails before the model loads
  for name in names:
    if name == "gsm8k" and args.gsm8k_data == "toy":
      rows[name] = toy_rows(args.max_items or 200, seed=2, held_out=True)
    elif name == "gsm8k":
      rows[name] = load_rows("gsm8k", gsm8k.SOURCE, args.data_dir, args.max_items, hint=(
          "point --data-dir at a directory holding gsm8k.jsonl or gsm8k.parquet, or use --gsm8k-data toy "
          "(no download)"))
    elif name != "bpb":
      rows[name] = core.load_items(name, args.data_dir, args.max_items)
  loaded = model_loading.load_model(run, quantize=args.quantize, group_size=args.group_size)
  results = {}
  for name in names:
    t0 = time.perf_counter()
    if name == "bpb":
      results[name] = evaluate_bpb(loaded, args.shards, args.eval_batches)
    elif name == "gsm8k":
      import jax
      with jax.set_mesh(loaded.mesh):
        results[name] = gsm8k.evaluate(Sampler(loaded.model), loaded.tokenizer, rows[name],
                                       max_new_tokens=args.max_new_tokens, batch=args.batch)
    else:
      results[name] = core.evaluate_task(Scorer(loaded.model, loaded.mesh, rows_per_batch=args.batch),
                                         loaded.tokenizer, core.TASKS[name], rows[name], args.norm)
    results[name]["seconds"] = time.perf_counter() - t0
  core_names = [n for n in names if n in core.TASKS]
  out = {"step": loaded.step, "results": results}
  if core_names:
    out["core"] = core.core_score({n: results[n] for n in core_names})
  return out


def table(out: dict) -> str:
  lines = [f"{'task':<14} {'metric':<10} {'value':>8} {'items':>7}"]
  for name, r in out["results"].items():
    if name == "bpb":
      lines.append(f"{name:<14} {'bpb':<10} {r['bpb']:>8.4f} {'':>7}")
    elif name == "gsm8k":
      lines.append(f"{name:<14} {'accuracy':<10} {r['accuracy']:>8.4f} {r['items']:>7}")
    else:
      lines.append(f"{name:<14} {'centered':<10} {r['centered']:>8.4f} {r['items']:>7}  (accuracy {r['accuracy']:.4f})")
  if "core" in out:
    lines.append(f"{'CORE':<14} {'mean':<10} {out['core']:>8.4f}")
  return "\n".join(lines)


def _saved_results(path) -> dict:
  """The results saved before: none if absent, and none (with a warning) if the file does not parse,
  so a damaged file costs its old entries, not the evaluation just run."""
  if not path.exists():
    return {}
  try:
    old = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError):
    old = None
  if not isinstance(old, dict):
    print(f"warning: {path}: not an evaluation file; replaced by this evaluation's results", file=sys.stderr)
    return {}
  return old


def save(workdir: str, out: dict, quantize: str = "none") -> str:
  """Merges into RUN/eval.json (a task evaluated again replaces its old result); a quantized
  model's scores go to RUN/eval_<int8|int4>.json beside it."""
  path = epath.Path(workdir) / ("eval.json" if quantize == "none" else f"eval_{quantize}.json")
  old = _saved_results(path)
  merged = {"step": out["step"], "results": {**(old.get("results", {}) if old.get("step") == out["step"] else {}),
                                             **out["results"]}}
  core_results = {n: r for n, r in merged["results"].items() if n in TASKS}
  if core_results:
    merged["core"] = core_score(core_results)
  atomic_write(path, json.dumps(merged, indent=2).encode())
  return str(path)


def run(argv: list[str]) -> int:
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  args = parse_args(argv)
  check_numbers(args)
  # eval.json goes into the run, the report card into its pipeline's root (the parent of a stage
  # run): both known writable before the evaluation, not found unwritable after it
  check_output_dir(args.workdir, "--workdir")
  if report.report_root(args.workdir) != os.path.abspath(args.workdir):
    check_output_parent(args.workdir, "--workdir")
  out = evaluate(args)
  print(table(out))
  print(f"wrote {save(args.workdir, out, args.quantize)}")
  report.update_for(args.workdir)
  return 0


def main(argv=None) -> int:
  return cli.run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  sys.exit(main())
