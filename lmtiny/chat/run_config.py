from lmtiny.chat.finetune import read_run_config
"""A config file for config_flags that reads an existing run's config.json:

  --config lmtiny/chat/run_config.py:RUN_DIR   (lmtiny.sft inserts it when only --init is given,
                                                so --config.sft.*=... overrides still apply)
"""


def get_config(run_dir: str):
  return read_run_config(run_dir)
