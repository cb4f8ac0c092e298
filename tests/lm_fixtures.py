"""Shared test fixtures: a very small config and in-memory token documents."""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from lmtiny import config as config_lib
from lmtiny.config import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_libtpu() -> bool:
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


# XLA:TPU compiles for a described slice (lmtiny.training.lowering.compile_for_topology) where libtpu is
# installed: the tpu extra brings it on Linux x86-64; .ci/run installs it, so CI runs these.
needs_libtpu = pytest.mark.skipif(not _has_libtpu(), reason="libtpu absent (pip install -e '.[tpu]' on Linux x86-64)")
# XLA:GPU compiles for described GPUs (lowering.gpu_devices) where jax's CUDA plugin is installed
# (4.9 GB with its CUDA libraries): no CI venv has it; tests/plan/test_memory.py records its figures.
HAS_CUDA_PLUGIN = (importlib.util.find_spec("jax_plugins") is not None
                   and importlib.util.find_spec("jax_plugins.xla_cuda12") is not None)
needs_cuda_plugin = pytest.mark.skipif(not HAS_CUDA_PLUGIN,
                                       reason="jax's CUDA plugin absent (pip install 'jax-cuda12-plugin[with-cuda]')")
VOCAB = 128

# Tests compile many small programs and run each briefly (compiling was 53% of tests/training and
# tests/model): LLVM at -O0 roughly halves XLA:CPU's compile time, and its older elemental emitter
# for fusions halves it again (those two directories: 273 -> 130 s of compiling, 259 -> 187 s on 2
# cores). Both change code generation only: XLA's HLO passes (fusion, SPMD partitioning, buffer
# assignment) still run, so the programs, their collectives and memory figures are the ones users get.
# One LLVM module per program instead of XLA's split into parts for parallel codegen: each worker
# keeps one core, so the split bought no time and cost CPU (tests/model, chat and kernels: 210 ->
# 190 CPU s, medians of two runs each; tests/training 305 -> 295).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_parallel_codegen_split_count=1"
ELEMENTAL_FUSIONS = "--xla_cpu_use_fusion_emitters=false"  # jaxlib 0.10; 0.12 dropped it
_KNOWN = "LMTINY_TEST_XLA_FLAGS"  # the probe's answer, inherited by test workers and subprocesses


