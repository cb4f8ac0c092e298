"""Values as data only, between the sandbox's program and its checker (lmtiny.tasks.sandbox_child).

  send(fd, ["return", encode(value)])   # length-prefixed JSON frames over a pipe
  decode(receive(fd)[1])                # plain None/bool/int/float/str/bytes/list/tuple/dict/set

A tagged JSON encoding: ["N"] None, ["b", true] bool, ["i", "12"] int, ["f", "nan"] float,
["s", "x"] str, ["y", "00ff"] bytes, and ["l"|"t"|"S"|"F", [items]] list, tuple, set, frozenset,
["d", [[key, value], ...]] dict. The decoder trusts nothing it reads: a wrong tag, a payload of
the wrong type or an oversized frame raises WireError, and what it builds are the builtin types
themselves (an object with its own __eq__ cannot come out of it). Standard library only.
"""
from __future__ import annotations

import json
import os
import struct

MAX_FRAME = 8 * 2**20  # bytes; a larger answer is a failure, not a memory problem for the reader
_SCALARS = ((bool, "b", bool), (int, "i", int.__repr__), (float, "f", float.__repr__), (str, "s", str),
            (bytes, "y", bytes.hex))
_SEQUENCES = ((list, "l"), (tuple, "t"), (set, "S"), (frozenset, "F"))


class WireError(ValueError):
  """A frame or value that is not what the protocol allows."""


def encode(value, depth: int = 0):
  """`value` as tagged JSON-able data; TypeError for anything that is not plain data."""
  if depth > 100:
    raise TypeError("value nested more than 100 deep")
  if value is None:
    return ["N"]
  for kind, tag, convert in _SCALARS:
    if isinstance(value, kind):
      return [tag, convert(value)]
  for kind, tag in _SEQUENCES:
    if isinstance(value, kind):
      return [tag, [encode(v, depth + 1) for v in value]]
  if isinstance(value, dict):
    return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]]
  raise TypeError(f"{type(value).__name__} cannot cross the sandbox (plain data only)")


def _payload(item, kind):
  if not (isinstance(item, list) and len(item) == 2 and type(item[1]) is kind):  # noqa: E721
    raise WireError(f"bad {item[0] if isinstance(item, list) and item else 'value'} item")
  return item[1]


def decode(item):
  """The plain value an encode() result describes."""
  if not isinstance(item, list) or not item or not isinstance(item[0], str):
    raise WireError("not a tagged value")
  tag = item[0]
  if tag == "N" and len(item) == 1:
    return None
  if tag == "b":
    return _payload(item, bool)
  if tag == "i":
    return int(_payload(item, str))
  if tag == "f":
    return float(_payload(item, str))
  if tag == "s":
    return _payload(item, str)
  if tag == "y":
    return bytes.fromhex(_payload(item, str))
  if tag in ("l", "t", "S", "F"):
    values = [decode(v) for v in _payload(item, list)]
    return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](values)
  if tag == "d":
    pairs = _payload(item, list)
    if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
      raise WireError("bad dict item")
    return {decode(k): decode(v) for k, v in pairs}
  raise WireError(f"unknown tag {tag[:20]!r}")


def send(fd: int, message) -> None:
  data = json.dumps(message, ensure_ascii=True, allow_nan=False).encode()
  if len(data) > MAX_FRAME:
    raise TypeError(f"a value of {len(data)} bytes is over the {MAX_FRAME} bytes that may cross")
  data = struct.pack("<I", len(data)) + data
  while data:
    data = data[os.write(fd, data):]


def _read_exactly(fd: int, n: int) -> bytes | None:
  chunks = []
  while n:
    chunk = os.read(fd, min(n, 1 << 20))
    if not chunk:
      return None
    chunks.append(chunk)
    n -= len(chunk)
  return b"".join(chunks)


def receive(fd: int):
  """The next message, or None at the end of the stream."""
  head = _read_exactly(fd, 4)
  if head is None:
    return None
  size = struct.unpack("<I", head)[0]
  if size > MAX_FRAME:
    raise WireError(f"a frame of {size} bytes (at most {MAX_FRAME})")
  data = _read_exactly(fd, size)
  if data is None:
    return None
  try:
    return json.loads(data)
  except (ValueError, RecursionError) as e:
    raise WireError(f"not JSON ({type(e).__name__})") from e
