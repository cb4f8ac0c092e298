"""Bad inputs of the reliability issue (II) caught at the edge, through the entry points' `main(argv)`
in-process: exactly one `error:` line naming the flag, field or file, exit status 2, nothing written.
Unwritable outputs are refused before the work (a benchmark, an evaluation, reading a checkpoint),
and malformed Hugging Face checkpoints, built here byte by byte, before anything is written."""
import errno
import json
import os
import struct

import numpy as np
import pytest

from lm_fixtures import ROOT
from readonly import ReadOnly
from lmtiny import bench, eval as eval_cli, import_hf, train
from lmtiny.fs import outputs
from lmtiny.interop import convert
from lmtiny.interop.safetensors_io import write_file

TINY = os.path.join(ROOT, "configs", "tiny.py")


def _one_error(capsys, status):
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert status == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
  return errors[0]


@pytest.fixture
def read_only(tmp_path):
  ro = ReadOnly(tmp_path)
  yield ro
  ro.release()


# ---------------------------------------------------------------------------------------------
# Outputs checked before the work.


def test_bench_json_onto_a_directory_or_a_read_only_place_is_refused_before_the_benchmark(
    tmp_path, read_only, capsys, monkeypatch):
  monkeypatch.setattr(bench, "benchmark", lambda *a, **k: pytest.fail("benchmarked before the check"))
  monkeypatch.setattr(bench, "compile_report", lambda *a, **k: pytest.fail("compiled before the check"))
  argv = ["bench", "--config", TINY, "--steps=1"]
  line = _one_error(capsys, bench.main(argv + [f"--json={tmp_path}"]))
  assert line == f"error: --json={tmp_path}: is a directory; name a file"
  assert _one_error(capsys, bench.main(argv + ["--json="])) == "error: --json=: empty; name a file"
  ro, why = read_only.root, read_only.freeze()
  for flags in (["--compile-only"], []):
    line = _one_error(capsys, bench.main(argv + flags + [f"--json={ro / 'r.json'}"]))
    assert line == f"error: --json={ro / 'r.json'}: cannot write to {ro} ({why})"
  assert os.listdir(ro) == []


def test_bench_json_into_a_new_directory_is_written(tmp_path, monkeypatch):
  report = {"params": 1, "compile_s": 0.5, "xla_memory": None, "estimate": None, "device": "cpu", "devices": 8,
            "mesh": {"data": 8, "fsdp": 1, "tensor": 1}, "attention": "auto", "dtype": "float32"}
  monkeypatch.setattr(bench, "compile_report", lambda *a, **k: report)
  path = tmp_path / "new" / "dir" / "r.json"
  assert bench.main(["bench", "--config", TINY, "--compile-only", f"--json={path}"]) == 0
  assert json.loads(path.read_text())["compile_s"] == 0.5


