"""The safetensors file format, read and written with NumPy alone (no torch, no safetensors package).

A file is an 8-byte little-endian header length, a JSON header {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}} and the raw little-endian tensor bytes.
A sharded checkpoint adds `model.safetensors.index.json` whose "weight_map" names the file of each
tensor. bfloat16 comes from ml_dtypes (a JAX dependency), so bytes survive a read/write unchanged.
"""
from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from lmtiny.errors import UserError
from lmtiny.fs.atomic import atomic_write

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsError(UserError):
  """A checkpoint file that is missing, truncated or uses a dtype lmtiny cannot read."""


def read_file(path: str) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file, as NumPy arrays in their stored dtype."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise SafetensorsError(f"{path}: cannot read ({e.strerror})") from None
  if len(data) < 8:
    raise SafetensorsError(f"{path}: not a safetensors file (too short)")
  (n,) = struct.unpack("<Q", data[:8])
  try:
    header = json.loads(data[8:8 + n])
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise SafetensorsError(f"{path}: not a safetensors file (bad header)") from None
  if not isinstance(header, dict):
    raise SafetensorsError(f"{path}: not a safetensors file (the header is a JSON {_json_type(header)}, "
                           "not an object of tensors)")
  body = memoryview(data)[8 + n:]
  entries = {name: _entry(path, name, info) for name, info in header.items() if name != "__metadata__"}
  _check_layout(path, entries, len(body))
  return {name: np.frombuffer(body[begin:end], dtype=dtype).reshape(shape).copy()
          for name, (dtype, shape, begin, end) in entries.items()}


def _json_type(value) -> str:
  return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


def _entry(path: str, name: str, info) -> tuple[np.dtype, list[int], int, int]:
  """(dtype, shape, begin, end) of one header entry; SafetensorsError naming the tensor and field."""
  where = f"{path}: tensor {name}"
  if not isinstance(info, dict):
    raise SafetensorsError(f"{where}: its header entry is a JSON {_json_type(info)}, not an object")
  for field in ("dtype", "shape", "data_offsets"):
    if field not in info:
      raise SafetensorsError(f"{where}: field '{field}' missing")
  if info["dtype"] not in DTYPES:
    raise SafetensorsError(f"{where} has dtype {info['dtype']}, which lmtiny does not read")
  shape, offsets = info["shape"], info["data_offsets"]
  if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
    raise SafetensorsError(f"{where}: field 'shape'={shape!r}: must be a list of integers >= 0")
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
          and offsets[0] <= offsets[1]):
    raise SafetensorsError(f"{where}: field 'data_offsets'={offsets!r}: must be [begin, end], 0 <= begin <= end")
  dtype = np.dtype(DTYPES[info["dtype"]])
  begin, end = offsets
  if end - begin != dtype.itemsize * math.prod(shape):
    raise SafetensorsError(f"{where}: field 'data_offsets'={offsets!r} spans {end - begin} bytes; its shape "
                           f"{shape} of {info['dtype']} needs {dtype.itemsize * math.prod(shape)}")
  return dtype, shape, begin, end


def _is_count(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(path: str, entries: dict, body_bytes: int) -> None:
  """The tensors' bytes tile the body exactly, in offset order (the format's rule, which the
  safetensors library enforces too): a shifted offset reads another tensor's bytes otherwise."""
  expected, previous = 0, None
  for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
    if begin != expected:
      after = f"where tensor {previous} ends" if previous else "the first tensor's data starts there"
      raise SafetensorsError(f"{path}: tensor {name}: field 'data_offsets'=[{begin}, {end}]: expected to begin at "
                             f"byte {expected} ({after})")
    expected, previous = end, name
  if expected != body_bytes:
    what = "the file is truncated" if expected > body_bytes else f"{body_bytes - expected} stray bytes follow it"
    where = f"tensor {previous}: field 'data_offsets' ends the data at byte {expected}" if previous else "no tensors"
    raise SafetensorsError(f"{path}: {where}, but the file holds {body_bytes} bytes of data ({what})")


def write_file(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
  """Writes `tensors` (sorted by name, contiguous, little-endian) atomically."""
  header, chunks, offset = {}, [], 0
  if metadata:
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    if array.dtype not in NAMES:
      raise SafetensorsError(f"{path}: tensor {name} has dtype {array.dtype}, which safetensors cannot hold")
    raw = array.tobytes()
    header[name] = {"dtype": NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  head = json.dumps(header, separators=(",", ":")).encode()
  head += b" " * (-len(head) % 8)  # the spec pads the header to an 8-byte boundary with spaces
  atomic_write(path, struct.pack("<Q", len(head)) + head + b"".join(chunks))


def read_checkpoint(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of a Hugging Face checkpoint directory: one model.safetensors or the shards an
  index file lists."""
  index = os.path.join(directory, INDEX_FILE)
  if os.path.exists(index):
    tensors = {}
    for name in _shard_files(index):
      tensors.update(read_file(os.path.join(directory, name)))
    return tensors
  single = os.path.join(directory, SINGLE_FILE)
  if not os.path.exists(single):
    raise SafetensorsError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints "
                           "are read; convert a pytorch_model.bin with transformers' save_pretrained)")
  return read_file(single)


def _shard_files(index: str) -> list[str]:
  """The shard files an index's weight_map ({tensor: file}) names, each once."""
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
  except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise SafetensorsError(f"{index}: cannot read the shard index ({type(e).__name__}: {e})") from None
  if not isinstance(weight_map, dict):
    raise SafetensorsError(f"{index}: field 'weight_map' is a JSON {_json_type(weight_map)}, not an object "
                           "{tensor name: shard file}")
  bad = [name for name, file in weight_map.items()
         if not isinstance(file, str) or os.path.basename(file) != file or file in ("", ".", "..")]
  if bad:
    raise SafetensorsError(f"{index}: field 'weight_map': tensor {bad[0]} maps to {weight_map[bad[0]]!r}, "
                           "not a file name in the checkpoint directory")
  return sorted(set(weight_map.values()))
