"""A config file for config_flags that reads an existing run's config.json:

  --config lmtiny/runs/run_config.py:RUN_DIR   (lmtiny.sft and lmtiny.rl insert it when only --init
                                                is given, so --config.<section>.* overrides apply)
"""
from lmtiny.runs.config_file import read_run_config
from lmtiny.runs.directory import check_run_directory


def get_config(run_dir: str):
  check_run_directory(run_dir, "--init")  # not a run (a shard directory, a typo): one line saying so
  return read_run_config(run_dir)
