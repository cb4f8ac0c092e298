"""38M design (seed 004): depth 7, width 384, 6 heads x 64, vocab 32,768, relu^2 4x MLP, untied."""
from lmtiny.config import base_config

NUM_PARAMS = 37_552_128


def get_config():
  c = base_config()
  c.model.update(vocab_size=32768, num_layers=7, d_model=384, num_heads=6, activation="relu2", mlp_ratio=4.0,
                 tie_embeddings=False, norm_scale=False, max_seq_len=2048)
  c.train.update(seq_len=1024, batch_tokens=262144, tokens_per_param=20.0)
  c.train.device_batch_size = 64  # fits one 80 GB H100 (lmtiny.bench --compile-only)
  c.optim.update(lr=3e-3, warmup_steps=200)
  return c
