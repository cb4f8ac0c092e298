"""python -m lmtiny.eval --workdir RUN [--step N] --tasks bpb,core,gsm8k [flags]

Tasks: `bpb` (val split of the run's data or --shards DIR), `core` (DCLM CORE as published: the 22
tasks of the DCLM eval bundle, from --data-dir DIR holding eval_bundle/, else downloaded once into
~/.cache/lmtiny/eval_bundle), `hf6` (six CORE-style tasks from their Hugging Face sources:
hellaswag, arc_easy, arc_challenge, piqa, winogrande, lambada; their mean is "HF6", not CORE) or
any of those six by name (from --data-dir DIR's <task>.jsonl|.parquet in the source's layout, else
the hub), and `gsm8k` (generative, chat template, calculator tool; `--gsm8k-data toy` for the
self-made arithmetic set). `--chat` runs nanochat's chat suite on a chat run instead
(lmtiny.tasks.chat_suite: ARC-Easy/Challenge and MMLU through the chat template, GSM8K, HumanEval
in a sandbox, spelling; `--chat-tasks` picks some). Prints a table and merges
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
from lmtiny.tasks import chat_suite, dclm, gsm8k, hf6, sandbox
from lmtiny.tasks.hf6 import HF6, mean_centered, task_names, TASKS
from lmtiny.tasks import model_loading
from lmtiny.tasks.rows import load_rows, local_file
from lmtiny.tasks.scoring import Scorer
from lmtiny.tasks.toy import toy_rows
from lmtiny.training.bpb import evaluate_bpb


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m lmtiny.eval", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  p.add_argument("--tasks", default="bpb,core", help="comma list: bpb, core (DCLM CORE), hf6 or its task names, gsm8k")
  p.add_argument("--shards", default=None, help="bpb: shard directory (default: the run's data)")
  p.add_argument("--eval-batches", type=int, default=0, help="bpb: batches (default: the run's train.eval_batches)")
  p.add_argument("--data-dir", default=None, help="core: a directory holding eval_bundle/ (or being it); "
                 "hf6 tasks and gsm8k: <task>.jsonl|.parquet files instead of the hub")
  p.add_argument("--max-items", type=int, default=0, help="items per task (0 = all)")
  p.add_argument("--norm", choices=hf6.NORMS, default="token",
                 help="hf6 tasks: loss per token (nanochat's), or lm-eval-harness's acc_norm (char) or acc "
                 "(none); CORE is per token, as published")
  p.add_argument("--gsm8k-data", choices=("gsm8k", "toy"), default="gsm8k")
  p.add_argument("--max-new-tokens", type=int, default=256, help="gsm8k: reply length")
  p.add_argument("--batch", type=int, default=32, help="rows per batch (core, hf6) / replies per batch (gsm8k)")
  p.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                 help="score the weight-only quantized model (lmtiny.model.quant)")
  p.add_argument("--group-size", type=int, default=None, help="--quantize: input rows per scale")
  p.add_argument("--chat", action="store_true", help="nanochat's chat evaluations on a chat run, instead of --tasks")
  p.add_argument("--chat-tasks", default="all", help="--chat: all or a comma list of " + ", ".join(chat_suite.TASKS))
  p.add_argument("--allow-unisolated-code", action="store_true",
                 help="--chat HumanEval: where the kernel allows no user namespaces, run the model's code with "
                 "only rlimits and seccomp instead of refusing (lmtiny.tasks.sandbox)")
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
  return task_names(spec, "--tasks", also=("bpb", dclm.CORE, "gsm8k"))


def evaluate_chat(args) -> dict:
  """--chat: the chat suite; the run, then every task's data, then the weights (as `evaluate`)."""
  names = chat_suite.chat_task_names(args.chat_tasks, "--chat-tasks")
  check_numbers(args)
  check_flags(args.quantize, args.group_size)
  limits = sandbox.Limits(allow_unisolated_code=args.allow_unisolated_code)
  if "humaneval" in names:
    sandbox.check_isolation(limits)  # a kernel that cannot isolate its code: refused before anything loads
  run = load_run(args.workdir, args.step)
  rows = chat_suite.load_chat_rows(names, args.data_dir, args.max_items)
  loaded = model_loading.load_model(run, quantize=args.quantize, group_size=args.group_size)
  results = chat_suite.evaluate_chat_model(loaded.model, loaded.mesh, loaded.tokenizer, rows,
                                           max_new_tokens=args.max_new_tokens, batch=args.batch, limits=limits)
  return {"step": loaded.step, "results": {}, "chat": results}


