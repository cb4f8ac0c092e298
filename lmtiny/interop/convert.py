"""Export an lmtiny run to a Hugging Face checkpoint directory, and import one into a run.

  export_run(workdir, out_dir, step=None, dtype=None) -> summary dict
  import_checkpoint(hf_dir, workdir) -> summary dict

Both write a new directory whole: it is built in a temporary sibling and renamed into place
(lmtiny.runs.directory.new_directory), so an interruption or a full disk leaves no half-written directory.
An export records itself in lmtiny_export.json (EXPORT_RECORD: the source run, its step, the dtype
and architecture) and replaces only an earlier export (a directory holding that record), as a
whole, so none of its files survive; any other non-empty directory (a downloaded model, the source
of an import, a user's files) is refused untouched.

An imported run holds config.json (lmtiny's base config with the model fields of the HF config),
a parameter-only checkpoint at step 0 (what `lmtiny.runs.directory.load_weights` reads, e.g. as an SFT
init), the tokenizer, and hf_import.json recording the source and its dtype, which export uses by
default so that export(import(x)) writes x's tensors bit for bit.
"""
from __future__ import annotations

import json
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from lmtiny import config as config_lib
from lmtiny.errors import ConfigError, RunFailed
from lmtiny.fs.atomic import atomic_write, atomic_write_json
from lmtiny.fs.outputs import check_output_parent, is_disk_full
from lmtiny.interop import architectures, tensors as tensors_lib
from lmtiny.interop.tensors import InteropError
from lmtiny.interop.safetensors_io import read_checkpoint, SINGLE_FILE, write_file
from lmtiny.model.transformer import abstract_model
from lmtiny.runs import kind as runkind
from lmtiny.runs.checkpoint import Checkpointer
from lmtiny.runs import directory as rundir
from lmtiny.tokenizer import Tokenizer
from lmtiny.tokenizer import huggingface as hf_tokenizer

IMPORT_RECORD = runkind.IMPORT_RECORD  # an imported run's source and dtype
EXPORT_RECORD = "lmtiny_export.json"  # marks a directory as an lmtiny export: a later export may replace it
DTYPES = ("float32", "bfloat16", "float16")


class ExportFailed(RunFailed):
  """The export could not be written (disk full); nothing was left half-written."""


def _numpy_dtype(name: str):
  return {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[name]


def flat_params(model) -> dict:
  """{path: NumPy array} of a Transformer's parameters, per layer."""
  state = jax.device_get(nnx.state(model, nnx.Param))
  flat = {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(state)}
  return tensors_lib.unstack_layers(flat, model.cfg.num_layers) if model.cfg.scan_layers else flat


# What exports wrote before EXPORT_RECORD listed its files
_EXPORT_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer.model",
                 "tokenizer_config.json", "special_tokens_map.json", EXPORT_RECORD)


def _export_record(out_dir: str) -> dict | None:
  """`out_dir`'s export record (EXPORT_RECORD, a JSON object naming its source), or None."""
  try:
    with open(os.path.join(out_dir, EXPORT_RECORD)) as f:
      record = json.load(f)
  except (OSError, ValueError, TypeError):
    return None
  return record if isinstance(record, dict) and "source" in record else None


def _files_not_exported(out_dir: str, record: dict) -> list[str]:
  """What `out_dir` holds beyond the files its export wrote (the record's "files"): a user's."""
  written = record.get("files") if isinstance(record.get("files"), list) else _EXPORT_FILES
  return sorted(set(os.listdir(out_dir)) - set(written))


def check_export_dir(out_dir: str, workdir: str | None = None) -> None:
  """InteropError unless `out_dir` may be (re)placed by an export: absent, empty, or an earlier
  lmtiny export (EXPORT_RECORD), and neither the run nor holding it; OutputError (one line) when
  it cannot be written."""
  if workdir is not None:
    out, run = os.path.realpath(out_dir), os.path.realpath(workdir)
    if os.path.commonpath([out, run]) == out:
      raise InteropError(f"--out={out_dir}: is (or holds) the run directory --workdir={workdir}; "
                         "export to a directory of its own")
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise InteropError(f"--out={out_dir}: is a file, not a directory")
  if os.path.isdir(os.path.join(out_dir, "checkpoints")):
    raise InteropError(f"--out={out_dir}: holds an lmtiny run (checkpoints/); export to a directory of its own")
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    record = _export_record(out_dir)
    if record is None:
      raise InteropError(f"--out={out_dir}: not empty and not an earlier lmtiny export (no {EXPORT_RECORD}), "
                         "so not replaced; export to a new or empty directory")
    foreign = _files_not_exported(out_dir, record)
    if foreign:  # replacing the earlier export whole would delete them
      raise InteropError(f"--out={out_dir}: holds {foreign[0]}, which the earlier export there did not write; "
                         "move it, or export to a new directory")
  check_output_parent(out_dir, "--out")  # the export is built in a sibling of out_dir and renamed into place


