"""lmtiny's NumPy safetensors reader/writer against the safetensors package itself (torch side),
bfloat16 included, sharded checkpoints, and one-line errors for broken files."""
import json
import struct

import ml_dtypes
import numpy as np
import pytest


from lmtiny.interop.safetensors_io import SafetensorsError, read_checkpoint, read_file, write_file


def _tensors():
  rng = np.random.default_rng(0)
  return {"a.weight": rng.standard_normal((3, 5)).astype(np.float32),
          "b": rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),
          "c": rng.integers(-5, 5, (2, 2, 2)).astype(np.int64), "d": np.float16(2.5) * np.ones((4, 1), np.float16)}


def _torch():
  """torch and safetensors' torch side (the "hf" extra); the reference tests skip without them."""
  torch = pytest.importorskip("torch")
  return torch, pytest.importorskip("safetensors.torch")


def test_written_files_read_back_in_torch_bit_for_bit(tmp_path):
  torch, st = _torch()
  path = str(tmp_path / "x.safetensors")
  write_file(path, _tensors(), metadata={"format": "pt"})
  theirs = st.load_file(path)
  for name, x in _tensors().items():
    t = theirs[name]
    if x.dtype == ml_dtypes.bfloat16:
      assert t.dtype == torch.bfloat16 and (t.view(torch.int16).numpy() == x.view(np.int16)).all()
    else:
      assert t.numpy().dtype == x.dtype and (t.numpy() == x).all()


def test_reads_files_torch_wrote_and_sharded_checkpoints(tmp_path):
  torch, st = _torch()
  torch.manual_seed(0)
  first = {"w": torch.randn(4, 3).to(torch.bfloat16), "v": torch.randn(2)}
  second = {"u": torch.arange(6, dtype=torch.int32).reshape(2, 3)}
  st.save_file(first, str(tmp_path / "model-00001-of-00002.safetensors"))
  st.save_file(second, str(tmp_path / "model-00002-of-00002.safetensors"))
  weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
  weight_map.update({k: "model-00002-of-00002.safetensors" for k in second})
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  ours = read_checkpoint(str(tmp_path))
  assert sorted(ours) == ["u", "v", "w"]
  assert (ours["w"].view(np.int16) == first["w"].view(torch.int16).numpy()).all()
  assert (ours["v"] == first["v"].numpy()).all() and (ours["u"] == second["u"].numpy()).all()


def test_broken_files_are_user_errors(tmp_path):
  path = tmp_path / "x.safetensors"
  write_file(str(path), _tensors())
  path.write_bytes(path.read_bytes()[:-3])
  with pytest.raises(SafetensorsError, match="tensor .* truncated"):
    read_file(str(path))
  with pytest.raises(SafetensorsError, match="no model.safetensors"):
    read_checkpoint(str(tmp_path / "empty"))


def _raw(header, body=b""):
  head = json.dumps(header).encode()
  return struct.pack("<Q", len(head)) + head + body


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, body, message", [
    ([F32], bytes(8), "not a safetensors file (the header is a JSON list, not an object of tensors)"),
    ({"a": [0, 8]}, bytes(8), "tensor a: its header entry is a JSON list, not an object"),
    ({"a": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), "tensor a: field 'dtype' missing"),
    ({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, bytes(8), "tensor a: field 'shape' missing"),
    ({"a": dict(F32, shape=[-2])}, bytes(8), "tensor a: field 'shape'=[-2]: must be a list of integers >= 0"),
    ({"a": dict(F32, data_offsets=[8, 0])}, bytes(8), "tensor a: field 'data_offsets'=[8, 0]: must be [begin, end]"),
    ({"a": dict(F32, data_offsets=[0, 4])}, bytes(8), "tensor a: field 'data_offsets'=[0, 4] spans 4 bytes; its shape "
                                                      "[2] of F32 needs 8"),
    ({"a": F32, "b": dict(F32, data_offsets=[4, 12])}, bytes(16),
     "tensor b: field 'data_offsets'=[4, 12]: expected to begin at byte 8 (where tensor a ends)"),
    ({"a": dict(F32, data_offsets=[-4, 4])}, bytes(8), "field 'data_offsets'=[-4, 4]: must be [begin, end]"),
    ({"a": F32}, bytes(12), "tensor a: field 'data_offsets' ends the data at byte 8, but the file holds 12 bytes of "
                            "data (4 stray bytes follow it)"),
    ({"a": F32}, bytes(6), "tensor a: field 'data_offsets' ends the data at byte 8, but the file holds 6 bytes of "
                           "data (the file is truncated)"),
])
def test_malformed_headers_name_the_tensor_and_field(tmp_path, header, body, message):
  path = tmp_path / "x.safetensors"
  path.write_bytes(_raw(header, body))
  with pytest.raises(SafetensorsError) as e:
    read_file(str(path))
  assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("weight_map, message", [
    (["model-1.safetensors"], "field 'weight_map' is a JSON list, not an object {tensor name: shard file}"),
    ({"a": 3}, "field 'weight_map': tensor a maps to 3, not a file name in the checkpoint directory"),
    ({"a": "../elsewhere.safetensors"}, "tensor a maps to '../elsewhere.safetensors', not a file name"),
])
def test_a_malformed_index_names_its_field(tmp_path, weight_map, message):
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  with pytest.raises(SafetensorsError) as e:
    read_checkpoint(str(tmp_path))
  assert str(e.value).startswith(f"{tmp_path / 'model.safetensors.index.json'}: ") and message in str(e.value)
