"""The safetensors file format, read and written with NumPy alone (no torch, no safetensors package).

A file is an 8-byte little-endian header length, a JSON header {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}} and the raw little-endian tensor bytes.
A sharded checkpoint adds `model.safetensors.index.json` whose "weight_map" names the file of each
tensor. bfloat16 comes from ml_dtypes (a JAX dependency), so bytes survive a read/write unchanged.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from lmtiny.config import UserError
from lmtiny.files import atomic_write

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
  body = memoryview(data)[8 + n:]
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in DTYPES:
      raise SafetensorsError(f"{path}: tensor {name} has dtype {info['dtype']}, which lmtiny does not read")
    begin, end = info["data_offsets"]
    dtype = np.dtype(DTYPES[info["dtype"]])
    if end > len(body) or end - begin != dtype.itemsize * int(np.prod(info["shape"], dtype=np.int64)):
      raise SafetensorsError(f"{path}: tensor {name} is truncated or has a wrong size")
    out[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(info["shape"]).copy()
  return out


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
    try:
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, json.JSONDecodeError, KeyError) as e:
      raise SafetensorsError(f"{index}: cannot read the shard index ({e})") from None
    tensors = {}
    for name in files:
      tensors.update(read_file(os.path.join(directory, name)))
    return tensors
  single = os.path.join(directory, SINGLE_FILE)
  if not os.path.exists(single):
    raise SafetensorsError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints "
                           "are read; convert a pytorch_model.bin with transformers' save_pretrained)")
  return read_file(single)
