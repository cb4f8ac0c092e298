"""lmtiny.runs.config_file: a run's config.json, read one way; a torn file is one line naming it."""
import json

import pytest

from lmtiny import config as config_lib
from lmtiny.errors import ConfigError
from lmtiny.runs.config_file import MOVE_ASIDE, over_defaults, read_run_config, read_saved_config


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


def test_a_field_of_the_wrong_type_names_the_file_and_field(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model": {"num_layers": "four"}}))
  with pytest.raises(ConfigError) as e:
    read_run_config(str(tmp_path))
  assert str(e.value).startswith(f"{tmp_path / 'config.json'}: model.num_layers='four' (") and "\n" not in str(e.value)


def test_a_run_recorded_before_a_model_field_existed_reads_with_its_default():
  """The reads that restated defaults (`m.get("qk_scale", 1.0)`) are gone: a config.json without
  today's model fields reads through over_defaults, and the derived values come out as before."""
  saved = json.loads(config_lib.base_config().to_json_best_effort())
  for field in ("qk_scale", "vocab_multiple", "window_pattern", "matmul_dtype", "loss_kernel", "embed_norm"):
    del saved["model"][field]
  cfg = over_defaults(saved)
  assert cfg.model.qk_scale == 1.0 and cfg.model.vocab_multiple == 1 and cfg.model.loss_kernel == "auto"
  assert config_lib.padded_vocab(cfg.model) == cfg.model.vocab_size and config_lib.layer_windows(cfg.model) == (0,) * 4
