"""Muon: Newton-Schulz orthogonalisation, the update against a float64 NumPy reference (momentum
warmup, Nesterov, per-matrix views, stacked layers), the AdamW half, sharded == one device."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_fixtures import memory_data, tiny_config
from lmtiny.data.pipeline import make_train_iterator
from lmtiny.model.transformer import Transformer
from lmtiny.parallel import sharding
from lmtiny.training.steps import build_steps, device_batch
from lmtiny.training.muon import matrix_view, momentum_schedule, newton_schulz
from lmtiny.training.optim import make_optimizer
from lmtiny.training.param_groups import param_groups


def _np_newton_schulz(g, steps=5):
  a, b, c = 3.4445, -4.7750, 2.0315
  x = g.T if g.shape[0] > g.shape[1] else g
  x = x / (np.linalg.norm(x) + 1e-7)
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if g.shape[0] > g.shape[1] else x


def test_newton_schulz_orthogonalises():
  g = jax.random.normal(jax.random.key(0), (2, 32, 96))
  x = np.asarray(newton_schulz(g, 5, jnp.float32), np.float64)
  for i in range(2):
    np.testing.assert_allclose(x[i], _np_newton_schulz(np.asarray(g[i], np.float64)), atol=2e-5)
    singular = np.linalg.svd(x[i], compute_uv=False)
    assert 0.6 < singular.min() and singular.max() < 1.25  # all directions ~equal: US'V^T, S' ~ 1
  tall = np.asarray(newton_schulz(jnp.swapaxes(g, 1, 2), 5, jnp.float32))  # transposes, same result
  np.testing.assert_allclose(tall, np.swapaxes(x, 1, 2), atol=1e-5)


def test_momentum_warms_up_like_nanochat():
  o = tiny_config().optim
  sched = momentum_schedule(o)
  assert [float(sched(s)) for s in (0, 150, 300, 1000)] == pytest.approx([0.85, 0.90, 0.95, 0.95])


@pytest.mark.parametrize("name,shape,view,factor", [
    ("q", (64, 4, 16), (1, 64, 64), 1.0), ("o", (4, 16, 64), (1, 64, 64), 1.0),
    ("up", (64, 256), (1, 64, 256), 2.0), ("down", (256, 64), (1, 256, 64), 1.0),
    ("q", (3, 64, 2, 16), (3, 64, 32), 1.0), ("down", (3, 256, 64), (3, 256, 64), 1.0)])
def test_matrix_views(name, shape, view, factor):
  path = (jax.tree_util.DictKey("layers"), jax.tree_util.DictKey("attn"), jax.tree_util.DictKey(name))
  assert matrix_view(path, shape) == (view, factor)


def _muon_cfg(**model):
  cfg = tiny_config()
  cfg.model.update(**model)
  cfg.optim.update(name="muon", lr=0.02, embed_lr=0.2, unembed_lr=0.004, b1=0.8, b2=0.95, eps=1e-10, warmup_steps=0,
                   weight_decay=0.0, grad_clip=0.0, schedule="constant", muon_ns_dtype="float32",
                   muon_momentum_warmup=2)
  return cfg


def test_updates_match_numpy_reference():
  scan = False  # stacked layers' views: test_matrix_views and the sharded test (scan_layers)
  cfg = _muon_cfg(scan_layers=scan, activation="swiglu")
  params = nnx.state(Transformer(cfg.model, nnx.Rngs(0)), nnx.Param)
  tx, _ = make_optimizer(cfg.optim, cfg.model.d_model, total_steps=10)
  state = tx.init(params)
  rng = np.random.default_rng(0)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(2)]
  update = jax.jit(tx.update)
  names = list(param_groups(params))
  buf, adam_m, adam_v = {}, {}, {}
  for step, g in enumerate(grads):
    updates, state = update(g, state, params)
    m = 0.85 + 0.1 * min(step / 2, 1.0)  # momentum warmup over 2 steps in this config
    for name, gl, ul in zip(names, jax.tree.leaves(g), jax.tree.leaves(updates)):
      gl, ul = np.asarray(gl, np.float64), np.asarray(ul)
      leaf = name.split("/")[-1]
      if name in ("embed", "lm_head") or leaf == "scale":
        b1, b2, lr = 0.8, 0.95, {"embed": 0.2, "lm_head": 0.004}.get(name, 0.02)
        adam_m[name] = b1 * adam_m.get(name, 0) + (1 - b1) * gl
        adam_v[name] = b2 * adam_v.get(name, 0) + (1 - b2) * gl ** 2
        want = -lr * (adam_m[name] / (1 - b1 ** (step + 1))) / (np.sqrt(adam_v[name] / (1 - b2 ** (step + 1))) + 1e-10)
        np.testing.assert_allclose(ul, want, rtol=2e-4, atol=1e-7, err_msg=name)
        continue
      buf[name] = m * buf.get(name, 0) + (1 - m) * gl
      nesterov = (1 - m) * gl + m * buf[name]
      out_last = leaf in ("o", "down")
      base = 3 if leaf in ("q", "k", "v", "o") else 2
      batch = gl.shape[:gl.ndim - base]
      dims = gl.shape[gl.ndim - base:]
      fan_in = int(np.prod(dims[:-1])) if out_last else dims[0]
      mats = nesterov.reshape(int(np.prod(batch)), fan_in, -1)
      want = np.stack([_np_newton_schulz(x) for x in mats]) * max(1.0, mats.shape[2] / fan_in) ** 0.5
      np.testing.assert_allclose(ul, -0.02 * want.reshape(gl.shape), atol=3e-5 * 0.02 * max(1, mats.shape[2] / fan_in),
                                 err_msg=name)
  assert len(buf) == 7 * 2 and {"embed", "lm_head"} <= set(adam_m)  # q k v o up gate down


def _run(cfg, mesh_cfg, devices, batches):
  cfg = cfg.copy_and_resolve_references()
  cfg.mesh.update(**mesh_cfg)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  steps = build_steps(cfg, mesh, total_steps=10)
  with jax.set_mesh(mesh):
    state = steps.init()
    losses = []
    for local in batches:
      state, metrics = steps.train_step(state, device_batch(local, mesh))
      losses.append(float(metrics["loss"]))  # block every step (emulated-device deadlock trap)
    return losses, jax.device_get(state["params"])


@pytest.fixture(scope="module")
def one_device():
  """Two steps with stacked layers (lax.scan) and GQA on one device: the reference."""
  it = make_train_iterator(memory_data().train_docs, seq_len=32, batch_size=16, bos_id=0, seed=0)
  batches = [next(it) for _ in range(2)]
  cfg = _muon_cfg(scan_layers=True, num_heads=4, num_kv_heads=2)
  return cfg, batches, _run(cfg, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1], batches)


@pytest.mark.slow(seconds=11)
@pytest.mark.parametrize("mesh_cfg", [dict(data=1, fsdp=8, tensor=1), dict(data=2, fsdp=2, tensor=2)],
                         ids=["fsdp8", "data2xfsdp2xtensor2"])
def test_sharded_muon_equals_one_device(one_device, mesh_cfg):
  cfg, batches, (one_losses, one_params) = one_device
  losses, params = _run(cfg, mesh_cfg, jax.devices(), batches)
  np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
  assert one_losses[-1] < one_losses[0]
  for name, p, r in zip(param_groups(one_params), jax.tree.leaves(params), jax.tree.leaves(one_params)):
    # Adam's step is about lr * m / (sqrt(v) + eps): where a token's gradient is near eps (a token
    # seen once), the reduction order of another mesh moves its entry by up to 1e-3 of the step
    # (embed: 1 of 8192 entries, 2.5e-5 at lr 0.2). A few such entries, none off by more than 1e-3
    # of the tensor's largest entry.
    off = np.abs(p - r) > 2e-5 + 1e-4 * np.abs(r)
    assert np.mean(off) <= 1e-3 and np.abs(p - r).max() <= 1e-3 * np.abs(r).max(), (name, np.abs(p - r).max())


def test_d20_config_builds_nanochats_optimizer():
  """configs/d20.py: Muon on the 6 matrices of each of 20 blocks, AdamW on the embedding and
  unembedding at nanochat's width-scaled LRs (built abstractly: no memory)."""
  from lm_fixtures import load_config_module
  from lmtiny.model.transformer import abstract_model
  from lmtiny.training.muon import is_muon_param
  from lmtiny.training.param_groups import group_lr_multipliers
  cfg = load_config_module("d20").get_config()
  params = nnx.state(abstract_model(cfg.model), nnx.Param)
  muon = [x for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if is_muon_param(p, x)]
  # scan_layers: 6 matrices stacked over the 20 blocks (Muon orthogonalises each layer's slice)
  assert len(muon) == 6 and all(x.shape[0] == 20 for x in muon)
  assert len(jax.tree.leaves(params)) == 6 + 2  # no norm weights
  tx, schedule = make_optimizer(cfg.optim, cfg.model.d_model, total_steps=1000)
  opt_state = jax.eval_shape(tx.init, params)
  assert sum(x.size for x in jax.tree.leaves(opt_state)) > 0
  scale = (768 / 1280) ** 0.5
  mult = group_lr_multipliers(cfg.optim, cfg.model.d_model)
  assert (0.02 * mult["embed"], 0.02 * mult["unembed"]) == pytest.approx((0.2 * scale, 0.004 * scale))
  assert [float(schedule(s)) for s in (0, 800, 900, 1000)] == pytest.approx([0.02, 0.02, 0.01, 0.0])


