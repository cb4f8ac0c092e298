"""lmtiny.training.steps: on a data-parallel mesh each device sums its rows' gradients over the
micro-steps and the step reduces them across devices once (not once per micro-step), with the
same losses and weights as one device; the compiled program is the evidence for the count."""
import jax
import numpy as np
import pytest

from lm_fixtures import tiny_config, train_on_mesh
from lmtiny import config as config_lib
from lmtiny.training import lowering


def _cfg(**mesh):
  cfg = tiny_config(batch_tokens=32 * 32, micro_batch_size=8)  # 32 rows, 4 micro-steps of 8
  cfg.mesh.update(**mesh)
  return cfg


@pytest.mark.slow(seconds=5)
def test_data_parallel_gradients_are_reduced_once_per_step_not_per_micro_step():
  compiled, _, cfg, _ = lowering.compile_train_step(_cfg(data=8, fsdp=1, tensor=1))
  assert config_lib.accumulation_steps(config_lib.resolve_batch(cfg, 8).train) == 4
  text = compiled.as_text()
  assert lowering.gradient_reductions(text)["f32"] >= 8  # every weight's gradient, summed over devices
  assert lowering.gradient_reductions(lowering.loop_bodies(text)) == {}  # none inside the micro-step loop
  # Sharded gradients (FSDP) are still reduce-scattered per micro-step: the loop-body scan sees them.
  compiled, _, _, _ = lowering.compile_train_step(_cfg(data=2, fsdp=4, tensor=1))
  assert lowering.gradient_reductions(lowering.loop_bodies(compiled.as_text()))["f32"] >= 8


def test_loop_bodies_are_the_while_bodies_only():
  hlo = ("%body.1 (p: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {\n  %all-reduce.1 = f32[4,4]{1,0} all-reduce(%x)\n}\n\n"
         "%cond.2 (p: (s32[], f32[4,4])) -> pred[] {\n  %lt = pred[] compare(%a, %b)\n}\n\n"
         "ENTRY %main.3 (a: f32[4,4]) -> f32[4,4] {\n  %while.4 = (s32[], f32[4,4]) while(%t), condition=%cond.2, "
         "body=%body.1\n  %all-reduce.5 = f32[4,4]{1,0} all-reduce(%y)\n}\n")
  assert lowering.gradient_reductions(hlo) == {"f32": 2}
  assert lowering.gradient_reductions(lowering.loop_bodies(hlo)) == {"f32": 1}


def _train(cfg, devices, steps=2):
  return train_on_mesh(cfg, devices, steps)


@pytest.mark.slow(seconds=5)
def test_per_device_accumulation_on_8_devices_equals_one_device():
  one_losses, one_params = _train(_cfg(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  losses, params = _train(_cfg(data=8, fsdp=1, tensor=1), jax.devices())
  np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), params, one_params)
