"""lmtiny vs nanochat's GPT forward: max abs / relative logit difference (needs torch).

  PYTHONPATH=. python benchmarks/nanochat_forward.py

Builds lmtiny models with nanochat's choices (nanochat_config at a small size, gpt2 init so no
block starts as the identity), maps the weights into tests/nanochat_reference.py (an independent
PyTorch implementation of nanochat's GPT at 962b6bf) and compares float32 logits, with float32
RoPE tables and with nanochat's bfloat16 ones.
"""
from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import nanochat_reference as ref  # noqa: E402

from lmtiny import config as config_lib  # noqa: E402
from lmtiny.model.transformer import Transformer  # noqa: E402


def main():
  torch.set_num_threads(1)
  for kv_heads in (0, 2):
    m = config_lib.nanochat_config(4).model
    m.update(vocab_size=1024, d_model=256, num_heads=4, head_dim=64, num_kv_heads=kv_heads, max_seq_len=128,
             dtype="float32", init="gpt2", init_std=0.1, remat="none")
    model = Transformer(m, nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, m.vocab_size, (2, 128))
    ours = np.asarray(model(jnp.asarray(tokens)))
    weights = ref.lmtiny_to_nanochat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for rope_dtype in (torch.float32, torch.bfloat16):
      theirs = ref.forward(weights, torch.from_numpy(tokens), n_head=m.num_heads,
                           n_kv_head=config_lib.num_kv_heads(m), rope_dtype=rope_dtype).numpy()
      print(f"depth 4, width 256, 4 heads x 64, {config_lib.num_kv_heads(m)} kv heads, T=128, RoPE tables "
            f"{str(rope_dtype).split('.')[-1]}: max |logit| {np.abs(theirs).max():.3f}, max abs diff "
            f"{np.abs(ours - theirs).max():.2e}, max rel diff {ref.relative_difference(ours, theirs):.2e}")


if __name__ == "__main__":
  main()
