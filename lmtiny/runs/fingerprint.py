"""A checkpoint's fingerprint: per-array wrapping uint32 sums of the raw bits (2-byte values widened,
1-byte integers and booleans converted). Integer addition is exact in any order, so the value is
the same on any mesh and process count, and any changed byte in an array (almost surely) changes it.

A state held in this process's CPU memory is summed by NumPy: XLA compiled the summing program
for 0.4-0.6 s in every command that saved or restored (once per state layout, for a few
milliseconds of work on the tiny model's 10 MB). Any other state (on an accelerator, sharded
across processes, or holding a dtype NumPy would read differently, such as PRNG keys and fp8) is
summed by one jitted program, whose sums of sharded arrays are collectives. Both give the same
numbers (tests/runs/test_fingerprint.py), so a checkpoint saved on one verifies on the other.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lmtiny.parallel import xla_options

_HOST_DTYPES = frozenset(np.dtype(d) for d in (np.float32, jnp.bfloat16, np.float16, np.int32, np.uint32, np.int16,
                                               np.uint16, np.int8, np.uint8, np.bool_))


def fingerprint(state):
  """The tree of `state` with each array replaced by its sum (a Python int)."""
  if all(_in_host_memory(x) for x in jax.tree.leaves(state)):
    return jax.tree.map(_host_sum, state)
  return jax.tree.map(int, jax.device_get(_device_sums(state)))


def _in_host_memory(x) -> bool:
  return (isinstance(x, jax.Array) and x.dtype in _HOST_DTYPES and x.is_fully_addressable
          and all(d.platform == "cpu" for d in x.sharding.device_set))


def _host_sum(x) -> int:
  a = np.asarray(x)
  if a.dtype.itemsize in (2, 4):
    a = a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)
  return int(a.sum(dtype=np.uint32))  # NumPy's integer sums wrap, as XLA's do


@xla_options.jit
def _device_sums(state):
  def bits(x):
    x = jnp.asarray(x)
    if x.dtype.itemsize == 2:
      x = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    elif x.dtype.itemsize == 4:
      x = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
      x = x.astype(jnp.uint32)
    return jnp.sum(x, dtype=jnp.uint32)
  return jax.tree.map(bits, state)