def evaluate(args) -> dict:
  if args.chat:
    return evaluate_chat(args)
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
      gsm8k.check_problems(rows[name], local_file(args.data_dir, "gsm8k") if args.data_dir else gsm8k.SOURCE)
    elif name == dclm.CORE:
      rows[name] = dclm.load_suite(args.data_dir, args.max_items)
    elif name != "bpb":
      rows[name] = hf6.load_items(name, args.data_dir, args.max_items)
  loaded = model_loading.load_model(run, quantize=args.quantize, group_size=args.group_size)
  results, out = {}, {"step": loaded.step}
  for name in names:
    t0 = time.perf_counter()
    if name == dclm.CORE:  # one result per bundle task, each timed
      suite = dclm.evaluate_core(Scorer(loaded.model, loaded.mesh, rows_per_batch=args.batch), loaded.tokenizer,
                                 rows[name], clock=time.perf_counter)
      results.update(suite["results"])
      out["core"] = suite["core"]
      continue
    if name == "bpb":
      results[name] = evaluate_bpb(loaded, args.shards, args.eval_batches)
    elif name == "gsm8k":
      import jax
      with jax.set_mesh(loaded.mesh):
        results[name] = gsm8k.evaluate(Sampler(loaded.model), loaded.tokenizer, rows[name],
                                       max_new_tokens=args.max_new_tokens, batch=args.batch)
    else:
      results[name] = hf6.evaluate_task(Scorer(loaded.model, loaded.mesh, rows_per_batch=args.batch),
                                         loaded.tokenizer, hf6.TASKS[name], rows[name], args.norm)
    results[name]["seconds"] = time.perf_counter() - t0
  out["results"] = results
  hf6_results = {n: results[n] for n in names if n in TASKS}
  if hf6_results:
    out[HF6] = mean_centered(hf6_results)
  return out


def _hf6_label(results: dict) -> str:
  n = sum(name in TASKS for name in results)
  return "HF6 mean" if n == len(TASKS) else f"HF6 mean ({n}/{len(TASKS)})"


def table(out: dict) -> str:
  lines = [f"{'task':<38} {'metric':<10} {'value':>8} {'items':>7} {'seconds':>8}"]
  for name, r in out["results"].items():
    seconds = f"{r['seconds']:>8.2f}" if "seconds" in r else f"{'':>8}"
    if name == "bpb":
      lines.append(f"{name:<38} {'bpb':<10} {r['bpb']:>8.4f} {'':>7} {seconds}")
    elif name == "gsm8k":
      lines.append(f"{name:<38} {'accuracy':<10} {r['accuracy']:>8.4f} {r['items']:>7} {seconds}")
    else:
      lines.append(f"{name:<38} {'centered':<10} {r['centered']:>8.4f} {r['items']:>7} {seconds}"
                   f"  (accuracy {r['accuracy']:.4f})")
  if HF6 in out:
    lines.append(f"{_hf6_label(out['results']):<38} {'centered':<10} {out[HF6]:>8.4f}")
  if "core" in out:
    lines.append(f"{f'CORE (DCLM, {len(_core_tasks(out))} tasks)':<38} {'centered':<10} {out['core']:>8.4f}")
  return "\n".join(lines)


EVAL_FORMAT = "lmtiny-eval/1"
# The keys of one step's view; any other top-level key (a user's own) is kept as it is
_VIEW_KEYS = ("step", "results", HF6, "core", "chat", "chatcore")


