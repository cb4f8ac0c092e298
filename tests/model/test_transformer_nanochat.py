"""lmtiny's forward with nanochat's choices equals nanochat's GPT forward (tests/nanochat_reference.py,
an independent PyTorch implementation) given the same weights; embed_norm / norm_eps knobs."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_fixtures import forward
from lmtiny import config as config_lib
from lmtiny.model.transformer import count_params, Transformer
from lmtiny.plan import counts

torch = pytest.importorskip("torch")
import nanochat_reference as ref  # noqa: E402  (needs torch)


def _logits(model, tokens):
  return np.asarray(forward(model, jnp.asarray(tokens)))


def _small_nanochat(**model):
  """nanochat's choices at a small size; gpt2 init at a large std so that no block starts as the
  identity (nanochat's init zeroes the output projections) and every weight matters."""
  m = config_lib.nanochat_config(2).model
  m.update(vocab_size=256, d_model=64, num_heads=2, head_dim=32, max_seq_len=64, dtype="float32",
           init="gpt2", init_std=0.3, remat="none", scan_layers=False)  # the mapping reads layers one by one
  m.update(**model)
  return m


@pytest.mark.parametrize("kv_heads", [0, 1])
def test_logits_equal_nanochat_gpt_forward(kv_heads):
  torch.set_num_threads(1)
  m = _small_nanochat(num_kv_heads=kv_heads)
  model = Transformer(m, nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, m.vocab_size, (2, 48))
  ours = _logits(model, tokens)
  weights = ref.lmtiny_to_nanochat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  theirs = ref.forward(weights, torch.from_numpy(tokens), n_head=m.num_heads,
                       n_kv_head=config_lib.num_kv_heads(m)).numpy()
  assert np.abs(theirs).max() > 5  # logits far from zero: a real comparison, softcap active
  np.testing.assert_allclose(ours, theirs, atol=5e-5, rtol=0)
  assert ref.relative_difference(ours, theirs) < 1e-5


def test_each_nanochat_choice_matters():
  """Dropping the embedding norm, or the eps, changes the logits: the test above is sensitive."""
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (1, 16)))
  base = _logits(Transformer(_small_nanochat(), nnx.Rngs(0)), tokens)
  no_embed_norm = _logits(Transformer(_small_nanochat(embed_norm=False), nnx.Rngs(0)), tokens)
  big_eps = _logits(Transformer(_small_nanochat(norm_eps=1e-1), nnx.Rngs(0)), tokens)
  assert np.abs(base - no_embed_norm).max() > 1e-2 and np.abs(base - big_eps).max() > 1e-3


def test_embed_norm_params_counted():
  m = _small_nanochat()
  assert count_params(m) == counts.count_params(m)  # parameter-free: no extra weights
  m.update(norm_scale=True)
  scaled = count_params(m)
  assert scaled == counts.count_params(m)
  m.update(embed_norm=False)
  assert counts.count_params(m) == count_params(m) == scaled - m.d_model


def test_nanochat_config_is_nanochats_d20():
  c = config_lib.nanochat_config(20)
  m, o = c.model, c.optim
  assert (m.d_model, m.num_heads, config_lib.head_dim(m), m.vocab_size) == (1280, 10, 128, 65536)
  assert m.embed_norm and not m.norm_scale and m.qk_norm and m.logit_softcap == 15.0
  assert m.norm_eps == float(np.finfo(np.float32).eps) and m.init == "nanochat"
  assert (o.name, o.lr, o.embed_lr, o.unembed_lr, o.b1, o.b2, o.eps) == ("muon", 0.02, 0.2, 0.004, 0.8, 0.95, 1e-10)
  assert (o.schedule, o.decay_fraction, o.min_lr_ratio, o.warmup_steps) == ("wsd", 0.2, 0.0, 0)
  assert (o.muon_momentum_start, o.muon_momentum, o.muon_momentum_warmup) == (0.85, 0.95, 300)
  config_lib.validate(c)
