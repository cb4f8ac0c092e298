"""Which Hugging Face architecture carries an lmtiny model, in both directions.

Export picks the first that computes the model's function exactly: Llama (SwiGLU, learned or
unit norm scales, no softcap, no embedding norm), Qwen3 (the same with QK-norm), transformers'
NanoChat (nanochat's original GPT: configs/d12 ... d32), else "lmtiny", the modeling file shipped
in the export (lmtiny/interop/remote; every other config: tiny, the 38M designs, the 2026 recipe).
Import reads config.json's model_type: llama, qwen3, nanochat or lmtiny.
"""
from __future__ import annotations

import os

import numpy as np

from lmtiny.interop import llama, nanochat, remote, tensors
from lmtiny.interop.tensors import InteropError

CLASSES = {**llama.ARCHITECTURES, "nanochat": nanochat.NANOCHAT, "lmtiny": nanochat.REMOTE}
IGNORED_HF_TENSORS = llama.IGNORED_HF_TENSORS


def export_architecture(m) -> str:
  """"llama", "qwen3", "nanochat" or "lmtiny" for an lmtiny model config."""
  if llama.unexpressed(m) is None:
    return llama.export_architecture(m)
  if nanochat.nanochat_unexpressed(m) is None:
    return "nanochat"
  return "lmtiny"


def hf_config(arch: str, m, *, dtype: str, bos_id: int, eos_ids: list[int], pad_id: int) -> dict:
  """config.json of `arch` for an lmtiny model config."""
  if arch in llama.ARCHITECTURES:
    return llama.hf_config(m, dtype=dtype, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id)
  build = nanochat.nanochat_config if arch == "nanochat" else nanochat.remote_config
  return build(m, dtype=dtype, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id)


def hf_tensors(arch: str, flat: dict, m) -> dict[str, np.ndarray]:
  """{HF name: float32 array} of an lmtiny model's parameters (layers unstacked) under `arch`."""
  if arch in llama.ARCHITECTURES:
    return llama.to_hf_tensors(flat, m)
  names = nanochat.nanochat_tensor_name if arch == "nanochat" else nanochat.remote_tensor_name
  return tensors.export_tensors(flat, names, m.vocab_size)


def remote_files(arch: str) -> dict[str, bytes]:
  """{file name: source} shipped next to config.json: the modeling file for "lmtiny", else none."""
  if arch != "lmtiny":
    return {}
  folder = os.path.dirname(os.path.abspath(remote.__file__))
  return {name: open(os.path.join(folder, name), "rb").read() for name in nanochat.REMOTE_FILES}


def import_fields(hf, where: str) -> tuple[str, dict, tensors.NameTable]:
  """(model_type, lmtiny `model` fields, tensor names) of a config.json; what lmtiny cannot
  represent is refused, naming the field."""
  if not isinstance(hf, dict):
    raise InteropError(f"{where}: a JSON {type(hf).__name__}, not an object of config fields")
  arch = hf.get("model_type")
  if arch in llama.ARCHITECTURES:
    return arch, llama.model_fields(hf, where), llama.tensor_name
  if arch == "nanochat":
    fields = dict(llama.shape_fields(hf, where), **nanochat.nanochat_fields(hf, where))
    return arch, fields, nanochat.nanochat_tensor_name
  if arch == "lmtiny":
    return arch, dict(llama.shape_fields(hf, where), **nanochat.remote_fields(hf, where)), nanochat.remote_tensor_name
  raise InteropError(f"{where}: model_type={arch!r}; lmtiny imports {', '.join(CLASSES)}")
