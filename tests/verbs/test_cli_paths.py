"""lmtiny.cli's one-line errors where a config file is the messenger: an error a config file's
get_config() raises (lmtiny.sft reads a base run's config.json as its config) reaches the user as
its own one line, not as config_flags' flattened traceback."""
import pytest

from lmtiny import cli, train
from lmtiny.errors import ConfigError


def _define(fv):
  return {}


def test_an_error_from_get_config_is_its_own_one_line(tmp_path, capsys):
  config = tmp_path / "raises.py"
  config.write_text("from lmtiny.config import ConfigError\n\n"
                    "def get_config():\n  raise ConfigError('--init=data/x: not a run directory')\n")
  with pytest.raises(ConfigError) as e:
    cli.parse_config_flags(["prog", f"--config={config}"], _define, "usage")
  assert str(e.value) == "--init=data/x: not a run directory"
  assert train.main(["train", f"--config={config}"]) == 2
  assert capsys.readouterr().err == "error: --init=data/x: not a run directory\n"


def test_other_flag_errors_stay_one_line(tmp_path):
  config = tmp_path / "bad.py"
  config.write_text("def get_config():\n  raise ValueError('not a config')\n")
  with pytest.raises(ConfigError) as e:
    cli.parse_config_flags(["prog", f"--config={config}"], _define, "usage")
  assert "\n" not in str(e.value) and "not a config" in str(e.value)
