"""nanochat's d20 (model, Muon + AdamW, WSD schedule): width 1280, 10 heads x 128, vocab 65,536 (see lmtiny.config.nanochat_config)."""
from lmtiny.config import nanochat_config

NUM_PARAMS = 560_988_160


def get_config():
  return nanochat_config(20)
