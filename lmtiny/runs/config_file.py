"""A run's config.json, read one way by every reader: loading a run, fine-tuning from it, resuming
it, the report card.

  saved = read_saved_config(workdir)           # the dict the run recorded
  cfg = read_run_config(workdir)               # a ConfigDict: the recorded fields over today's defaults
  cfg = over_defaults(saved)                   # the same, for a dict already read

This is the one place a default meets a recorded config: the library reads fields, never
`.get(field, default)` (tests/test_config_defaults.py).

A file that is not a JSON object (torn by a crash, edited by hand) is one line naming it, a
ConfigError: `RUN/config.json: unreadable (Expecting value: line 1 column 1 (char 0))`.
"""
from __future__ import annotations

import json

import ml_collections
from etils import epath

from lmtiny import config as config_lib
from lmtiny.errors import ConfigError

FILE = "config.json"
MOVE_ASIDE = "move it aside to start over in this directory"  # the hint where a run would be resumed


def read_saved_config(workdir: str, *, missing_ok: bool = False, hint: str = "") -> dict | None:
  """The dict in RUN/config.json (None when it is missing and `missing_ok`). ConfigError naming
  the file, with `hint` appended, when it cannot be read or holds no JSON object."""
  path = epath.Path(workdir) / FILE
  if missing_ok and not path.exists():
    return None
  try:
    saved = json.loads(path.read_text())
    if not isinstance(saved, dict):
      raise ValueError(f"a JSON {type(saved).__name__}, not an object")
  except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
    raise ConfigError(f"{path}: unreadable ({e})" + (f"; {hint}" if hint else "")) from None
  return saved


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """RUN/config.json over today's defaults (over_defaults)."""
  return over_defaults(read_saved_config(workdir), where=str(epath.Path(workdir) / FILE))


def over_defaults(saved: dict, where: str = FILE) -> ml_collections.ConfigDict:
  """A recorded config over today's defaults: a run recorded before a section or field existed
  (sft, lora, model.qk_scale) reads with its default; a field no longer known is dropped. A value
  of the wrong type is a ConfigError naming `where` and the field."""
  cfg = config_lib.base_config()
  for section, values in saved.items():
    if section in cfg and isinstance(values, dict):
      for field, value in values.items():
        if field in cfg[section]:
          try:
            cfg[section][field] = value
          except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {section}.{field}={value!r} ({e})") from None
  return cfg
