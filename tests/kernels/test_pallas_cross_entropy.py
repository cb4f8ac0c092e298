"""The fused loss with its logits on chip (lmtiny.kernels.pallas_cross_entropy), run in Pallas's
interpreter on CPU against the plain log-softmax of full logits and against the XLA fused loss:
objective, per-token values and gradients, over several token and vocab tiles with padding, on
one device and vocab- and batch-sharded over 8 emulated devices; its tiles' HBM traffic against a
walk of their grids; and its tiles compiled by XLA:TPU for the smallest VMEMs."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from lm_fixtures import full_logits_loss as _reference, needs_libtpu
from lmtiny.kernels import loss_tiles, pallas_cross_entropy
from lmtiny.parallel import sharding
from lmtiny.training.lowering import tpu_devices

B, T, D, V = 4, 6, 16, 120  # 24 tokens, 120 columns: neither a whole number of 16-wide tiles


@pytest.fixture
def small_tiles(monkeypatch):
  """16 x 16 tiles: two token tiles and eight vocab tiles (the last part padding) on one device."""
  monkeypatch.setattr(loss_tiles, "MAX_TILE", 16)


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


D24 = (16384, 32768, 1536)  # d24_2026's tokens a chip (8 x 2048), vocab and width


def test_each_kernel_takes_its_outer_tile_as_large_as_vmem_allows():
  """Statistics and dx walk the vocab inside a token tile (w read once per token tile), dw the
  tokens inside a vocab tile (x read once per vocab tile): the outer tile is the large one."""
  assert [loss_tiles.tiles(k, *D24) for k in loss_tiles.KERNELS] == [(1024, 128), (512, 256), (256, 512)]
  assert [loss_tiles.tiles(k, 16384, 24576, 512) for k in loss_tiles.KERNELS] == [(1024, 256), (1024, 256),
                                                                                   (256, 1024)]
  for kernel in loss_tiles.KERNELS:
    assert loss_tiles.tiles(kernel, 24, 120, 16) == (32, 128)  # 16-row, 128-lane aligned cover
    for d in (512, 768, 1280, 1536, 2048):
      assert loss_tiles.vmem_bytes(kernel, *loss_tiles.tiles(kernel, 16384, 65536, d), d) <= loss_tiles.VMEM_BUDGET


def _walk_bytes(kernel, n, v, d):
  """HBM bytes of one kernel counted by walking its grid as Pallas's TPU pipeline does: an
  operand's block is fetched (an output's written) whenever its block index changes."""
  tm, tv = loss_tiles.tiles(kernel, n, v, d)
  x_spec, w_spec, rows_spec = pallas_cross_entropy._specs(kernel, tm, tv, d)
  m_tiles, v_tiles = -(-n // tm), -(-v // tv)
  out = {pallas_cross_entropy.STATS: (rows_spec, 4), pallas_cross_entropy.DX: (x_spec, 2),
         pallas_cross_entropy.DW: (w_spec, 4)}[kernel]
  blocks = [(x_spec, 2), (w_spec, 2), (rows_spec, 4), out]
  grid = (m_tiles, v_tiles) if loss_tiles.outer_is_tokens(kernel) else (v_tiles, m_tiles)
  moved, last = 0, [None] * len(blocks)
  for g in np.ndindex(*grid):
    for k, (spec, itemsize) in enumerate(blocks):
      index = spec.index_map(*g)
      if index != last[k]:
        moved, last[k] = moved + np.prod(spec.block_shape) * itemsize, index
  return moved


@pytest.mark.parametrize("shape", [D24, (16384, 65536, 1280), (4096, 4096, 768), (24, 120, 16)])
def test_the_traffic_model_is_what_the_kernels_grids_fetch(shape):
  for kernel in loss_tiles.KERNELS:
    assert loss_tiles.hbm_bytes(kernel, *shape) == _walk_bytes(kernel, *shape), kernel


def test_the_kernels_move_fewer_bytes_per_logit_than_the_xla_fused_loss():
  """The XLA fused loss writes and reads its float32 logits, 14-18 bytes per logit; all three
  kernels together move under 17 at d24_2026's width and under 6 at d12_2026's (the tiles
  shared by all three kernels moved 45 and 21)."""
  per_logit = lambda n, v, d: sum(loss_tiles.hbm_bytes(k, n, v, d) for k in loss_tiles.KERNELS) / (n * v)
  assert per_logit(*D24) < 17
  assert per_logit(16384, 32768, 768) < 6


def _compile_error(fn, *args):
  try:
    jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).compile()
  except Exception as e:  # pylint: disable=broad-except
    return str(e)
  return None


@pytest.mark.slow(seconds=7)
@needs_libtpu
@pytest.mark.parametrize("topology", ["v4:1x1x1", "v5e:1x1"])
def test_the_tiles_fit_vmem_where_it_is_smallest(topology):
  """XLA:TPU compiles the three Mosaic kernels at every width from d4_38m's to d32's (512 to 2048)
  for v4 (16 MiB of VMEM) and v5e (16 MiB scoped by default)."""
  device = SingleDeviceSharding(tpu_devices(topology)[0])
  for d in (512, 768, 1280, 1536, 2048):
    shapes = [((16384, d), jnp.bfloat16), ((d, 32768), jnp.bfloat16), ((16384,), jnp.int32),
              ((16384,), jnp.float32), ((16384,), jnp.float32)]
    args = [jax.ShapeDtypeStruct(s, t, sharding=device) for s, t in shapes]
    forward = functools.partial(pallas_cross_entropy.fused_forward, vocab_start=0, softcap=15.0, axis_name=None,
                                interpret=False)
    assert _compile_error(forward, *args) is None, d


@pytest.mark.slow(seconds=4)
@needs_libtpu
@pytest.mark.parametrize("kernel, tiles", [("loss_stats", (2048, 256)), ("loss_dx", (1024, 256)),
                                           ("loss_dw", (256, 2048))], ids=["stats", "dx", "dw"])
def test_the_vmem_model_is_not_below_what_xla_tpu_allocates(kernel, tiles, monkeypatch):
  """Tiles too large for v5e's 16 MiB: the scoped VMEM XLA:TPU reports for them is at most what
  loss_tiles.vmem_bytes says, so tiles the model admits are ones that compile."""
  d, n, v = 2048, 8192, 8192
  monkeypatch.setattr(loss_tiles, "tiles", lambda *_: tiles)
  body = {"loss_stats": pallas_cross_entropy._stats_kernel, "loss_dx": pallas_cross_entropy._dx_kernel,
          "loss_dw": pallas_cross_entropy._dw_kernel}[kernel]
  run = lambda x, w, rows: pallas_cross_entropy._run(kernel, functools.partial(body, v_local=v, softcap=15.0), x, w,
                                                     rows, jnp.bfloat16, False)
  device = SingleDeviceSharding(tpu_devices("v5e:1x1")[0])
  args = [jax.ShapeDtypeStruct(s, t, sharding=device) for s, t in (((n, d), jnp.bfloat16), ((d, v), jnp.bfloat16),
                                                                   ((n, loss_tiles.ROW_LANES), jnp.float32))]
  error = _compile_error(run, *args)
  allocated = re.search(r"Scoped allocation with size ([\d.]+)M", error or "")
  assert allocated, error
  assert float(allocated.group(1)) * 2**20 <= loss_tiles.vmem_bytes(kernel, *tiles, d)
