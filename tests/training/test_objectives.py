"""The train step's objectives (lmtiny.training.objectives) against NumPy and a plain-logits JAX
path: the loss each reports, the tokens it counts, and the gradient it follows."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lm_fixtures import VOCAB, tiny_config
from lmtiny.parallel import sharding
from lmtiny.training.objectives import CROSS_ENTROPY, POLICY_GRADIENT
from lmtiny.training.steps import build_steps, device_batch

B, T = 16, 32


def _batch(rng):
  return {"inputs": rng.integers(1, VOCAB, (B, T)).astype(np.int32),
          "targets": rng.integers(1, VOCAB, (B, T)).astype(np.int32),
          "segment_ids": np.ones((B, T), np.int32), "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}


def _target_log_probs(graphdef, params, batch):
  """log pi(target_t) from the model's full logits: float64 NumPy, and a differentiable JAX form."""
  def log_probs(p):
    logits = nnx.merge(graphdef, p)(batch["inputs"], batch["positions"], batch["segment_ids"]).astype(jnp.float32)
    return jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], axis=-1)[..., 0]
  logits = np.asarray(nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"]),
                      np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return np.take_along_axis(log_softmax, batch["targets"][..., None], -1)[..., 0], log_probs


@pytest.mark.parametrize("objective", [CROSS_ENTROPY, POLICY_GRADIENT], ids=lambda o: o.name)
@pytest.mark.slow(seconds=11)
def test_the_step_minimises_the_objective_written_out(objective):
  rng = np.random.default_rng(0)
  cfg = tiny_config(steps=2)
  mesh = sharding.make_mesh(cfg.mesh)
  steps = build_steps(cfg, mesh, 2, objective=objective)
  local = _batch(rng)
  sampled = (rng.random((B, T)) < 0.5).astype(np.float32)
  local["loss_mask"] = sampled
  if objective is POLICY_GRADIENT:  # rows of a uniform group carry no advantage, but were sampled
    advantage_B = np.where(np.arange(B) % 4 == 0, 0.0, rng.normal(size=B))
    local["advantages"] = (sampled * advantage_B[:, None]).astype(np.float32)
  weights = local["loss_mask"] if objective is CROSS_ENTROPY else local["advantages"]
  count = np.count_nonzero(weights)
  assert 0 < count < np.count_nonzero(sampled) or objective is CROSS_ENTROPY
  with jax.set_mesh(mesh):
    state = steps.init()
    batch = device_batch(local, mesh, objective.batch_keys)
    log_p, log_probs = _target_log_probs(steps.graphdef, state["params"], batch)
    want_grads = jax.grad(lambda p: -jnp.sum(weights * log_probs(p)) / count)(state["params"])
    _, metrics = steps.train_step(state, batch)
  # cross-entropy: the mean of -log p over the kept targets; policy gradient: -sum(A log p) / #(A != 0)
  np.testing.assert_allclose(float(metrics["loss"]), -np.sum(weights * log_p) / count, rtol=1e-5)
  assert float(metrics["tokens"]) == count
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(want_grads)), rtol=1e-4)

