"""python -m lmtiny.train --config configs/<size>.py [--config.<field>=<value> ...] [--workdir DIR]

Trains, logs, evaluates, checkpoints and resumes (re-run the same command). With no
`data.shards` configured it trains on the embedded standard-library corpus, building its
tokenizer and shards once (cached). Exit status: 0 done or preempted (SIGTERM: checkpoint
saved; SIGTERM before the first step: nothing to save), 1 training diverged or a checkpoint
failed to save (disk full: the previous checkpoint is intact), 2 bad config, flags, data or run
directory (another run holds it, its config changed shape, no checkpoint in it restores).
"""
from __future__ import annotations

from absl import flags, logging

from lmtiny import cli
from lmtiny.data.dataset import load_data
from lmtiny.fs import outputs
from lmtiny.parallel import distributed
from lmtiny.runs import card, metrics
from lmtiny.runs.preemption import Preemption
from lmtiny.training.resolved import resolve_run
from lmtiny.training.trainer import Trainer


def _define_flags(fv: flags.FlagValues) -> dict:
  return {"workdir": flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, plots); "
                                         "may be gs://. Default: runs/<config name>.", flag_values=fv)}


def train(cfg, workdir: str, preemption=None) -> int:
  """Everything after flag parsing; returns the exit status (UserError and RunFailed propagate)."""
  run = resolve_run(cfg)  # checked once, before any data is built
  cfg = run.cfg
  outputs.check_output_dir(workdir, "--workdir")
  distributed.check_workdir(workdir)
  distributed.check_shared_workdir(workdir)
  data = load_data(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=cfg.train.seq_len)
  if preemption is not None and preemption.requested and distributed.process_count() == 1:
    print("stopped (SIGTERM) before training started: nothing to save")
    return 0
  trainer = Trainer(run, workdir, data)
  summary = trainer.run()  # diverged or a failed save: RunFailed, one line and exit 1 (cli.run_main)
  card.update_for(workdir)
  # The whole run's val curve and wall time, over every segment (a resumed run starts mid-way).
  records = metrics.read_metrics(workdir) if trainer.main else []
  val = [r for r in records if r.get("split") == "val"]
  if summary["preempted"] and trainer.main:
    print(f"stopped (SIGTERM) at step {summary['step']}: re-run the same command to resume | {workdir}")
  elif val and summary["val"]:
    first, last = val[0], val[-1]
    ended = summary["ended_by"] + (f" ({summary['train_seconds']:.1f}s of training)" if "train_seconds" in summary else "")
    print(f"done: {summary['step']} steps in {metrics.wall_seconds(records):.0f}s, ended by {ended} | "
          f"val loss {first['loss']:.3f} -> "
          f"{last['loss']:.3f} | val bpb {first['bpb']:.3f} -> {last['bpb']:.3f} | {workdir}")
  return 0


def run(argv: list[str]) -> int:
  with Preemption() as early:  # a SIGTERM during start-up stops the run cleanly (exit 0)
    return _run(argv, early)


def _run(argv: list[str], early) -> int:
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  parsed = cli.parse_config_flags(argv, _define_flags, __doc__)
  if parsed is None:
    return 0
  values, cfg = parsed
  distributed.initialize()
  return train(cfg, values["workdir"] or cli.default_workdir(values["config"]), early)


def main(argv: list[str] | None = None) -> int:
  return cli.run_main(run, argv)


if __name__ == "__main__":
  cli.exit_with(main)
