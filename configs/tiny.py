"""CPU demo: ~5M parameters that visibly learn the embedded standard-library corpus in minutes.

python -m lmtiny.train --config configs/tiny.py --workdir runs/tiny
"""
from lmtiny.config import base_config

NUM_PARAMS = 5_245_696


def get_config():
  c = base_config()
  c.model.update(vocab_size=4096, num_layers=4, d_model=256, num_heads=4, activation="relu2",
                 max_seq_len=256, qk_norm=True)
  c.train.update(seq_len=256, batch_tokens=8192, steps=300, log_every=10, eval_every=50,
                 eval_batches=4, checkpoint_every=100)
  c.optim.update(lr=3e-3, warmup_steps=30)
  return c