def test_import_hf_into_a_read_only_place_is_refused_before_reading(read_only, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(convert, "import_checkpoint", lambda *a, **k: pytest.fail("read the checkpoint first"))
  ro = read_only.root
  (ro / "empty").mkdir()  # an empty RUN is allowed, but it is replaced through its parent
  why = read_only.freeze()
  for run in (ro / "run", ro / "empty"):
    line = _one_error(capsys, import_hf.main(["--hf", str(tmp_path), "--workdir", str(run)]))
    assert line == f"error: --workdir={run}: cannot write to {ro} ({why})"
  assert os.listdir(ro) == ["empty"]


def test_eval_on_a_read_only_run_is_refused_before_evaluating(read_only, capsys, monkeypatch):
  monkeypatch.setattr(eval_cli, "evaluate", lambda *a, **k: pytest.fail("evaluated before the check"))
  run = read_only.root
  (run / "config.json").write_text("{}")
  why = read_only.freeze()
  line = _one_error(capsys, eval_cli.main(["--workdir", str(run), "--tasks", "bpb"]))
  assert line == f"error: --workdir={run}: cannot write to {run} ({why})"
  assert os.listdir(run) == ["config.json"]


def test_eval_of_a_stage_run_needs_its_report_card_root_writable(read_only, capsys, monkeypatch):
  # RUN/sft writes RUN/sft/eval.json and the pipeline's card RUN/report.md: a read-only RUN is
  # refused before evaluating even when RUN/sft itself is writable.
  monkeypatch.setattr(eval_cli, "evaluate", lambda *a, **k: pytest.fail("evaluated before the check"))
  root = read_only.root
  (root / "config.json").write_text("{}")
  (root / "run_kind.json").write_text('{"kind": "train"}')  # a run (a bare config.json is anybody's)
  read_only.writable(root / "sft")
  why = read_only.freeze()
  line = _one_error(capsys, eval_cli.main(["--workdir", str(root / "sft"), "--tasks", "bpb"]))
  assert line == f"error: --workdir={root / 'sft'}: cannot write to {root} ({why})"
  assert sorted(os.listdir(root)) == ["config.json", "run_kind.json", "sft"] and os.listdir(root / "sft") == []


def test_the_write_probe_leaves_nothing_on_a_full_disk(tmp_path, monkeypatch):
  # A full disk lets the probe file be created and fails its write: it was left behind (and a
  # re-run of prepare then found an --out that was not empty).
  real_open = open

  class Full:
    def __init__(self, path, mode):
      self._f = real_open(path, mode)

    def __enter__(self):
      return self

    def write(self, data):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __exit__(self, *exc):
      self._f.close()

  monkeypatch.setattr(outputs, "open", Full, raising=False)
  for check in (outputs.check_output_dir, outputs.check_output_file, outputs.check_output_parent):
    with pytest.raises(outputs.OutputError) as e:
      check(str(tmp_path / "out"), "--out")
    assert str(e.value) == f"--out={tmp_path / 'out'}: cannot write to {tmp_path} (No space left on device)"
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Config values accepted before and then NaN (or a traceback) once the run had started.


@pytest.mark.parametrize("override, message", [
    ("model.qk_scale=inf", "config.model.qk_scale=inf: must be a finite number > 0"),
    ("optim.weight_decay=nan", "config.optim.weight_decay=nan: must be a finite number >= 0"),
    ("optim.unembed_lr=nan", "config.optim.unembed_lr=nan: must be a finite number >= 0"),
    ("optim.embed_lr=-0.1", "config.optim.embed_lr=-0.1: must be a finite number >= 0"),
    ("model.init_std=-0.02", "config.model.init_std=-0.02: must be a finite number > 0"),
    ("train.tokens_per_param=-20", "config.train.tokens_per_param=-20.0: must be a finite number >= 0"),
])
def test_train_refuses_a_nan_or_negative_float_field_before_anything(tmp_path, capsys, monkeypatch, override,
                                                                     message):
  monkeypatch.setattr(train, "load_data", lambda *a, **k: pytest.fail("built the data before the check"))
  workdir = tmp_path / "run"
  line = _one_error(capsys, train.main(["train", "--config", TINY, f"--config.{override}", f"--workdir={workdir}"]))
  assert line == f"error: {message}"
  assert os.listdir(tmp_path) == []


def test_train_auto_batch_with_a_reference_batch_under_one_row_is_one_line(tmp_path, capsys, monkeypatch):
  # Before: a TypeError traceback (a batch of 0.25 tokens written into the int field batch_tokens),
  # after the data was built.
  monkeypatch.setattr(train, "load_data", lambda *a, **k: pytest.fail("the data was built before the check"))
  workdir = tmp_path / "run"
  argv = ["train", "--config", TINY, "--config.train.auto_batch=True", "--config.train.tokens_per_param=20",
          "--config.train.batch_reference_size=1", f"--workdir={workdir}"]
  line = _one_error(capsys, train.main(argv))
  assert line.startswith("error: config.train.batch_reference_size=1: train.auto_batch gives a batch of 0.25 tokens")
  assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Malformed Hugging Face checkpoints: one line naming the file and the field, nothing written.

HF_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 32,
             "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
             "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
             "tie_word_embeddings": True}


