"""CPU demo with a Llama-compatible architecture (exports with `python -m lmtiny.export`):
the tiny demo's 2 x 192 shape with SwiGLU (8/3 x hidden), learned RMSNorm scales, no QK-norm,
no softcap, untied embeddings; ~2.5M parameters, trains on the embedded corpus in minutes.

python -m lmtiny.train --config configs/tiny_llama.py --workdir runs/tiny_llama
"""
from lmtiny.config import base_config

NUM_PARAMS = 2_458_560


def get_config():
  c = base_config()
  c.model.update(vocab_size=4096, num_layers=2, d_model=192, num_heads=3, activation="swiglu", mlp_dim=512,
                 max_seq_len=256, norm_scale=True, qk_norm=False, logit_softcap=0.0, tie_embeddings=False)
  c.train.update(seq_len=256, batch_tokens=4096, steps=300, log_every=10, eval_every=50,
                 eval_batches=4, checkpoint_every=100, sample_prompt="def ")
  c.optim.update(lr=2.5e-3, warmup_steps=30)
  return c
