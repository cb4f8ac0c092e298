"""The shipped configs grouped by architecture (every model field that is not a size), what carries
each group out of lmtiny, and a config's model shrunk to test size with its architecture kept."""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm_fixtures import load_config_module, ROOT
from lmtiny.model.transformer import abstract_model

# Shape and run fields a test may change; every other model field is the config's architecture.
SIZE_FIELDS = ("vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "num_kv_heads", "mlp_dim", "mlp_ratio",
               "max_seq_len", "short_window", "vocab_multiple", "init", "init_std", "dtype", "remat", "scan_layers",
               "attention", "loss_chunk_tokens", "loss_kernel", "matmul_dtype")
# The first config of each architecture (by name) -> the transformers class its export loads as
EXPECTED = {"d12": "NanoChatForCausalLM", "d12_2026": "LmtinyForCausalLM", "d29_38m": "LmtinyForCausalLM",
            "tiny": "LmtinyForCausalLM", "tiny_llama": "LlamaForCausalLM"}
VOCAB = 512


def shipped_architectures() -> dict[str, list[str]]:
  """{first config name: every shipped config with that architecture}."""
  groups = {}
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    name = os.path.basename(path)[:-3]
    m = load_config_module(name).get_config().model
    key = json.dumps({k: v for k, v in m.items() if k not in SIZE_FIELDS}, sort_keys=True)
    groups.setdefault(key, []).append(name)
  return {names[0]: names for names in groups.values()}


def small_config(name: str, **model):
  """Config `name` with its model shrunk: 4 layers (room for "SSSL", alternating value embeddings
  and mid-depth backout), width 64 in 4 heads of 16 with 2 kv heads, 512 tokens (padded to 576
  where the config pads), a context of 32 and short windows of 5 tokens; then `model`'s fields."""
  cfg = load_config_module(name).get_config()
  m = cfg.model
  m.update(vocab_size=VOCAB, num_layers=4, d_model=64, num_heads=4, head_dim=16, num_kv_heads=2, mlp_dim=0,
           max_seq_len=32, dtype="float32", remat="none", attention="xla", matmul_dtype="default")
  if m.window_pattern:
    m.short_window = 5
  if m.vocab_multiple > 1:
    m.vocab_multiple = 96
  m.update(**model)
  return cfg


def random_model(cfg, seed: int = 0):
  """The config's model with random parameters: every matrix N(0, 0.2^2), every vector (norm scales,
  residual and backout scalars, smear) 0.5 + N(0, 0.2^2), so that none is the identity or zero."""
  graphdef, state = nnx.split(abstract_model(cfg.model))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.5 if len(s.shape) == 1 else 0.0, 0.2, s.shape),
                                              jnp.float32), state)
  return nnx.merge(graphdef, params)
