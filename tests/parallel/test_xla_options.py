"""Per-platform XLA compiler options of the jitted steps (lmtiny.parallel.xla_options)."""
import re

import jax

from lm_fixtures import tiny_config
from lmtiny.training.benchmark import synthetic_batch
from lmtiny.parallel import sharding, xla_options
from lmtiny.training.steps import build_steps, device_batch


def test_only_cpu_gets_options():
  assert xla_options.compiler_options("cpu") == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
  assert xla_options.compiler_options("gpu") == {} and xla_options.compiler_options("tpu") == {}


def test_cpu_train_step_runs_its_matmuls_outside_ynnpack_and_keeps_its_reductions_there():
  cfg = tiny_config(steps=2)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  steps = build_steps(cfg, mesh, total_steps=2)
  with jax.set_mesh(mesh):
    state = steps.init()
    hlo = steps.train_step.lower(state, device_batch(synthetic_batch(cfg, 4), mesh)).compile().as_text()
  fused = {comp: re.search(r"\n%" + re.escape(comp) + r" .*?\n\}", hlo, re.S).group(0)
           for comp in re.findall(r"= \S+ fusion\([^\n]*?kind=kCustom, calls=%(\S+?),[^\n]*__ynn_fusion", hlo)}
  assert fused, "no YNNPACK reductions left"
  assert not any(" dot(" in body for body in fused.values())
  assert re.search(r"= f32\S* dot\(", hlo)  # the matmuls run as plain (Eigen) dots