def _safetensors(header, body: bytes) -> bytes:
  head = json.dumps(header).encode()
  return struct.pack("<Q", len(head)) + head + body


def _good_tensors():
  return {"model.embed_tokens.weight": np.zeros((4, 2), np.float32), "model.norm.weight": np.ones((2,), np.float32)}


def _header_of(tensors):
  """The header write_file gives `tensors` (sorted, contiguous), as a dict to spoil."""
  header, offset = {}, 0
  for name in sorted(tensors):
    n = tensors[name].nbytes
    header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + n]}
    offset += n
  return header, b"".join(tensors[k].tobytes() for k in sorted(tensors))


def _spoiled(case):
  """{file name: bytes or JSON object} of a checkpoint directory with one defect."""
  header, body = _header_of(_good_tensors())
  config = dict(HF_CONFIG)
  files = {"config.json": config}
  if case == "header_is_a_list":
    files["model.safetensors"] = _safetensors([header], body)
  elif case == "no_dtype":
    del header["model.norm.weight"]["dtype"]
    files["model.safetensors"] = _safetensors(header, body)
  elif case == "shifted_offsets":
    for name in header:
      header[name]["data_offsets"] = [o + 4 for o in header[name]["data_offsets"]]
    files["model.safetensors"] = _safetensors(header, body + bytes(4))
  elif case == "zero_heads":
    config["num_attention_heads"] = 0
    files["model.safetensors"] = _safetensors(header, body)
  elif case == "weight_map_is_a_list":
    files["model-00001-of-00001.safetensors"] = _safetensors(header, body)
    files["model.safetensors.index.json"] = {"metadata": {}, "weight_map": ["model-00001-of-00001.safetensors"]}
  return files


@pytest.mark.parametrize("case, where, message", [
    ("header_is_a_list", "model.safetensors",
     "not a safetensors file (the header is a JSON list, not an object of tensors)"),
    ("no_dtype", "model.safetensors", "tensor model.norm.weight: field 'dtype' missing"),
    ("shifted_offsets", "model.safetensors",
     "tensor model.embed_tokens.weight: field 'data_offsets'=[4, 36]: expected to begin at byte 0 (the first "
     "tensor's data starts there)"),
    ("zero_heads", "config.json", "num_attention_heads=0: must be an integer > 0"),
    ("weight_map_is_a_list", "model.safetensors.index.json",
     "field 'weight_map' is a JSON list, not an object {tensor name: shard file}"),
])
def test_import_hf_refuses_a_malformed_checkpoint_in_one_line(tmp_path, capsys, case, where, message):
  hf = tmp_path / "hf"
  hf.mkdir()
  for name, content in _spoiled(case).items():
    (hf / name).write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
  line = _one_error(capsys, import_hf.main(["--hf", str(hf), "--workdir", str(tmp_path / "run")]))
  assert line == f"error: {hf / where}: {message}"
  assert sorted(os.listdir(tmp_path)) == ["hf"]  # no run, no temporary sibling


def test_the_good_checkpoint_the_spoiled_ones_come_from_reads(tmp_path):
  # The cases above differ from a readable file by their one defect only.
  from lmtiny.interop.safetensors_io import read_file
  header, body = _header_of(_good_tensors())
  (tmp_path / "m.safetensors").write_bytes(_safetensors(header, body))
  write_file(str(tmp_path / "w.safetensors"), _good_tensors())
  for name in ("m", "w"):
    got = read_file(str(tmp_path / f"{name}.safetensors"))
    assert {k: v.tolist() for k, v in got.items()} == {k: v.tolist() for k, v in _good_tensors().items()}
