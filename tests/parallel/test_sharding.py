"""Meshes: same loss and gradients as one device; parameters carry their declared shardings."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from lm_fixtures import memory_data, tiny_config
from lmtiny.data.pipeline import make_train_iterator
from lmtiny.errors import ConfigError
from lmtiny.parallel import sharding
from lmtiny.training.steps import build_steps, device_batch, token_losses

MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=1, fsdp=8, tensor=1), dict(data=2, fsdp=1, tensor=4),
          dict(data=2, fsdp=2, tensor=2)]


def _batch(cfg):
  it = make_train_iterator(memory_data().train_docs, seq_len=cfg.train.seq_len, batch_size=16, bos_id=0, seed=0)
  return next(it)


def _loss_and_grads(cfg, mesh_cfg, devices, local_batch):
  """Initialise on the mesh, then mean loss and gradients of one batch, all fetched to host."""
  cfg.mesh.update(**mesh_cfg)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  steps = build_steps(cfg, mesh, total_steps=10)

  def mean_loss(params, batch):
    mask = batch["loss_mask"]
    return jnp.sum(token_losses(steps.graphdef, params, batch) * mask) / jnp.sum(mask)

  with jax.set_mesh(mesh):
    state = steps.init()
    batch = device_batch(local_batch, mesh)
    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(state["params"], batch)
    new_state, metrics = steps.train_step(state, batch)
    out = (float(loss), jax.device_get(grads), float(metrics["loss"]), float(metrics["grad_norm"]), new_state)
  return out


@pytest.fixture(scope="module")
def reference():
  cfg = tiny_config()
  batch = _batch(cfg)
  return cfg, batch, _loss_and_grads(cfg, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1], batch)


@pytest.mark.slow(seconds=26)
@pytest.mark.parametrize("mesh_cfg", MESHES, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items() if v > 1))
def test_same_loss_and_grads_as_one_device(reference, mesh_cfg):
  cfg, batch, (ref_loss, ref_grads, ref_step_loss, ref_gnorm, _) = reference
  loss, grads, step_loss, gnorm, _ = _loss_and_grads(cfg.copy_and_resolve_references(), mesh_cfg, jax.devices(), batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(step_loss, ref_step_loss, rtol=1e-6)
  np.testing.assert_allclose(gnorm, ref_gnorm, rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)


@pytest.mark.slow(seconds=9)
def test_parameters_carry_declared_shardings(reference):
  cfg = reference[0].copy_and_resolve_references()
  *_, state = _loss_and_grads(cfg, dict(data=2, fsdp=2, tensor=2), jax.devices(), reference[1])
  params = state["params"]
  expected = {
      ("embed",): P(None, "fsdp"),
      ("lm_head",): P("fsdp", "tensor"),
      ("layers", 0, "attn", "q"): P("fsdp", "tensor", None),
      ("layers", 0, "attn", "o"): P("tensor", None, "fsdp"),
      ("layers", 1, "mlp", "up"): P("fsdp", "tensor"),
      ("layers", 1, "mlp", "down"): P("tensor", "fsdp"),
      ("layers", 0, "attn_norm", "scale"): P(None),
  }
  for path, spec in expected.items():
    node = params
    for key in path:
      node = node[key]
    assert node.get_value().sharding.spec == spec, path
    # Really split: each device holds the shard, not the whole array.
    shard_shape = node.get_value().addressable_shards[0].data.shape
    assert np.prod(shard_shape) * np.prod([state_size(spec, a) for a in ("fsdp", "tensor")]) == node.get_value().size
  # Optimizer moments are sharded like their parameters (ZeRO: no replicated Adam state).
  mu = state["opt_state"][1].mu  # chain(clip, adam, ...): adam state
  assert mu["layers"][0]["attn"]["q"].get_value().sharding.spec == P("fsdp", "tensor", None)


def state_size(spec, axis):
  return 2 if any(axis == s or (isinstance(s, tuple) and axis in s) for s in spec) else 1


def test_indivisible_dimension_is_replicated_not_an_error():
  spec = sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 1, 16), {"data": 2, "fsdp": 2, "tensor": 4})
  assert spec == P("fsdp", None, None)


@pytest.mark.parametrize("mesh,msg", [(dict(data=3, fsdp=1, tensor=1), "product 3 != 8"),
                                      (dict(data=-1, fsdp=3, tensor=1), "do not divide 8")])
def test_mesh_that_does_not_fit_devices(mesh, msg):
  cfg = tiny_config()
  cfg.mesh.update(**mesh)
  with pytest.raises(ConfigError, match=msg):
    sharding.make_mesh(cfg.mesh)


def test_mesh_fill():
  cfg = tiny_config()
  cfg.mesh.update(data=-1, fsdp=2, tensor=2)
  assert dict(sharding.make_mesh(cfg.mesh).shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_vocab_parallel_cross_entropy_matches_plain_one():
  cfg = tiny_config()
  cfg.mesh.update(data=2, fsdp=1, tensor=4)
  mesh = sharding.make_mesh(cfg.mesh)
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(4, 8, 64)) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 64, size=(4, 8)), jnp.int32)
  expected = jax.jit(optax.softmax_cross_entropy_with_integer_labels)(logits, targets)
  expected_grad = jax.jit(jax.grad(lambda l: optax.softmax_cross_entropy_with_integer_labels(l, targets).sum()))(logits)
  with jax.set_mesh(mesh):
    fn = jax.jit(lambda l: sharding.vocab_parallel_cross_entropy(l, targets))
    assert "shard_map" in str(jax.make_jaxpr(fn)(logits))  # the explicit-collective path is taken
    np.testing.assert_allclose(fn(logits), expected, rtol=1e-5)
    grad = jax.jit(jax.grad(lambda l: sharding.vocab_parallel_cross_entropy(l, targets).sum()))(logits)
  np.testing.assert_allclose(grad, expected_grad, atol=1e-6)


@pytest.mark.parametrize("mesh_cfg", [dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=1, tensor=8)],
                         ids=["data2xfsdp2xtensor2", "tensor8"])
def test_linear_cross_entropy_vocab_parallel_matches_logits(mesh_cfg):
  """sharding.sharded_linear_cross_entropy (chunked, vocab-parallel in shard_map, softcap) against the
  plain log-softmax of full logits on one device: values, logsumexp and gradients."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 6, 16)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((16, 64)) / 4, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 64, (4, 6)), jnp.int32)
  weights = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)

  def reference(x, w):
    logits = 3.0 * jnp.tanh(jnp.einsum("btd,dv->btv", x, w) / 3.0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    ce = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(ce * weights + 0.01 * lse ** 2)

  def chunked(x, w):
    ce, lse = sharding.sharded_linear_cross_entropy(x, w, targets, softcap=3.0, chunk_tokens=5)
    return jnp.sum(ce * weights + 0.01 * lse ** 2)

  ref, ref_grads = jax.jit(jax.value_and_grad(reference, argnums=(0, 1)))(x, w)
  with jax.set_mesh(sharding.make_mesh(mesh_cfg)):
    got, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
