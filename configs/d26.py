"""nanochat's d26 (model, Muon + AdamW, WSD schedule): width 1664, 13 heads x 128, vocab 65,536 (see lmtiny.config.nanochat_config)."""
from lmtiny.config import nanochat_config

NUM_PARAMS = 1_081_999_360


def get_config():
  return nanochat_config(26)
