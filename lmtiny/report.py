"""Rebuilds a pipeline run's report card, RUN/report.md (see lmtiny.runs.card for what it reads).

  python -m lmtiny.report --workdir RUN [--price-per-chip-hour 2.5]
"""
from __future__ import annotations

import argparse
import os
import sys

from etils import epath

from lmtiny import cli
from lmtiny.errors import UserError
from lmtiny.fs import outputs
from lmtiny.runs.card import check_card, exists, is_run, report_root, ReportError, STAGES, write_report


def run(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="python -m lmtiny.report", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--price-per-chip-hour", type=float, default=None)
  args = p.parse_args(argv)
  if not epath.Path(args.workdir).is_dir():
    raise UserError(f"--workdir={args.workdir}: no such directory")
  if args.price_per_chip_hour is not None and not args.price_per_chip_hour >= 0:
    raise UserError(f"--price-per-chip-hour={args.price_per_chip_hour:g}: must be a number >= 0")
  root = report_root(args.workdir)
  if not is_run(root):
    raise ReportError(f"--workdir={args.workdir}: not an lmtiny run (no run_kind.json, no config.json with "
                      "metrics or checkpoints): nothing to report")
  check_card(root)  # someone else's report.md: one line, nothing written
  for _, rel in STAGES:  # the card, the settings and every stage's plot: all writable, before any is written
    if exists(root, rel):
      outputs.check_output_dir(os.path.join(root, rel) if rel else root, "--workdir")
  print(f"wrote {write_report(root, args.price_per_chip_hour)}")
  return 0


def main(argv=None) -> int:
  return cli.run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  cli.exit_with(main)
