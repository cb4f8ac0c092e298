"""python -m lmtiny.sft --init RUN [--config configs/<size>.py] [--config.sft.<field>=...]
                       [--config.lora.rank=8] [--init-step N] [--workdir RUN/sft] [--report]

Fine-tunes the base run RUN (its newest checkpoint, or --init-step) on conversations: the
weighted mixture config.sft.sources (default: the embedded standard-library question set, no
download; add `pretrain:0.2` for midtraining, `path.jsonl:0.5` or `hf:...` for SmolTalk-style
`messages` rows; `nanochat?data_dir=DIR` for nanochat's SFT mixture and rows, with
--config.sft.load_optimizer=True --config.sft.init_lr_frac=0.8 for its warm start). Without
--config the base run's own config.json is the config. With config.lora.rank > 0 only LoRA
adapters train (merge them with `python -m lmtiny.lora merge`). Re-running resumes. --report
then samples replies to held-out questions from the base and the fine-tuned model and prints the
share that end with <|assistant_end|> within 64 tokens.
Exit status: 0 done or stopped by SIGTERM (checkpoint saved: re-run to resume), 1 training
diverged or a checkpoint failed to save, 2 bad config, flags or data.
"""
from __future__ import annotations

import os

from absl import flags, logging
from flax import nnx

from lmtiny import cli
from lmtiny.chat import finetune as ft
from lmtiny.chat.turn_ending import assistant_end_report, held_out_questions, save_turn_ending
from lmtiny.fs import outputs
from lmtiny.runs import card
from lmtiny.runs.metrics import read_metrics
from lmtiny.runs.preemption import Preemption
from lmtiny.training import resume
from lmtiny.training.resolved import resolve_run


def _define_flags(fv: flags.FlagValues) -> dict:
  return {
      "init": flags.DEFINE_string("init", None, "Base run directory to fine-tune.", flag_values=fv),
      "init_step": flags.DEFINE_integer("init_step", -1, "Base checkpoint step (-1: the newest).", flag_values=fv),
      "workdir": flags.DEFINE_string("workdir", None, "Run directory (default: <init>/sft).", flag_values=fv),
      "report": flags.DEFINE_bool("report", False, "Measure the <|assistant_end|> share before and after.",
                                  flag_values=fv),
  }


def run(argv: list[str]) -> int:
  with Preemption():  # a SIGTERM during start-up stops the run cleanly: the trainer's loop inherits it
    return _run(argv)


def _run(argv: list[str]) -> int:
  logging.set_verbosity(logging.WARNING)
  parsed = cli.parse_config_flags(cli.with_run_config(argv), _define_flags, __doc__)
  if parsed is None:
    return 0
  values, cfg = parsed
  run = resolve_run(ft.sft_config(cfg, values["init"], values["init_step"]))  # checked once, before anything loads
  cfg = run.cfg
  workdir = values["workdir"] or os.path.join(values["init"] or cfg.sft.init, "sft")
  outputs.check_output_dir(workdir, "--workdir")  # a read-only location: one line now, not a traceback later
  ft.check_sft_workdir(workdir, cfg.sft.init)
  resume.config_changes(workdir, cfg)  # a change of shapes: one line before the base weights load
  trainer, summary = ft.finetune(run, workdir)  # diverged or a failed save: RunFailed, exit 1
  train = [r["loss"] for r in read_metrics(workdir) if r.get("split") == "train"]  # a finished run re-run: its last
  loss = train[-1] if train else float("nan")
  val = f" | held-out loss {summary['val'][0][1]:.3f} -> {summary['val'][-1][1]:.3f}" if len(summary["val"]) > 1 else ""
  done = "stopped (SIGTERM): re-run to resume" if summary["preempted"] else "done"
  print(f"{done}: {summary['step']} steps | final train loss {loss:.4f}{val} | trainable "
        f"{summary['trainable_params']:,} params | optimizer state {summary['optimizer_bytes'] / 2**20:.2f} MiB | {workdir}")
  if values["report"]:
    questions = held_out_questions()
    graphdef, steps = trainer.steps.graphdef, trainer.steps
    base = ft.restore_base_params(cfg, trainer.mesh)
    tuned = steps.model_params(trainer.state["params"])
    reports = {}
    for name, params in (("base", base), ("sft", tuned)):
      reports[name] = report = assistant_end_report(nnx.merge(graphdef, params), trainer.data.tokenizer, questions)
      print(f"{name}: replies ending with <|assistant_end|> within 64 tokens: {report} | "
            f"e.g. {report.example[0]!r} -> {report.example[1]!r}")
    save_turn_ending(workdir, reports["base"], reports["sft"])  # the report card's turn-ending row
    card.update_for(workdir)
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run_main(run, argv)


if __name__ == "__main__":
  cli.exit_with(main)