def fast_compile_flags() -> str:
  """FAST_COMPILE, plus ELEMENTAL_FUSIONS where this jaxlib has that flag: XLA aborts the process
  on a flag it does not know, so a subprocess asks once per session."""
  if _KNOWN not in os.environ:
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                           env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=ELEMENTAL_FUSIONS), timeout=120)
    os.environ[_KNOWN] = FAST_COMPILE + (f" {ELEMENTAL_FUSIONS}" if probe.returncode == 0 else "")
  return os.environ[_KNOWN]


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for the tests (tests/conftest.py) and the processes they start: fast compiles, and
  `devices` emulated CPU devices."""
  return fast_compile_flags() + (f" --xla_force_host_platform_device_count={devices}" if devices else "")


@functools.cache
def _jitted_apply():
  import jax
  from flax import nnx
  return jax.jit(lambda graphdef, state, *args: nnx.merge(graphdef, state)(*args), static_argnums=0)


def apply_jitted(graphdef, state, *args):
  """nnx.merge(graphdef, state)(*args) compiled whole: eager op-by-op dispatch compiles every
  primitive on its own, many times slower. One jitted function, so equal models share compiles."""
  return _jitted_apply()(graphdef, state, *args)


def full_logits_loss(x, w, targets, ce_weights, z_weights, softcap):
  """The loss kernels' reference, from the whole [B, T, V] float32 logits: (objective, (ce, lse)),
  objective = sum(ce_weights * ce) + sum(z_weights * lse^2)."""
  import jax
  import jax.numpy as jnp
  logits = jnp.einsum("btd,dv->btv", x.astype(jnp.float32), w.astype(jnp.float32))
  if softcap:
    logits = softcap * jnp.tanh(logits / softcap)
  lse = jax.nn.logsumexp(logits, axis=-1)
  ce = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(ce * ce_weights + z_weights * lse ** 2), (ce, lse)


def forward(model, *args):
  """model(*args), compiled whole (apply_jitted)."""
  from flax import nnx
  return apply_jitted(*nnx.split(model), *args)


def train_on_mesh(cfg, devices, steps: int):
  """(losses, parameters) of `steps` train steps of cfg on the mesh cfg.mesh lays over `devices`,
  the batches drawn from memory_data() (lmtiny.training.steps directly: no run directory). Imports
  jax when called, as the helpers above do: tests/conftest.py imports this module before jax."""
  import jax
  from lmtiny.data.pipeline import make_train_iterator
  from lmtiny.parallel import sharding
  from lmtiny.training.steps import build_steps, device_batch
  mesh = sharding.make_mesh(cfg.mesh, devices)
  built = build_steps(cfg, mesh, total_steps=steps)
  batches = make_train_iterator(memory_data().train_docs, seq_len=cfg.train.seq_len,
                                batch_size=config_lib.global_batch_size(cfg.train), bos_id=0, seed=0)
  losses = []
  with jax.set_mesh(mesh):
    state = built.init()
    for _ in range(steps):
      state, metrics = built.train_step(state, device_batch(next(batches), mesh))
      losses.append(float(metrics["loss"]))  # blocks every step (the emulated devices' rendezvous)
    return losses, jax.device_get(state["params"])


def one_device(cfg):
  """cfg resolved for the first emulated device alone (a Trainer takes it in place of a config),
  for tests whose subject is not how a run splits over devices: they train at about half the CPU
  cost of 8 (a warm 24-step tiny run: 7.4 -> 3.6 CPU s), and the sharded paths keep their own
  tests (tests/parallel, test_loop's meshes, test_grad_collectives)."""
  import jax
  from lmtiny.training.resolved import resolve_run
  return resolve_run(cfg, devices=jax.devices()[:1])


def load_config_module(name: str):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_config(**train):
  """A ~0.1M-parameter model that compiles and steps in well under a second on CPU."""
  cfg = load_config_module("tiny").get_config()
  cfg.model.update(vocab_size=VOCAB, num_layers=2, d_model=64, num_heads=4, max_seq_len=64, dtype="float32")
  cfg.train.update(seq_len=32, batch_tokens=32 * 16, device_batch_size=0, steps=8, log_every=2, eval_every=4, eval_batches=2,
                   checkpoint_every=4, async_checkpointing=False, plot=False)
  cfg.train.update(**train)
  cfg.optim = base_config().optim  # AdamW + cosine (the demo's Muon has its own tests)
  cfg.optim.update(lr=1e-2, warmup_steps=2)
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  return cfg


def progression_docs(n: int, seed: int = 0, vocab: int = VOCAB) -> list[np.ndarray]:
  """Documents that are arithmetic progressions mod vocab (token 0 = BOS is never used): the
  next token is predictable from the previous two, so a model visibly learns."""
  rng = np.random.default_rng(seed)
  docs = []
  for _ in range(n):
    start, step, length = rng.integers(1, vocab), rng.integers(1, 7), rng.integers(6, 70)
    docs.append((1 + (start + step * np.arange(length)) % (vocab - 1)).astype(np.int32))
  return docs


def prefetch_threads() -> set[threading.Thread]:
  """The live threads of grain's thread prefetch (lmtiny.data.pipeline's `prefetch`): a test
  compares these before and after, so that a thread another test left in this worker is not its."""
  return {t for t in threading.enumerate() if t.name.startswith("grain-thread-prefetch")}


def memory_data(n_train: int = 300, n_val: int = 40, vocab: int = VOCAB):
  """The attributes the trainer reads from lmtiny.data.dataset.Data, over in-memory documents."""
  return SimpleNamespace(train_docs=progression_docs(n_train, 0, vocab), val_docs=progression_docs(n_val, 1, vocab),
                         token_bytes=np.r_[0, np.ones(vocab - 1)].astype(np.int32),
                         tokenizer=SimpleNamespace(bos_id=0, vocab_size=vocab))


def dot_types(text: str) -> list[tuple[str, str, str, str]]:
  """(lhs type, rhs type, result type, precision) of every dot_general in a StableHLO text."""
  pattern = (r"= stablehlo\.dot_general %\w+, %\w+, .*?precision = \[(\w+), \w+\] : "
             r"\(tensor<([^>]+)>, tensor<([^>]+)>\) -> tensor<([^>]+)>")
  return [(lhs, rhs, result, precision) for precision, lhs, rhs, result in re.findall(pattern, text)]