@pytest.mark.slow(seconds=26)
@pytest.mark.parametrize("layers,scan", [(8, True), (10, True), (4, False)], ids=["scan8", "scan10", "unscanned4"])
def test_fsdp_splits_matrices_over_devices_for_newton_schulz(one_device, layers, scan):
  """Under FSDP, each device orthogonalises whole matrices of its share of each same-shape batch
  (muon.orthogonalise_by_shape: 10 layers' 40 attention matrices padded to 40, their 10 + 10 MLP
  matrices to 24, 4 unscanned layers' 16 + 8 matrices) instead of every device gathering every
  float32 matrix, once per Newton-Schulz iteration: the compiled step gathers no stack, gathers
  at most twice as many elements as the parameters hold (each weight for the forward and the
  backward; before: 12x unscanned), and the update is still the one-device update."""
  _, batches, _ = one_device
  cfg = _muon_cfg(scan_layers=scan, num_layers=layers)
  one_losses, one_params = _run(cfg, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1], batches)
  losses, params = _run(cfg, dict(data=1, fsdp=8, tensor=1), jax.devices(), batches)
  np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params, one_params)
  cfg.mesh.update(data=1, fsdp=8, tensor=1)
  mesh = sharding.make_mesh(cfg.mesh)
  steps = build_steps(cfg, mesh, total_steps=10)
  with jax.set_mesh(mesh):
    text = steps.train_step.lower(steps.init(), device_batch(batches[0], mesh)).compile().as_text()
  gathered = re.findall(r"= f32\[([\d,]+)\]\S* all-gather\(", text)
  assert [g for g in gathered if g.count(",") >= 2] == []  # no [L, M, N] stack, no whole [D, H, Dh] weight
  param_elems = sum(x.size for x in jax.tree.leaves(one_params))
  assert sum(np.prod([int(d) for d in g.split(",")]) for g in gathered) <= 2 * param_elems
