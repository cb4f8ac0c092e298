"""python -m lmtiny.rl --init RUN/sft --workdir RUN/rl [--config.rl.<field>=...] [--config.mesh.<axis>=N]

On-policy RL on GSM8K (or the self-generated toy arithmetic set, `--config.rl.data=toy`, no
download) from a chat run's newest usable checkpoint (a LoRA run's adapters folded into its base):
k samples per problem, reward 1 for the right `####` answer, advantage = reward - group mean,
token-level REINFORCE on the sharded train step (see lmtiny.training.policy_gradient). Logs mean
reward and pass@k, evaluates greedy accuracy on held-out problems, checkpoints, and resumes when
re-run.

Config: the init run's config.json, its rl section set with `--config.rl.<field>=...` (defaults in
lmtiny.config: steps, questions, samples, max_new_tokens, temperature, top_k, lr, warmup_steps, kl,
log_every, eval_every, eval_questions, checkpoint_every, seed; data gsm8k|toy, data_dir for local
gsm8k_train.jsonl|parquet and gsm8k.jsonl|parquet instead of the hub). The RL run's config.json
records it. Only config.rl.*, config.mesh.* and the train fields of trackers and profiles
(train.trackers, tracker_group, wandb_project, wandb_mode, profile_steps, profile_skip) are set
here: the rest is the init run's.

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

import sys

from absl import flags, logging

from lmtiny import cli, config as config_lib
from lmtiny.config import MESH_AXES
from lmtiny.errors import ConfigError
from lmtiny.fs import outputs
from lmtiny.runs import card
from lmtiny.runs.preemption import Preemption
from lmtiny.tasks import gsm8k
from lmtiny.tasks.rows import load_rows
from lmtiny.tasks.toy import toy_rows
from lmtiny.training.policy_gradient import Reinforce, TRAIN_FIELDS

RL_FIELDS = tuple(config_lib.base_config().rl)
TRAIN_OVERRIDES = tuple(f"train.{name}" for name in TRAIN_FIELDS)  # trackers and profile: the RL run's own


def _define_flags(fv: flags.FlagValues) -> dict:
  return {
      "init": flags.DEFINE_string("init", None, "Run to start from (its newest checkpoint), e.g. RUN/sft.",
                                  flag_values=fv),
      "workdir": flags.DEFINE_string("workdir", None, "Where the RL run goes, e.g. RUN/rl.", flag_values=fv),
  }


def _check_argv(argv: list[str]) -> None:
  """One line for what this verb does not take: its old flags (now config fields), overrides of
  the init run's config outside rl and mesh, another config file."""
  for arg in argv[1:]:
    name = arg[2:].split("=", 1)[0].replace("-", "_") if arg.startswith("--") else ""
    if name in RL_FIELDS and name != "init":
      raise ConfigError(f"--{name.replace('_', '-')}: RL's settings are config fields: --config.rl.{name}=VALUE")
    if name == "config":
      raise ConfigError("--config: RL's config is the init run's (--init); set its rl section with "
                        "--config.rl.<field>=VALUE")
  for field in cli.config_overrides(argv):
    section = field.split(".", 1)[0]
    if (section not in ("rl", "mesh") or field == "rl.init") and field not in TRAIN_OVERRIDES:
      raise ConfigError(f"--config.{field}: lmtiny.rl sets only --config.rl.*, --config.mesh.* and "
                        f"{', '.join('--config.' + f for f in TRAIN_OVERRIDES)} (the rest is the init run's config; "
                        "the init run is --init)")


def parse(argv: list[str]):
  """(workdir, the rl section, mesh overrides {axis: size}, train fields {field: value}: trackers and
  profile, TRAIN_FIELDS) from the command line (checked with the rest of the RL config, once, when
  Reinforce resolves it); None after --help."""
  _check_argv(argv)
  parsed = cli.parse_flags(cli.with_run_config(argv), _define_flags, __doc__)
  if parsed is None:
    return None
  values, cfg = parsed
  for name, example in (("init", "runs/tiny/sft"), ("workdir", "runs/tiny/rl")):
    if not values[name]:
      raise ConfigError(f"--{name} is required (e.g. --{name} {example})")
  cfg.rl.init = values["init"]
  given = cli.config_overrides(argv)
  mesh = {axis: cfg.mesh[axis] for axis in MESH_AXES if f"mesh.{axis}" in given}  # checked in Reinforce
  train = {name: cfg.train[name] for name in TRAIN_FIELDS if f"train.{name}" in given}
  return values["workdir"], cfg.rl, mesh, train


def load_problems(data: str, data_dir: str | None):
  """(train rows, held-out rows) in GSM8K's layout."""
  if data == "toy":
    return toy_rows(5000, seed=1), toy_rows(500, seed=2, held_out=True)
  hint = ("use --config.rl.data=toy (no download), or point --config.rl.data_dir at a directory holding "
          "gsm8k_train.jsonl and gsm8k.jsonl (or .parquet)")
  return (load_rows("gsm8k_train", gsm8k.TRAIN_SOURCE, data_dir, hint=hint),
          load_rows("gsm8k", gsm8k.SOURCE, data_dir, hint=hint))


def run(argv: list[str]) -> int:
  with Preemption() as early:  # a SIGTERM during start-up (init run, compiles, download) stops cleanly
    return _run(argv, early)


def _run(argv: list[str], early) -> int:
  logging.set_verbosity(logging.WARNING)
  parsed = parse(argv)
  if parsed is None:
    return 0
  workdir, settings, mesh, train = parsed
  outputs.check_output_dir(workdir, "--workdir")
  # The workdir (not the init run, not a run of another kind or shape), init run, mesh: before any download
  rl = Reinforce(settings, workdir, [], [], mesh=mesh, train=train)
  rl.train_rows, rl.eval_rows = load_problems(settings.data, settings.data_dir or None)
  if early.requested:
    print("stopped (SIGTERM) before RL started: nothing to save")
    return 0
  summary = rl.run()
  card.update_for(workdir)
  if summary["history"]:
    first, last = summary["history"][0][1], summary["history"][-1][1]
    done = "stopped (SIGTERM): re-run to resume" if summary["preempted"] else "done"
    print(f"{done}: step {summary['step']} | reward {first:.3f} -> {last:.3f} | {workdir}")
  return 0


def main(argv: list[str] | None = None) -> int:
  """`argv`: the flags alone, without the program's name (default: sys.argv[1:])."""
  return cli.run_main(run, ["lmtiny.rl", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
  cli.exit_with(main)
