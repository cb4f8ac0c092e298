"""38M design (seed 004): depth 4, width 512, 8 heads x 64, vocab 24,576, relu^2 4x MLP, untied.

The split is exactly 1/3 token embedding, 1/3 lm_head, 1/3 transformer blocks (parameter-free
RMSNorm, as in the seed)."""
from lmtiny.config import base_config

NUM_PARAMS = 37_748_736


def get_config():
  c = base_config()
  c.model.update(vocab_size=24576, num_layers=4, d_model=512, num_heads=8, activation="relu2", mlp_ratio=4.0,
                 tie_embeddings=False, norm_scale=False, max_seq_len=2048)
  c.train.update(seq_len=1024, batch_tokens=262144, tokens_per_param=20.0)
  c.train.device_batch_size = 64  # fits one 80 GB H100 (lmtiny.bench --compile-only)
  c.optim.update(lr=3e-3, warmup_steps=200)
  return c
