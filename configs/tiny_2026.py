"""CPU demo of nanochat's 2026 recipe (lmtiny.config.nanochat_leaderboard_config) at the tiny demo's width:
4 layers (room for the SSSL window pattern) of 192 (3 heads x 64), a 4,096-token vocab, 256-token
rows with 128-token windows on the S layers.

python -m lmtiny.train --config configs/tiny_2026.py --workdir runs/tiny_2026
"""
from lmtiny.config import nanochat_leaderboard_config

NUM_PARAMS = 4_915_306


def get_config():
  c = nanochat_leaderboard_config(4)
  c.model.update(vocab_size=4096, d_model=192, num_heads=3, head_dim=64, max_seq_len=256, dtype="auto", remat="none")
  c.train.update(seq_len=256, batch_tokens=4096, steps=150, tokens_per_param=0.0, auto_batch=False,
                 lr_batch_scaling=False, weight_decay_scaling=False, device_batch_size=0, log_every=10,
                 eval_every=50, eval_batches=4, checkpoint_every=50, sample_prompt="def ")
  # Rows stay concatenated here, unlike d12_2026/d24_2026: the embedded corpus's documents are long
  # (mean 2,465 tokens), so best-fit rows of 256 would crop 88% of its tokens (docs/data.md).
  return c
