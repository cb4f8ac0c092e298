"""nanochat's d32 (model, Muon + AdamW, WSD schedule): width 2048, 16 heads x 128, vocab 65,536 (see lmtiny.config.nanochat_config)."""
from lmtiny.config import nanochat_config

NUM_PARAMS = 1_879_048_192


def get_config():
  return nanochat_config(32)
