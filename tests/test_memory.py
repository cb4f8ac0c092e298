"""lmtiny.memory's estimate against XLA's own memory analysis of the compiled train step."""
import pytest

from lm_fixtures import tiny_config
from lmtiny import bench, memory


def _config(remat: str, **model):
  cfg = tiny_config(seq_len=128, batch_tokens=128 * 16, micro_batch_size=8)
  cfg.model.update(vocab_size=512, num_layers=4, d_model=128, num_heads=4, max_seq_len=128, dtype="bfloat16",
                   scan_layers=True, remat=remat, **model)
  cfg.mesh.update(data=1)
  return cfg


@pytest.mark.parametrize("remat", ["none", "dots_no_batch", "full"])
def test_estimate_within_25_percent_of_xla(remat):
  """Per device on a data=2 x fsdp=4 mesh of the 8 CPU devices, bf16, layers under scan."""
  cfg = _config(remat)
  cfg.mesh.update(data=2, fsdp=4)
  report = bench.compile_report(cfg)
  xla, estimate = report["xla_memory"]["peak"], report["estimate"]["total"]
  assert 0.75 <= estimate / xla <= 1.25, (remat, estimate / xla, report)


def test_estimate_parts_scale_with_sharding_and_batch():
  cfg = _config("dots_no_batch")
  one = memory.estimate(cfg)
  fsdp4 = memory.estimate(cfg, {"data": 1, "fsdp": 4, "tensor": 1})
  assert fsdp4["optimizer"] == pytest.approx(one["optimizer"] / 4, rel=0.05)
  assert fsdp4["activations"] < one["activations"]  # 8 rows per micro-step over 4 devices: 2 each
  cfg.train.device_batch_size = 2
  assert memory.estimate(cfg)["activations"] < one["activations"]  # 2 rows per micro-step, not 8
  assert memory.recommend_fsdp(cfg, chip_bytes=one["total"] * 2) == 1
  assert memory.recommend_fsdp(cfg, chip_bytes=1, max_devices=64) is None


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizer_estimate_is_the_optimizer_states_bytes(optimizer):
  """AdamW: two float32 moments per parameter; Muon: one per block matrix, two on the rest."""
  import jax
  import numpy as np
  from lmtiny import sharding
  from lmtiny.trainer import build_steps
  cfg = _config("none")
  cfg.optim.name = optimizer
  steps = build_steps(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]), total_steps=2)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(steps.abstract_state["opt_state"])
                    if np.issubdtype(x.dtype, np.floating))
  assert memory.estimate(cfg)["optimizer"] == pytest.approx(state_bytes, rel=1e-3)
