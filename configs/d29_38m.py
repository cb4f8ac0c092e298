"""38M design (seed 004): depth 29, width 192, 3 heads x 64, vocab 65,536, relu^2 4x MLP, untied."""
from lmtiny.config import base_config

NUM_PARAMS = 37_994_496


def get_config():
  c = base_config()
  c.model.update(vocab_size=65536, num_layers=29, d_model=192, num_heads=3, activation="relu2", mlp_ratio=4.0,
                 tie_embeddings=False, norm_scale=False, max_seq_len=2048,
                 scan_layers=True)  # 29 layers: one scanned body compiles 2.6x faster and keeps less
  c.train.update(seq_len=1024, batch_tokens=262144, tokens_per_param=20.0)
  c.train.device_batch_size = 32  # fits one 80 GB H100 (lmtiny.bench --compile-only)
  c.optim.update(lr=3e-3, warmup_steps=200)
  return c
