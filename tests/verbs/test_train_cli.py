"""The train command's errors (the README's main command itself runs in tests/journeys/test_journey.py)."""
import os
import subprocess
import sys

import pytest

from lm_fixtures import ROOT, xla_flags


def _train(tmp_path, *overrides, workdir="run"):
  cmd = [sys.executable, "-m", "lmtiny.train", "--config", os.path.join(ROOT, "configs", "tiny.py"),
         "--workdir", str(tmp_path / workdir), f"--config.data.cache_dir={tmp_path / 'cache'}", *overrides]
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
  return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)


BAD_CONFIGS = [
    ("--config.model.num_heads=5", "config.model.num_heads=5: must divide model.d_model=192"),
    ("--config.model.num_kv_heads=2", "config.model.num_kv_heads=2: must divide model.num_heads=3"),
    ("--config.model.activation=tanh", "config.model.activation='tanh': must be one of"),
    ("--config.model.attention=flash", "config.model.attention='flash': must be one of"),
    ("--config.model.init=orthogonal", "config.model.init='orthogonal': must be one of"),
    ("--config.train.seq_len=512", "config.train.seq_len=512: exceeds model.max_seq_len=256"),
    ("--config.train.time_budget=-5", "config.train.time_budget=-5.0: must be a finite number >= 0"),
    ("--config.mesh.data=2", "config.mesh="),
    ("--config.train.trackers=tensorboard,mlflow",
     "config.train.trackers='tensorboard,mlflow': 'mlflow' is not one of tensorboard, wandb"),
    ("--config.train.profile_steps=-1", "config.train.profile_steps=-1: must be an integer >= 0 (0 = off)"),
]


@pytest.mark.parametrize("override,message", BAD_CONFIGS)
def test_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, override, message):
  """Through the entry point's main() in this process (the same code a process runs; one real
  process below checks its exit status)."""
  from lmtiny import train
  monkeypatch.chdir(tmp_path)
  argv = ["train", "--config", os.path.join(ROOT, "configs", "tiny.py"), "--workdir", str(tmp_path / "run"),
          f"--config.data.cache_dir={tmp_path / 'cache'}", override]
  assert train.main(argv) == 2
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and message in lines[0], err[-2000:]
  assert os.listdir(tmp_path) == []  # nothing written: no run directory, no data cache


def test_wandb_asked_for_but_not_installed_is_one_line_naming_the_field_and_pip(tmp_path, capsys, monkeypatch):
  """Before any data or run directory: the check is the config's (lmtiny.config.validate_tracking)."""
  from lmtiny import config as config_lib, train
  find_spec = config_lib.importlib.util.find_spec
  monkeypatch.setattr(config_lib.importlib.util, "find_spec", lambda name: None if name == "wandb" else find_spec(name))
  monkeypatch.chdir(tmp_path)
  argv = ["train", "--config", os.path.join(ROOT, "configs", "tiny.py"), "--workdir", str(tmp_path / "run"),
          f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.train.trackers=tensorboard,wandb"]
  assert train.main(argv) == 2
  err = capsys.readouterr().err
  assert [l for l in err.splitlines() if l.startswith("error:")] == [
      "error: config.train.trackers='tensorboard,wandb': wandb is not installed: pip install -e '.[track]' "
      "(or pip install wandb)"], err[-2000:]
  assert os.listdir(tmp_path) == []


def test_bad_config_process_exits_2_with_one_line(tmp_path):
  override, message = BAD_CONFIGS[0]
  result = _train(tmp_path, override)
  assert result.returncode == 2
  lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
  assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "cache")
