"""The fused loss with its logits on chip (lmtiny.kernels.pallas_cross_entropy), run in Pallas's
interpreter on CPU against the plain log-softmax of full logits and against the XLA fused loss:
objective, per-token values and gradients, over several token and vocab tiles with padding, on
one device and vocab- and batch-sharded over 8 emulated devices; and its tiles compiled by
XLA:TPU for the smallest VMEMs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from lm_fixtures import full_logits_loss as _reference, needs_libtpu
from lmtiny.kernels import pallas_cross_entropy
from lmtiny.parallel import sharding
from lmtiny.training.lowering import tpu_devices

B, T, D, V = 4, 6, 16, 120  # 24 tokens, 120 columns: neither a whole number of 16-wide tiles


@pytest.fixture
def small_tiles(monkeypatch):
  """16 x 16 tiles: two token tiles and eight vocab tiles (the last part padding) on one device."""
  monkeypatch.setattr(pallas_cross_entropy, "MAX_TILE", 16)


def _inputs(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((B, T, D)), dtype)
  w = jnp.asarray(rng.standard_normal((D, V)) / 4, dtype)
  targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  # the last column, and the first of the second half (a shard's, under tensor 2 or 8): seen from
  # the shard before, it is a padded column, which must not be taken for the target
  targets = targets.at[1, 3].set(V - 1).at[2, 0].set(V // 2)
  ce_weights = jnp.asarray(rng.standard_normal((B, T)), jnp.float32).at[0, :2].set(0.0)  # RL signs, masks
  z_weights = 0.01 * (ce_weights != 0)
  return x, w, targets, ce_weights, z_weights


def _fused(x, w, targets, ce_weights, z_weights, softcap, impl):
  objective, ce, lse = sharding.sharded_fused_linear_cross_entropy(x, w, targets, ce_weights, z_weights, softcap=softcap,
                                                           chunk_tokens=5, impl=impl)
  return objective, (ce, lse)


def _value_and_grads(fn, *args, mesh_cfg=None):
  run = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True), static_argnums=5)
  if mesh_cfg is None:
    return run(*args)
  with jax.set_mesh(sharding.make_mesh(mesh_cfg)):
    return run(*args)


@pytest.mark.parametrize("softcap", [0.0, 3.0])
@pytest.mark.parametrize("mesh_cfg", [None, dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=1, tensor=8)],
                         ids=["one_device", "data2xfsdp2xtensor2", "tensor8"])
def test_pallas_loss_matches_the_reference_in_value_and_gradient(small_tiles, mesh_cfg, softcap):
  """Eight vocab shards of 15 columns (one padded tile each), two of 60 (four tiles), or all 120
  on one device (eight): the statistics finished across shards, the padding masked out."""
  args = (*_inputs(), softcap)
  (ref, (ref_ce, ref_lse)), ref_grads = _value_and_grads(_reference, *args)
  (got, (ce, lse)), grads = _value_and_grads(functools.partial(_fused, impl="interpret"), *args, mesh_cfg=mesh_cfg)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  np.testing.assert_allclose(ce, ref_ce, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_pallas_loss_agrees_with_the_xla_fused_loss_in_bfloat16(small_tiles):
  """bf16 GEMMs with float32 accumulation as on a TPU: the same objective and gradients as the XLA
  fused loss to bf16 rounding (the sums run in another order), in the same dtypes."""
  args = (*_inputs(1, jnp.bfloat16), 0.0)
  (want, _), want_grads = _value_and_grads(functools.partial(_fused, impl="xla"), *args)
  (got, _), grads = _value_and_grads(functools.partial(_fused, impl="interpret"), *args)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, r in zip(grads, want_grads):
    assert g.dtype == r.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=2e-2, atol=1e-3)


def test_tiles_shrink_with_the_width_and_never_exceed_what_they_cover():
  assert pallas_cross_entropy._tiles(16384, 24576, 512) == (512, 512)
  assert pallas_cross_entropy._tiles(16384, 65536, 1280) == (512, 256)
  assert pallas_cross_entropy._tiles(16384, 65536, 2048) == (256, 256)
  assert pallas_cross_entropy._tiles(24, 120, 16) == (32, 128)  # 16-row, 128-lane aligned cover


@pytest.mark.slow(seconds=5)
@needs_libtpu
@pytest.mark.parametrize("topology", ["v4:1x1x1", "v5e:1x1"])
def test_the_tiles_fit_vmem_where_it_is_smallest(topology):
  """XLA:TPU compiles the three Mosaic kernels at d20's and d32's widths (1280 and 2048, the
  largest tiles at the budget) for v4 (16 MiB of VMEM) and v5e (16 MiB scoped by default)."""
  device = SingleDeviceSharding(tpu_devices(topology)[0])
  for d in (1280, 2048):
    shapes = [((1024, d), jnp.bfloat16), ((d, 2048), jnp.bfloat16), ((1024,), jnp.int32), ((1024,), jnp.float32),
              ((1024,), jnp.float32)]
    args = [jax.ShapeDtypeStruct(s, t, sharding=device) for s, t in shapes]
    forward = functools.partial(pallas_cross_entropy.fused_forward, vocab_start=0, softcap=15.0, axis_name=None,
                                interpret=False)
    compiled = jax.jit(forward).trace(*args).lower(lowering_platforms=("tpu",)).compile()
    text = compiled.as_text()
    for kernel in ("loss_stats", "loss_dx", "loss_dw"):
      assert f'"{kernel}' in text or f"%{kernel}" in text, (kernel, d)
