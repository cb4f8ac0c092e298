"""nanochat's d12 (model, Muon + AdamW, WSD schedule): width 768, 6 heads x 128, vocab 65,536 (see lmtiny.config.nanochat_config)."""
from lmtiny.config import nanochat_config

NUM_PARAMS = 185_597_952


def get_config():
  return nanochat_config(12)
