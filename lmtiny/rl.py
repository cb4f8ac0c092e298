"""python -m lmtiny.rl --init RUN/sft --workdir RUN/rl [--data toy|gsm8k] [flags]

On-policy RL on GSM8K (or the self-generated toy arithmetic set, `--data toy`, no download) from
a chat run's newest usable checkpoint (a LoRA run's adapters folded into its base): k samples
per problem, reward 1 for the right `####` answer, advantage = reward - group mean, token-level
REINFORCE on the sharded train step (see lmtiny.training.policy_gradient). Logs mean reward and pass@k,
evaluates greedy accuracy on held-out problems, checkpoints, and resumes when re-run.

Mesh: the init run's (as lmtiny.sft inherits its base run's); `--config.mesh.data=N`,
`--config.mesh.fsdp=N`, `--config.mesh.tensor=N` override axes, spelled as train and sft spell
them (-1 fills the devices). An inherited mesh that does not fit this machine's devices falls
back to one with the same layout (FSDP stays FSDP) and says so.

Faults, as for train: one run per workdir (its lock); SIGTERM saves a checkpoint at the current
step and exits 0; a corrupt newest checkpoint is moved aside and the run resumes from the newest
one that restores; a checkpoint that fails to save (disk full) is one `error:` line, exit status 1.
Bad input: one `error:` line, exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from lmtiny import cli
from lmtiny.config import MESH_AXES
from lmtiny.errors import UserError
from lmtiny.fs import outputs
from lmtiny.runs import card as report
from lmtiny.runs.preemption import Preemption
from lmtiny.tasks import gsm8k
from lmtiny.tasks.rows import load_rows
from lmtiny.tasks.toy import toy_rows
from lmtiny.training.policy_gradient import check_values, Reinforce, RLSettings


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one `error:` line, exit status 2 (cli.run_main), not usage + message
    raise UserError(message)


def parse_args(argv):
  """The flags, each RL setting checked here (finite, in range), before anything is read or written."""
  p = _Parser(prog="python -m lmtiny.rl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--init", required=True, help="run to start from (its newest checkpoint), e.g. RUN/sft")
  p.add_argument("--workdir", required=True, help="where the RL run goes, e.g. RUN/rl")
  p.add_argument("--data", choices=("toy", "gsm8k"), default="gsm8k")
  p.add_argument("--data-dir", default=None, help="local gsm8k_train.jsonl|parquet and gsm8k.jsonl|parquet "
                                                  "(GSM8K's layout) instead of the hub")
  for f in dataclasses.fields(RLSettings):
    p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
  for axis in MESH_AXES:  # checked once by reinforce.mesh_overrides (in Reinforce), so a bad value is one line
    p.add_argument(f"--config.mesh.{axis}", dest=f"mesh_{axis}", default=None, metavar="N",
                   help=f"mesh {axis} axis size, -1 = the remaining devices (default: the init run's mesh)")
  args = p.parse_args(argv)
  check_values(settings_of(args))
  return args


def settings_of(args):
  """The RLSettings the parsed flags give."""
  return RLSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RLSettings)})


def load_problems(data: str, data_dir: str | None):
  """(train rows, held-out rows) in GSM8K's layout."""
  if data == "toy":
    return toy_rows(5000, seed=1), toy_rows(500, seed=2, held_out=True)
  hint = ("use --data toy (no download), or point --data-dir at a directory holding gsm8k_train.jsonl and "
          "gsm8k.jsonl (or .parquet)")
  return (load_rows("gsm8k_train", gsm8k.TRAIN_SOURCE, data_dir, hint=hint),
          load_rows("gsm8k", gsm8k.SOURCE, data_dir, hint=hint))


def run(argv: list[str]) -> int:
  with Preemption() as early:  # a SIGTERM during start-up (init run, compiles, download) stops cleanly
    return _run(argv, early)


def _run(argv: list[str], early) -> int:
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  args = parse_args(argv)
  outputs.check_output_dir(args.workdir, "--workdir")
  settings = settings_of(args)
  mesh = {axis: getattr(args, f"mesh_{axis}") for axis in MESH_AXES}  # checked once, in Reinforce
  # The workdir (not the init run, not a run of another kind or shape), init run, mesh: before any download
  rl = Reinforce(args.init, args.workdir, settings, [], [], mesh=mesh)
  rl.train_rows, rl.eval_rows = load_problems(args.data, args.data_dir)
  if early.requested:
    print("stopped (SIGTERM) before RL started: nothing to save")
    return 0
  summary = rl.run()
  report.update_for(args.workdir)
  if summary["history"]:
    first, last = summary["history"][0][1], summary["history"][-1][1]
    done = "stopped (SIGTERM): re-run to resume" if summary["preempted"] else "done"
    print(f"{done}: step {summary['step']} | reward {first:.3f} -> {last:.3f} | {args.workdir}")
  return 0


def main(argv=None) -> int:
  return cli.run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  sys.exit(main())
