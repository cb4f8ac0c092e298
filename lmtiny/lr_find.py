"""Learning-rate range test: train briefly with an exponentially growing LR and read the loss curve.

    python -m lmtiny.lr_find --config configs/tiny.py [--min 1e-6 --max 1 --steps 200] [--workdir DIR]

Prints the LR of steepest descent, of the minimum smoothed loss and a suggested peak LR (minimum / 10)
with the flags to use it; writes lr_find.png and lr_find.json to the run directory. The method:
lmtiny.training.lr_range.
"""
from __future__ import annotations

import os

import jax
from absl import flags

from lmtiny import cli
from lmtiny.data.dataset import load_data
from lmtiny.fs.outputs import check_output_dir
from lmtiny.parallel import distributed
from lmtiny.training.lr_range import lr_sweep, range_test, summary, sweep_config, write_outputs
from lmtiny.training.resolved import resolve_run


def _define_flags(fv):
  return dict(
      min=flags.DEFINE_float("min", 1e-6, "Smallest LR of the sweep.", flag_values=fv),
      max=flags.DEFINE_float("max", 1.0, "Largest LR of the sweep.", flag_values=fv),
      steps=flags.DEFINE_integer("steps", 200, "Training steps (one real batch each).", flag_values=fv),
      workdir=flags.DEFINE_string("workdir", None, "Where lr_find.png/json go. Default: runs/<config name>.",
                                  flag_values=fv),
  )


def run(argv: list[str]) -> int:
  parsed = cli.parse_config_flags(argv, _define_flags, __doc__)
  if parsed is None:
    return 0
  f, cfg = parsed
  lr_sweep(f["min"], f["max"], f["steps"])  # bad ranges fail before anything is loaded
  distributed.initialize()  # before anything else touches jax's devices
  run = resolve_run(sweep_config(cfg, f["steps"]))  # a bad config, too
  workdir = f["workdir"] or cli.default_workdir(f["config"])
  check_output_dir(workdir, "--workdir")  # before the sweep, not after it
  distributed.check_workdir(workdir)
  data = load_data(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=cfg.train.seq_len)
  result = range_test(run, data, min_lr=f["min"], max_lr=f["max"], steps=f["steps"], workdir=workdir)
  print(summary(result, cfg.optim))
  if jax.process_index() == 0:
    png, path = write_outputs(result, workdir, title=f"LR range test: {os.path.basename(f['config'])}")
    print(f"wrote {png} and {path}")
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run_main(run, argv)


if __name__ == "__main__":
  cli.exit_with(main)
