"""python -m lmtiny.train --config configs/<size>.py [--config.<field>=<value> ...] [--workdir DIR]

Trains, logs, evaluates, checkpoints and resumes (re-run the same command). With no
`data.shards` configured it trains on the embedded standard-library corpus, building its
tokenizer and shards once (cached). Exit status: 0 done or preempted (SIGTERM: checkpoint
saved), 1 training diverged, 2 bad config or data.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lmtiny import config as config_lib, distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, plots); may be gs://. "
                               "Default: runs/<config name>.")


def _default_workdir() -> str:
  import os
  path = flags.FLAGS["config"].config_filename if hasattr(flags.FLAGS["config"], "config_filename") else "run"
  return os.path.join("runs", os.path.splitext(os.path.basename(path.split(":")[0]))[0])


def run(cfg, workdir: str) -> int:
  """Everything but flag parsing; returns the exit status."""
  from lmtiny.data.dataset import load_data
  from lmtiny import sharding
  from lmtiny.trainer import Trainer, TrainingDiverged, check_batch_divisibility
  try:
    config_lib.validate(cfg)
    check_batch_divisibility(cfg, sharding.make_mesh(cfg.mesh))  # before the data is built
    distributed.check_workdir(workdir)
    data = load_data(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=cfg.train.seq_len)
    trainer = Trainer(cfg, workdir, data)
  except ValueError as e:  # ConfigError, SourceError, TokenizerError, ...: the user's to fix
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    summary = trainer.run()
  except TrainingDiverged as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if summary["val"]:
    (s0, l0, b0), (s1, l1, b1) = summary["val"][0], summary["val"][-1]
    print(f"done: {summary['step']} steps in {summary['seconds']:.0f}s | val loss {l0:.3f} -> {l1:.3f} | "
          f"val bpb {b0:.3f} -> {b1:.3f} | {workdir}")
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  try:
    distributed.initialize()
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if _CONFIG.value is None:
    print("error: --config is required, e.g. --config configs/tiny.py", file=sys.stderr)
    sys.exit(2)
  sys.exit(run(_CONFIG.value, _WORKDIR.value or _default_workdir()))


if __name__ == "__main__":
  app.run(main)