def export_model(model, tokenizer, out_dir: str, dtype: str = "float32", source: dict | None = None) -> dict:
  """Writes `out_dir` (replacing an earlier export whole) in the first architecture that computes
  the model (lmtiny.interop.architectures): config.json, model.safetensors, modeling_lmtiny.py when
  no transformers class does, generation_config.json, the tokenizer and EXPORT_RECORD (with
  `source`, e.g. the run and step).
  ExportFailed (exit status 1) when the disk fills up: the temporary directory is removed and an
  earlier export in `out_dir` stays as it was."""
  m = model.cfg
  arch = architectures.export_architecture(m)
  _check_dtype(dtype)
  if not isinstance(tokenizer, Tokenizer):
    raise InteropError("tokenizer: only an lmtiny sentencepiece tokenizer can be exported "
                       "(this run was imported with a Hugging Face tokenizer)")
  check_export_dir(out_dir)
  bos, eos = tokenizer.bos_id, [tokenizer.special_id("assistant_end"), tokenizer.bos_id]
  pad = hf_tokenizer.PAD_ID
  cast = _numpy_dtype(dtype)
  tensors = {name: np.ascontiguousarray(x.astype(cast))
             for name, x in architectures.hf_tensors(arch, flat_params(model), m).items()}
  record = {"source": None, "step": None, **(source or {}), "dtype": dtype,
            "architecture": architectures.CLASSES[arch], "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
  try:
    with rundir.new_directory(out_dir, "--out", replace=True) as tmp:
      write_file(os.path.join(tmp, SINGLE_FILE), tensors, metadata={"format": "pt"})
      atomic_write_json(os.path.join(tmp, "config.json"),
                        architectures.hf_config(arch, m, dtype=dtype, bos_id=bos, eos_ids=eos, pad_id=pad))
      for name, text in architectures.remote_files(arch).items():
        atomic_write(os.path.join(tmp, name), text)
      atomic_write_json(os.path.join(tmp, "generation_config.json"),
                        {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "do_sample": True, "temperature": 0.8,
                         "top_k": 50, "top_p": 0.95})
      hf_tokenizer.write_tokenizer(tmp, tokenizer, m.max_seq_len)
      record["files"] = sorted(os.listdir(tmp) + [EXPORT_RECORD])  # what a later export may replace
      atomic_write_json(os.path.join(tmp, EXPORT_RECORD), record)
  except OSError as e:
    if not is_disk_full(e):
      raise
    raise ExportFailed(f"--out={out_dir}: disk full (No space left on device) while writing the export; "
                       "nothing was written (an earlier export there is as it was)") from None
  return {"architecture": architectures.CLASSES[arch], "tensors": len(tensors), "dtype": dtype,
          "bytes": sum(t.nbytes for t in tensors.values()), "remote_code": sorted(architectures.remote_files(arch))}


def _check_dtype(dtype: str) -> None:
  if dtype not in DTYPES:
    raise InteropError(f"--dtype={dtype}: must be one of {', '.join(DTYPES)}")


def export_run(workdir: str, out_dir: str, step: int | None = None, dtype: str | None = None) -> dict:
  """Exports a run's checkpoint (newest, or `step`); dtype defaults to the imported source's, else
  float32. Refuses (InteropError, OutputError) before reading weights when the dtype is not one of
  DTYPES or `out_dir` is not a directory an export may replace or write (check_export_dir)."""
  run = rundir.load_run(workdir, step)
  if dtype is not None:
    _check_dtype(dtype)
  check_export_dir(out_dir, workdir)
  record = os.path.join(workdir, IMPORT_RECORD)
  if dtype is None:
    dtype = json.load(open(record))["dtype"] if os.path.exists(record) else "float32"
  run, params = rundir.load_weights(run)
  source = {"source": os.path.abspath(workdir) if "://" not in workdir else workdir, "step": run.step}
  summary = export_model(run.model(params), run.tokenizer, out_dir, dtype, source)
  return dict(summary, step=run.step)


def _read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except OSError as e:
    raise InteropError(f"{path}: cannot read ({e.strerror})") from None
  except json.JSONDecodeError as e:
    raise InteropError(f"{path}: not JSON ({e})") from None


def write_run(workdir: str, cfg, params, tokenizer, step: int = 0, files: dict | None = None) -> None:
  """A new run directory `generate` reads: config.json, the tokenizer, a parameter-only checkpoint
  (`params`: the nnx State of the model's Params), `files` ({name: JSON object}) and its kind,
  "import" (lmtiny.runs.kind: no training verb writes into it), appearing whole or not at all
  (lmtiny.runs.directory.new_directory; `workdir` must be absent or empty)."""
  with rundir.new_directory(workdir, "--workdir") as tmp:
    ckpt = Checkpointer(os.path.join(tmp, "checkpoints"), keep=1, async_save=False)
    ckpt.save(step, {"params": params})
    ckpt.close()
    atomic_write(os.path.join(tmp, "config.json"), cfg.to_json_best_effort(indent=2).encode())
    hf_tokenizer.save_run_tokenizer(tmp, tokenizer)
    for name, obj in (files or {}).items():
      atomic_write_json(os.path.join(tmp, name), obj)
    runkind.record_kind(tmp, "import")


# lmtiny model field -> the Hugging Face config.json field it comes from (for messages)
HF_FIELDS = {"vocab_size": "vocab_size", "num_layers": "num_hidden_layers", "d_model": "hidden_size",
             "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
             "mlp_dim": "intermediate_size", "max_seq_len": "max_position_embeddings",
             "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps"}


def validated_model_config(fields: dict, where: str):
  """lmtiny's base config with the imported model fields; a bad value is an InteropError naming
  the config.json field it came from (num_key_value_heads, not model.num_kv_heads)."""
  cfg = config_lib.base_config()
  cfg.model.update(**fields)
  try:
    config_lib.validate_model(cfg.model)
  except ConfigError as e:
    message = re.sub(r"(?:config\.)?model\.(\w+)", lambda g: HF_FIELDS.get(g[1], g[0]), str(e))
    raise InteropError(f"{where}: {message}") from None
  return cfg


def import_checkpoint(hf_dir: str, workdir: str) -> dict:
  """Writes a new lmtiny run directory from a local Llama, Qwen3, NanoChat or lmtiny checkpoint directory."""
  if not os.path.isdir(hf_dir):
    raise InteropError(f"--hf={hf_dir}: no such directory")
  rundir.check_new_directory(workdir, "--workdir")
  hf = _read_hf_config(hf_dir)
  where = os.path.join(hf_dir, "config.json")
  model_type, fields, names = architectures.import_fields(hf, where)
  cfg = validated_model_config(fields, where)
  tensors = read_checkpoint(hf_dir)
  source_dtypes = sorted({str(t.dtype) for t in tensors.values()})
  tokenizer = hf_tokenizer.import_tokenizer(hf_dir, hf)
  if tokenizer.vocab_size > fields["vocab_size"]:
    raise InteropError(f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens, more than "
                       f"vocab_size={fields['vocab_size']} in config.json")
  abstract = abstract_model(cfg.model)
  state = nnx.state(abstract, nnx.Param)
  shapes = {path: var.get_value().shape for path, var in nnx.to_flat_state(state)}
  arrays = tensors_lib.import_tensors(tensors, shapes, names, fields["vocab_size"], hf_dir,
                                     ignored=architectures.IGNORED_HF_TENSORS)
  params = nnx.from_flat_state([(path, var.replace(jnp.asarray(arrays[path])))
                                     for path, var in nnx.to_flat_state(state)])
  dtype = "bfloat16" if source_dtypes == ["bfloat16"] else "float16" if source_dtypes == ["float16"] else "float32"
  write_run(workdir, cfg, params, tokenizer, files={IMPORT_RECORD: {
      "source": os.path.abspath(hf_dir), "model_type": model_type, "dtype": dtype,
      "tokenizer": type(tokenizer).__name__}})
  return {"model_type": model_type, "params": int(sum(a.size for a in arrays.values())),
          "dtype": dtype, "tokenizer": repr(tokenizer), "fields": fields}
