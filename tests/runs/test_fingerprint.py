"""lmtiny.runs.fingerprint: NumPy's sums of a state in CPU memory equal the jitted program's (which
accelerators and multi-process runs use), bit for bit, on every dtype a state holds and on arrays
sharded over the emulated devices; a train state takes the NumPy path, and a dtype NumPy would
read differently (PRNG keys, fp8) takes the program."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lm_fixtures import tiny_config
from lmtiny.parallel import sharding
from lmtiny.runs import fingerprint as fingerprint_lib
from lmtiny.training.steps import build_steps


def _device_only(monkeypatch):
  """What fingerprint() gives when every state takes the jitted program."""
  monkeypatch.setattr(fingerprint_lib, "_in_host_memory", lambda x: False)
  return fingerprint_lib.fingerprint


def _no_device_path(monkeypatch):
  def refuse(state):
    raise AssertionError("took the jitted program")
  monkeypatch.setattr(fingerprint_lib, "_device_sums", refuse)


def _mixed_state():
  rng = np.random.default_rng(0)
  mesh = jax.make_mesh((8,), ("x",))
  spread = NamedSharding(mesh, P("x"))
  return {
      # large positive bit patterns: the float32 and uint32 sums wrap past 2**32 many times
      "f32": jax.device_put(rng.normal(size=(64, 48)).astype(np.float32), spread),
      "bf16": jnp.asarray(rng.normal(size=(40, 8)), jnp.bfloat16),
      "f16": jnp.asarray(rng.normal(size=(17,)), jnp.float16),
      "i32": jax.device_put(rng.integers(-2**31, 2**31, size=(32,), dtype=np.int32), spread),
      "u32": jnp.asarray(rng.integers(2**31, 2**32, size=(9, 3), dtype=np.uint32)),
      "i8": jnp.asarray(rng.integers(-128, 128, size=(33,), dtype=np.int8)),  # negatives widen with their sign
      "u8": jnp.asarray(rng.integers(0, 256, size=(5,), dtype=np.uint8)),
      "flags": jnp.asarray([True, False, True]),
      "step": jnp.asarray(7, jnp.int32),
  }


def test_numpy_sums_equal_the_jitted_programs_on_every_dtype(monkeypatch):
  state = _mixed_state()
  want = _device_only(monkeypatch)(state)
  monkeypatch.undo()
  _no_device_path(monkeypatch)
  got = fingerprint_lib.fingerprint(state)
  assert got == want and all(type(v) is int for v in jax.tree.leaves(got))
  changed = dict(state, bf16=state["bf16"].at[3, 1].set(state["bf16"][3, 1] * 2))
  assert fingerprint_lib.fingerprint(changed)["bf16"] != got["bf16"]


def test_a_train_state_is_summed_by_numpy_and_matches_the_program(monkeypatch):
  cfg = tiny_config()
  mesh = sharding.make_mesh(cfg.mesh, jax.devices())
  with jax.set_mesh(mesh):
    state = build_steps(cfg, mesh, total_steps=1).init()
  want = _device_only(monkeypatch)(state)
  monkeypatch.undo()
  _no_device_path(monkeypatch)
  assert fingerprint_lib.fingerprint(state) == want


def test_a_dtype_numpy_reads_differently_takes_the_program(monkeypatch):
  calls, device_sums = [], fingerprint_lib._device_sums
  monkeypatch.setattr(fingerprint_lib, "_device_sums", lambda state: calls.append(state) or device_sums(state))
  state = {"w": jnp.ones((3,)), "fp8": jnp.asarray([1.5, 2.0, 448.0], jnp.float8_e4m3fn)}  # a value cast
  sums = fingerprint_lib.fingerprint(state)
  assert len(calls) == 1 and sums == {"w": 3 * 0x3F800000, "fp8": 1 + 2 + 448}
  assert not fingerprint_lib._in_host_memory(jax.random.key(0))  # np.asarray refuses typed keys
