"""lmtiny.runs.config_file: a run's config.json, read one way; a torn file is one line naming it."""
import json

import pytest

from lmtiny import config as config_lib
from lmtiny.errors import ConfigError
from lmtiny.runs.config_file import MOVE_ASIDE, read_run_config, read_saved_config


@pytest.mark.parametrize("text, why", [('{"model": {"d_mod', "Unterminated string"), ("[1, 2]", "a JSON list, not an object"),
                                       (b"\xff\xfe", "codec can't decode")])
def test_a_torn_config_is_one_line_naming_the_file(tmp_path, text, why):
  path = tmp_path / "config.json"
  path.write_bytes(text if isinstance(text, bytes) else text.encode())
  with pytest.raises(ConfigError) as e:
    read_saved_config(str(tmp_path))
  assert str(e.value).startswith(f"{path}: unreadable (") and why in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(ConfigError, match=f"; {MOVE_ASIDE}$"):
    read_saved_config(str(tmp_path), missing_ok=True, hint=MOVE_ASIDE)


def test_a_missing_config(tmp_path):
  assert read_saved_config(str(tmp_path), missing_ok=True) is None
  with pytest.raises(ConfigError, match=rf"^{tmp_path / 'config.json'}: unreadable \("):
    read_saved_config(str(tmp_path))


def test_an_older_run_reads_over_todays_defaults(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model": {"d_model": 64, "gone": 1}, "train": 3, "old": {}}))
  assert read_saved_config(str(tmp_path))["model"] == {"d_model": 64, "gone": 1}
  cfg = read_run_config(str(tmp_path))
  defaults = config_lib.base_config()
  assert cfg.model.d_model == 64 and "gone" not in cfg.model and "old" not in cfg
  assert cfg.sft == defaults.sft and cfg.train == defaults.train and cfg.model.num_layers == defaults.model.num_layers
