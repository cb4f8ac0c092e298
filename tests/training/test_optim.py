"""Optimizer: schedule shape, what decays, per-group learning rates, clipping."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_fixtures import tiny_config
from lmtiny.model.transformer import Transformer
from lmtiny.training.optim import lr_schedule, make_optimizer
from lmtiny.training.param_groups import group_lr_multipliers, param_groups


def _params(**model):
  cfg = tiny_config()
  cfg.model.update(**model)
  return cfg, nnx.state(Transformer(cfg.model, nnx.Rngs(0)), nnx.Param)


def test_warmup_then_cosine_to_floor():
  o = tiny_config().optim
  o.update(lr=1e-2, warmup_steps=10, min_lr_ratio=0.1)
  sched = lr_schedule(o, total_steps=110)
  assert float(sched(0)) == 0.0
  assert float(sched(5)) == pytest.approx(5e-3)
  assert float(sched(10)) == pytest.approx(1e-2)
  assert float(sched(60)) == pytest.approx(1e-3 + 0.5 * (1e-2 - 1e-3), rel=1e-4)  # cosine midpoint
  assert float(sched(110)) == pytest.approx(1e-3)
  values = [float(sched(s)) for s in range(10, 111)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_groups_name_embedding_unembedding_and_matrices():
  _, params = _params()
  groups = param_groups(params)
  assert groups["embed"] == "embed" and groups["lm_head"] == "unembed"
  assert groups["layers/0/attn/q"] == "matrix" and groups["layers/1/mlp/down"] == "matrix"
  assert groups["final_norm/scale"] == "matrix"


def _first_update(tx, grads, params):
  """tx.update(grads, tx.init(params), params), compiled whole (eager op-by-op is many times slower)."""
  return jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)


def _one_update(cfg, params, grad_value=1.0):
  tx, _ = make_optimizer(cfg.optim, cfg.model.d_model, total_steps=100)
  grads = jax.tree.map(lambda p: jnp.full_like(p, grad_value), params)
  updates, _ = _first_update(tx, grads, params)
  return {path: u for path, u in zip(param_groups(params), jax.tree.leaves(updates))}


def test_weight_decay_only_on_matrices():
  cfg, params = _params()
  cfg.optim.update(warmup_steps=0, lr=1.0, weight_decay=0.5, grad_clip=0.0)
  # Zero gradients: Adam's step is 0, so what remains of the update is the decay alone.
  tx, _ = make_optimizer(cfg.optim, cfg.model.d_model, total_steps=100)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = _first_update(tx, zeros, params)
  for path, u, p in zip(param_groups(params), jax.tree.leaves(updates), jax.tree.leaves(params)):
    decays = p.ndim >= 2 and path not in ("embed", "lm_head")
    np.testing.assert_allclose(u, -0.5 * p if decays else 0.0, rtol=1e-6, err_msg=path)


def test_group_learning_rates_scale_updates():
  cfg, params = _params()
  cfg.optim.update(warmup_steps=0, lr=0.01, embed_lr=0.2, unembed_lr=0.004, weight_decay=0.0, grad_clip=0.0)
  updates = _one_update(cfg, params)
  # Adam's first step with a constant gradient is 1 per element, times the group's LR.
  np.testing.assert_allclose(updates["embed"], -0.2, rtol=1e-4)
  np.testing.assert_allclose(updates["lm_head"], -0.004, rtol=1e-4)
  np.testing.assert_allclose(updates["layers/0/attn/q"], -0.01, rtol=1e-4)
  cfg.optim.scale_lr_by_width = True
  scale = (768 / cfg.model.d_model) ** 0.5
  assert group_lr_multipliers(cfg.optim, cfg.model.d_model) == pytest.approx(
      {"embed": 20 * scale, "unembed": 0.4 * scale, "matrix": scale})
  np.testing.assert_allclose(_one_update(cfg, params)["embed"], -0.2 * scale, rtol=1e-4)


def test_global_norm_clipping_feeds_adam_the_clipped_gradient():
  cfg, params = _params()
  cfg.optim.update(grad_clip=1.0, b1=0.9)
  tx, _ = make_optimizer(cfg.optim, cfg.model.d_model, total_steps=100)
  big = jax.tree.map(lambda p: jnp.full_like(p, 10.0), params)
  _, state = _first_update(tx, big, params)
  n = sum(p.size for p in jax.tree.leaves(params))
  mu = state[1].mu  # chain(clip, adam, ...): Adam's first moment after one step is (1 - b1) * g
  for m in jax.tree.leaves(mu):
    np.testing.assert_allclose(m, 0.1 / np.sqrt(n), rtol=1e-4)  # g clipped to global norm 1


def test_wsd_warmup_stable_then_linear_decay():
  o = tiny_config().optim
  o.update(lr=0.02, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
  sched = lr_schedule(o, total_steps=100)  # decay over the last round(0.2 * 100) = 20 steps
  assert [float(sched(s)) for s in (0, 5, 10, 50, 80)] == pytest.approx([0.0, 0.01, 0.02, 0.02, 0.02])
  assert [float(sched(s)) for s in (85, 90, 99, 100)] == pytest.approx([0.015, 0.01, 0.001, 0.0], abs=1e-9)
  o.update(min_lr_ratio=0.5, warmup_steps=0)  # nanochat: lr * (progress + (1 - progress) * final_frac)
  sched = lr_schedule(o, total_steps=100)
  assert [float(sched(s)) for s in (0, 80, 90, 100)] == pytest.approx([0.02, 0.02, 0.015, 0.01])
  o.update(schedule="constant", warmup_steps=4)
  sched = lr_schedule(o, total_steps=100)
  assert [float(sched(s)) for s in (0, 2, 4, 99, 100)] == pytest.approx([0.0, 0.01, 0.02, 0.02, 0.02])


@pytest.mark.parametrize("field,value,msg", [("name", "sgd", "must be one of adamw, muon"),
                                             ("schedule", "linear", "must be one of cosine, wsd, constant"),
                                             ("decay_fraction", 1.5, "must be in"),
                                             ("loss_scale_period", 0, "must be > 0")])
def test_recipe_fields_are_validated(field, value, msg):
  from lmtiny.errors import ConfigError
  from lmtiny.config import validate
  cfg = tiny_config()
  cfg.optim[field] = value
  with pytest.raises(ConfigError, match=f"config.optim.{field}=.*{msg}"):
    validate(cfg)
def test_stacked_norm_scales_and_embeddings_are_not_decayed():
  """With scan_layers the norm scales are [L, D] (ndim 2) and the QK-norm scales [L, Dh]: the mask
  reads the logical axes, so they stay undecayed, while the stacked [L, D, H, Dh] matrices decay."""
  cfg, params = _params(scan_layers=True, qk_norm=True)
  cfg.optim.update(warmup_steps=0, lr=1.0, weight_decay=0.5, grad_clip=0.0)
  tx, _ = make_optimizer(cfg.optim, cfg.model.d_model, total_steps=100)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = _first_update(tx, zeros, params)
  decayed = set()
  for path, u, p in zip(param_groups(params), jax.tree.leaves(updates), jax.tree.leaves(params)):
    if np.any(np.asarray(u) != 0):
      np.testing.assert_allclose(u, -0.5 * p, rtol=1e-6, err_msg=path)
      decayed.add(path)
  assert {"layers/attn_norm/scale", "layers/mlp_norm/scale", "layers/attn/q_norm/scale"}.isdisjoint(decayed)
  assert params["layers"]["attn_norm"]["scale"][...].ndim == 2
  assert decayed == {f"layers/{n}" for n in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/up", "mlp/down")}
