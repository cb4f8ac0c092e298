"""What kind of run a run directory holds, so that no verb writes into another verb's run.

  check_kind(workdir, "rl")      # before anything is written: RunKindError unless RUN is new or an rl run
  record_kind(workdir, "rl")     # when the run directory is first written (lmtiny.training.loop.write_run_files)

Kinds: `train` (lmtiny.train), `sft` (lmtiny.sft), `rl` (lmtiny.rl), and two that no training
verb writes into, since their checkpoints hold parameters only: `import` (lmtiny.import_hf) and
`merged` (lmtiny.lora merge). RUN/run_kind.json, written once when the directory is first
written, records it as {"kind": "rl"}. Runs made before that file existed have their kind
inferred from what they hold: hf_import.json -> import; a config.json with an `rl` section -> rl;
with sft.merged_from -> merged; with sft.init -> sft; any other config.json -> train. A directory
without config.json holds no run (an attempt killed before writing one): any verb may use it,
unless it holds a file a run would write (RUN_OUTPUTS: a user's own metrics.jsonl, report.md, ...).
"""
from __future__ import annotations

import json
import time

from etils import epath

from lmtiny.errors import ConfigError
from lmtiny.fs.atomic import atomic_write_json
from lmtiny.runs.config_file import MOVE_ASIDE, read_saved_config

MARKER = "run_kind.json"
# What train, sft and rl write into a run directory besides config.json and MARKER (TensorBoard
# event files get new names; eval.json and report.md have their own checks).
RUN_OUTPUTS = ("metrics.jsonl", "loss.png", "reward.png", "report.md", "tokenizer.model", "config_history.jsonl",
               "turn_ending.json", "checkpoints")
IMPORT_RECORD = "hf_import.json"  # lmtiny.interop.convert writes it into an imported run
KINDS = {"train": "a train run (lmtiny.train)", "sft": "an sft run (lmtiny.sft)", "rl": "an rl run (lmtiny.rl)",
         "import": "an imported model (lmtiny.import_hf)", "merged": "a merged LoRA run (lmtiny.lora merge)"}


class RunKindError(ConfigError):
  """A run directory that holds another kind of run than the verb writing it (or an unreadable record)."""


def infer_kind(config: dict, imported: bool = False) -> str:
  """The kind of a run from its config.json (as a dict), for runs without a recorded kind."""
  sft = config.get("sft") if isinstance(config.get("sft"), dict) else {}
  if imported:
    return "import"
  rl = config.get("rl")
  if isinstance(rl, dict) and (rl.get("init") or "init" not in rl):  # an RL run names its init run
    return "rl"                                                      # (runs before rl.init: any rl section)
  if sft.get("merged_from"):
    return "merged"
  return "sft" if sft.get("init") else "train"


def read_kind(workdir: str) -> tuple[str, str] | None:
  """(kind, how it is known: the file it comes from) of the run in `workdir`; None when it holds
  no run (no config.json). RunKindError when run_kind.json cannot be read, ConfigError when config.json cannot."""
  root = epath.Path(workdir)
  marker, config = root / MARKER, root / "config.json"
  if marker.exists():
    try:
      kind = json.loads(marker.read_text()).get("kind")
    except (OSError, ValueError, AttributeError) as e:
      raise RunKindError(f"{marker}: unreadable ({e}); it records what kind of run {workdir} holds") from None
    if kind not in KINDS:
      raise RunKindError(f"{marker}: kind {kind!r} is none of {', '.join(KINDS)}")
    return kind, f"recorded in {marker}"
  saved = read_saved_config(workdir, missing_ok=True, hint=MOVE_ASIDE)
  if saved is None:
    return None
  kind = infer_kind(saved, imported=(root / IMPORT_RECORD).exists())
  return kind, f"inferred from {config}"


def check_kind(workdir: str, kind: str, flag: str = "--workdir") -> None:
  """RunKindError (one line naming `flag`) when `workdir` holds a run of another kind than `kind`,
  or holds no run but a file a run would write over (check_no_run_outputs)."""
  found = read_kind(workdir)
  if found is None:
    check_no_run_outputs(workdir, flag)
    return
  if found[0] == kind:
    return
  held, how = found
  raise RunKindError(f"{flag}={workdir}: holds {KINDS[held]} ({how}), not {KINDS[kind]}; choose another {flag}")


def check_no_run_outputs(workdir: str, flag: str = "--workdir") -> None:
  """RunKindError when `workdir` holds no run (no config.json) but one of the files a run writes
  (RUN_OUTPUTS): a user's metrics.jsonl or report.md, which the run would replace. Other files (a
  speedrun's tokenizer/ and shards/, an attempt's .lock) are left alone and allowed."""
  root = epath.Path(workdir)
  taken = [name for name in RUN_OUTPUTS if (root / name).exists()]
  if taken:
    raise RunKindError(f"{flag}={workdir}: holds {taken[0]} but no lmtiny run (no config.json); a run would "
                       f"replace it: choose a new or empty {flag}")


def record_kind(workdir: str, kind: str) -> None:
  """Writes RUN/run_kind.json unless it exists (the kind was checked by check_kind first)."""
  if kind not in KINDS:
    raise ValueError(f"run kind {kind!r}: none of {', '.join(KINDS)}")
  marker = epath.Path(workdir) / MARKER
  if not marker.exists():
    atomic_write_json(marker, {"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