class EvalFileError(UserError):
  """An eval.json lmtiny did not write (or cannot read): never replaced."""


def eval_path(workdir: str, quantize: str = "none") -> epath.Path:
  return epath.Path(workdir) / ("eval.json" if quantize == "none" else f"eval_{quantize}.json")


def read_eval_file(path) -> dict:
  """What RUN/eval.json holds ({} when absent); EvalFileError naming the file when it is not one
  lmtiny wrote: not JSON, or neither this format's mark nor the step and results every earlier
  lmtiny wrote. Checked before the model loads, so nothing is evaluated for a file that stays."""
  if not path.exists():
    return {}
  try:
    old = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
    raise EvalFileError(f"{path}: not an evaluation file lmtiny wrote ({type(e).__name__}); left as it is: "
                        "move it to keep this evaluation's results") from None
  ours = isinstance(old, dict) and (old.get("format") == EVAL_FORMAT or (
      isinstance(old.get("step"), int) and isinstance(old.get("results"), dict)))
  if not ours:
    raise EvalFileError(f"{path}: not an evaluation file lmtiny wrote (no '{EVAL_FORMAT}' format, no step and "
                        "results); left as it is: move it to keep this evaluation's results")
  return old


def _core_tasks(out: dict) -> list[str]:
  return [n for n in out["results"] if n.startswith(dclm.KEY_PREFIX)]


def _merge_view(old: dict, out: dict) -> dict:
  """One step's results: `old` (that step's earlier view, or {}) with this evaluation's over it."""
  merged = {"step": out["step"], "results": {**old.get("results", {}), **out["results"]}}
  hf6_results = {n: r for n, r in merged["results"].items() if n in TASKS}
  if hf6_results:
    merged[HF6] = mean_centered(hf6_results)
  # CORE only as one evaluation of the whole bundle computed it: kept from before while no CORE task
  # of this evaluation replaced one of its results
  if "core" in out:
    merged["core"] = out["core"]
  elif "core" in old and _core_tasks(merged) and not _core_tasks(out):
    merged["core"] = old["core"]
  # chat results under their own key: the chat arc_easy is not the likelihood task of that name
  chat = {**old.get("chat", {}), **out.get("chat", {})}
  if chat:
    merged["chat"] = chat
    if chat_suite.chat_core(chat) is not None:
      merged["chatcore"] = chat_suite.chat_core(chat)
  return merged


def save(workdir: str, out: dict, quantize: str = "none") -> str:
  """Merges into RUN/eval.json: the top level is the newest evaluated step's view (a task
  evaluated again replaces its old result; "hf6": the mean of the HF6 tasks held, "core": DCLM
  CORE); other steps' views stay under "steps"; keys lmtiny does not write stay as they are. A
  quantized model's scores go to RUN/eval_<int8|int4>.json beside it."""
  path = eval_path(workdir, quantize)
  old = read_eval_file(path)
  steps = dict(old.get("steps", {}))
  if "step" in old:
    steps[str(old["step"])] = {k: old[k] for k in _VIEW_KEYS if k in old}
  merged = _merge_view(steps.pop(str(out["step"]), {}), out)
  extra = {k: v for k, v in old.items() if k not in _VIEW_KEYS + ("format", "steps")}
  record = {"format": EVAL_FORMAT, **merged, **extra}
  if steps:
    record["steps"] = steps
  atomic_write(path, json.dumps(record, indent=2).encode())
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
  read_eval_file(eval_path(args.workdir, args.quantize))  # someone else's eval.json: refused before the model loads
  out = evaluate(args)
  print(chat_suite.chat_table(out["chat"]) if args.chat else table(out))
  print(f"wrote {save(args.workdir, out, args.quantize)}")
  report.update_for(args.workdir)
  return 0


def main(argv=None) -> int:
  return cli.run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  cli.exit_with(main)
