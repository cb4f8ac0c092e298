"""Per-platform XLA compiler options of the jitted steps (lmtiny.parallel.xla_options)."""
import re

import jax

import jax.numpy as jnp
import numpy as np
import pytest

from lm_fixtures import needs_libtpu, tiny_config
from lmtiny.training.benchmark import synthetic_batch
from lmtiny.parallel import sharding, xla_options
from lmtiny.training.steps import build_steps, device_batch


def test_options_per_platform():
  env = {}
  assert xla_options.compiler_options("cpu", env) == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
                                                      "xla_backend_optimization_level": 1}
  gpu, tpu = xla_options.compiler_options("gpu", env), xla_options.compiler_options("tpu", env)
  assert gpu["xla_gpu_enable_latency_hiding_scheduler"] and gpu["xla_gpu_enable_while_loop_double_buffering"]
  assert all(name.startswith("xla_gpu_") for name in gpu)
  assert tpu["xla_tpu_enable_async_collective_fusion"] and tpu["xla_enable_async_all_gather"]
  assert not any(name.startswith("xla_gpu_") for name in tpu)
  assert xla_options.compiler_options("cuda", env) == gpu
  assert xla_options.compiler_options("metal", env) == {}
  # FSDP's all-gathers join the collective fusions on a v5e only (jax 0.12's libtpu refuses it elsewhere)
  fuse = "xla_tpu_enable_async_collective_fusion_fuse_all_gather"
  assert xla_options.compiler_options("tpu", env, "TPU v5 lite") == dict(tpu, **{fuse: True})
  for kind in ("TPU v6 lite", "TPU v5", "TPU v4", ""):
    assert xla_options.compiler_options("tpu", env, kind) == tpu and fuse not in tpu
  assert xla_options.compiler_options("gpu", env, "TPU v5 lite") == gpu


def test_the_users_flags_win():
  env = {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/x",
         "LIBTPU_INIT_ARGS": "--xla_tpu_enable_async_collective_fusion=false TPU_MEGACORE=MEGACORE_DENSE"}
  gpu, tpu = xla_options.compiler_options("gpu", env), xla_options.compiler_options("tpu", env)
  assert "xla_gpu_enable_latency_hiding_scheduler" not in gpu and "xla_gpu_enable_while_loop_double_buffering" in gpu
  assert "xla_tpu_enable_async_collective_fusion" not in tpu and "xla_tpu_overlap_compute_collective_tc" in tpu
  assert len(gpu) == len(xla_options.compiler_options("gpu", {})) - 1
  # XLA_FLAGS also reach libtpu; LIBTPU_INIT_ARGS never reach a GPU.
  assert "xla_enable_async_all_gather" not in xla_options.compiler_options(
      "tpu", {"XLA_FLAGS": "--xla_enable_async_all_gather=false"})
  assert xla_options.compiler_options("gpu", {"LIBTPU_INIT_ARGS": env["XLA_FLAGS"]}) == \
      xla_options.compiler_options("gpu", {})
  assert xla_options.user_flag_names("gpu", env) == {"xla_gpu_enable_latency_hiding_scheduler", "xla_dump_to"}
  # the tests' own fast compiles (XLA_FLAGS, tests/lm_fixtures.py) keep their level on CPU
  assert xla_options.compiler_options("cpu", {"XLA_FLAGS": "--xla_backend_optimization_level=0"}) == \
      {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def test_cpu_and_gpu_option_names_exist_in_this_jaxlib():
  # XLA:CPU compiles with any DebugOptions field (GPU ones included) and refuses unknown names.
  for platform in ("cpu", "gpu"):
    options = xla_options.compiler_options(platform, {})
    jax.jit(lambda x: x + 1, compiler_options=options).lower(1.0).compile()
  with pytest.raises(Exception, match="No such compile option"):
    jax.jit(lambda x: x + 1, compiler_options={"xla_gpu_no_such_option": True}).lower(1.0).compile()


@needs_libtpu
@pytest.mark.parametrize("topology, kind", [("v5e:2x2", "TPU v5 lite"), ("v6e:2x2", "TPU v6 lite"),
                                            ("v5p:2x2x1", "TPU v5"), ("v4:2x2x1", "TPU v4")])
def test_each_tpu_generation_compiles_a_sharded_program_with_its_options(topology, kind):
  # libtpu refuses an option it does not know, and (jax 0.12's) one it deems unsafe on that chip
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from lmtiny.training.lowering import tpu_devices
  devices = tpu_devices(topology)
  assert devices[0].device_kind == kind
  mesh = Mesh(np.array(devices), ("x",))
  x = jax.ShapeDtypeStruct((512, 512), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("x")))
  options = xla_options.device_options(devices[0], {})
  assert len(options) == len(xla_options.compiler_options("tpu", {})) + (kind == "TPU v5 lite")
  jax.jit(lambda a: (a @ a.T).sum(), compiler_options=options).lower(x).compile()


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



def test_module_level_programs_get_the_platforms_options_at_their_first_call():
  # The sampler's and scorer's programs (xla_options.jit): on CPU their matmuls leave YNNPACK as
  # the steps' do, while a plain jax.jit of the same function keeps XLA's default (a YNN dot).
  def dense_relu(a, b):
    return jax.nn.relu(a @ b)
  a = np.linspace(-1, 1, 64 * 32, dtype=np.float32).reshape(64, 32)
  ours = xla_options.jit(dense_relu)
  assert "__ynn_fusion" in jax.jit(dense_relu).lower(a, a.T).compile().as_text()
  assert "__ynn_fusion" not in ours.lower(a, a.T).compile().as_text()
  np.testing.assert_allclose(ours(a, a.T), np.maximum(a @ a.T, 0), rtol=1e-6)
  assert ours.__wrapped__ is dense_relu
