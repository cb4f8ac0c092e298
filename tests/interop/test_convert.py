"""Hugging Face interop against transformers itself (no downloads: tiny random checkpoints built
here with transformers' own classes): imported checkpoints give transformers' logits and greedy
text, Llama-shaped lmtiny models exported load in AutoModelForCausalLM with lmtiny's logits, import ->
export is bitwise, and Llama refuses what it cannot express (which exports as NanoChat or with the
shipped modeling file instead: test_architectures.py)."""
import errno
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")  # the "hf" extra: torch and transformers
transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from lm_fixtures import ROOT, forward
from lmtiny import export, import_hf
from lmtiny.config import base_config
from lmtiny.corpus.embedded import iter_embedded_documents
from lmtiny.interop import llama
from lmtiny.interop.convert import import_checkpoint, write_run
from lmtiny.interop.safetensors_io import read_checkpoint
from lmtiny.model.sampling import Sampler, SamplingParams
from lmtiny.model.transformer import Transformer
from lmtiny.runs.directory import load_run, load_weights, RunError
from lmtiny.tokenizer import train_tokenizer
from readonly import ReadOnly

TOKENS = np.array([[1, 300, 301, 12, 450, 77, 8, 9, 260, 33, 100, 500],
                   [1, 5, 17, 280, 281, 282, 40, 41, 42, 300, 311, 1]])
HF_VARIANTS = {  # name -> (class, config kwargs)
    "llama_untied_gqa": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_tied_mha": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen3_tied_gqa": (Qwen3ForCausalLM, Qwen3Config, dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  torch.set_num_threads(1)
  return train_tokenizer(iter_embedded_documents(60_000), 512, str(tmp_path_factory.mktemp("tok")))


def _hf_model(name, dtype=torch.float32):
  cls, cfg_cls, kw = HF_VARIANTS[name]
  torch.manual_seed(0)
  cfg = cfg_cls(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=5, **kw)
  model = cls(cfg).eval()
  with torch.no_grad():  # random norm scales, so a wrong norm mapping shows
    for n, p in model.named_parameters():
      if n.endswith("norm.weight"):
        p.copy_(1 + 0.1 * torch.randn_like(p))
  return model.to(dtype)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def _hf_greedy(model, prompt, n):
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
  return out[0, len(prompt):].tolist()


def _lmtiny_logits(model, tokens):
  return np.asarray(forward(model, jnp.asarray(tokens)))


def _lmtiny_greedy(model, prompt, n):
  return Sampler(model).generate([prompt], max_new_tokens=n, sampling=SamplingParams(0.0)).tokens[0]


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tok):
  """name -> (HF model, HF dir, lmtiny run dir), each imported through the CLI's library call."""
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for name in HF_VARIANTS:
    hf = _hf_model(name)
    hf_dir = str(root / name)
    hf.save_pretrained(hf_dir)
    with open(os.path.join(hf_dir, "tokenizer.model"), "wb") as f:
      f.write(tok.model_proto)
    run = str(root / f"{name}_run")
    assert import_hf.main(["--hf", hf_dir, "--workdir", run]) == 0
    out[name] = (hf, hf_dir, run)
  return out


@pytest.mark.slow(seconds=7)
@pytest.mark.parametrize("name", HF_VARIANTS)
def test_imported_checkpoint_gives_transformers_logits_and_greedy_text(imported, name):
  hf, _, run = imported[name]
  r = load_run(run)
  assert type(r.tokenizer).__name__ == "Tokenizer"  # an lmtiny tokenizer.model comes back as one
  assert r.cfg.model.qk_norm == name.startswith("qwen3")
  r, params = load_weights(r)
  model = r.model(params)
  ours, theirs = _lmtiny_logits(model, TOKENS), _hf_logits(hf, TOKENS)
  assert np.abs(ours - theirs).max() < 2e-5 * max(1.0, np.abs(theirs).max())
  if name != "llama_tied_mha":  # (the sampler's compiles are the slow part: two variants suffice)
    prompt = TOKENS[0, :6].tolist()
    assert _lmtiny_greedy(model, prompt, 10) == _hf_greedy(hf, prompt, 10)


@pytest.mark.parametrize("name", HF_VARIANTS)
def test_import_then_export_is_bitwise(imported, name, tmp_path):
  _, hf_dir, run = imported[name]
  assert export.main(["--workdir", run, "--out", str(tmp_path)]) == 0
  a, b = read_checkpoint(hf_dir), read_checkpoint(str(tmp_path))
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape and a[key].tobytes() == b[key].tobytes(), key
  src, dst = (json.load(open(os.path.join(d, "config.json"))) for d in (hf_dir, tmp_path))
  for field in ("hidden_size", "num_key_value_heads", "intermediate_size", "tie_word_embeddings", "model_type"):
    assert src[field] == dst[field], field


def test_bfloat16_checkpoint_round_trips_bitwise(tmp_path, tok):
  hf_dir, run, out = (str(tmp_path / d) for d in ("hf", "run", "out"))
  _hf_model("llama_untied_gqa", torch.bfloat16).save_pretrained(hf_dir)
  with open(os.path.join(hf_dir, "tokenizer.model"), "wb") as f:
    f.write(tok.model_proto)
  import_checkpoint(hf_dir, run)
  assert json.load(open(os.path.join(run, "hf_import.json")))["dtype"] == "bfloat16"
  assert export.main(["--workdir", run, "--out", out]) == 0  # dtype defaults to the source's
  a, b = read_checkpoint(hf_dir), read_checkpoint(out)
  assert {str(x.dtype) for x in b.values()} == {"bfloat16"}
  assert all(a[k].tobytes() == b[k].tobytes() for k in a) and sorted(a) == sorted(b)


def _lmtiny_run(tmp_path, tok, **model):
  """A train-free lmtiny run directory (random init with noisy norm scales) and its model."""
  cfg = base_config()
  cfg.model.update(vocab_size=512, num_layers=2, d_model=64, num_heads=4, activation="swiglu", max_seq_len=128,
                   dtype="float32", **model)
  params = nnx.state(Transformer(cfg.model, nnx.Rngs(1)), nnx.Param)
  params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape) if x.ndim == 1 else x, params)
  write_run(str(tmp_path / "run"), cfg, params, tok)
  run, params = load_weights(str(tmp_path / "run"))
  return run, run.model(params)


@pytest.mark.slow(seconds=8)
@pytest.mark.parametrize("model,arch", [
    (dict(num_kv_heads=2, tie_embeddings=False), "LlamaForCausalLM"),
    (dict(tie_embeddings=True), "LlamaForCausalLM"),
    (dict(num_kv_heads=2, qk_norm=True, norm_scale=False), "Qwen3ForCausalLM"),
    (dict(scan_layers=True, head_dim=32, num_kv_heads=1), "LlamaForCausalLM"),
], ids=["untied_gqa", "tied_mha", "qknorm_noscale", "scanned_mqa"])
def test_exported_lmtiny_model_loads_in_transformers_with_the_same_logits(tmp_path, tok, model, arch, capsys):
  run, ours_model = _lmtiny_run(tmp_path, tok, **model)
  out = str(tmp_path / "hf")
  assert export.main(["--workdir", run.workdir, "--out", out]) == 0
  assert arch in capsys.readouterr().out
  hf = AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(hf).__name__ == arch
  ours, theirs = _lmtiny_logits(ours_model, TOKENS), _hf_logits(hf, TOKENS)
  assert np.abs(ours - theirs).max() < 2e-5 * max(1.0, np.abs(ours).max())
  if model.get("num_kv_heads") == 2 and not model.get("qk_norm"):  # one variant through the sampler
    prompt = TOKENS[1, :5].tolist()
    assert _hf_greedy(hf, prompt, 10) == _lmtiny_greedy(ours_model, prompt, 10)


@pytest.mark.parametrize("field,value,message", [
    ("activation", "relu2", "model.activation='relu2'"),
    ("activation", "gelu", "model.activation='gelu'"),
    ("activation", "silu", "model.activation='silu'"),
    ("logit_softcap", 15.0, "model.logit_softcap=15.0"),
    ("embed_norm", True, "model.embed_norm=True"),
    ("qk_scale", 1.2, "model.qk_scale=1.2"),
    ("window_pattern", "SSSL", "model.window_pattern='SSSL'"),
    ("smear", True, "model.smear=True"),
])
def test_export_refuses_what_llama_cannot_express(field, value, message):
  m = base_config().model
  m.update(activation="swiglu")
  m[field] = value
  with pytest.raises(llama.InteropError, match=re.escape(message)):
    llama.export_architecture(m)


def test_export_cli_refusal_writes_nothing(tmp_path, tok, capsys):
  # (Architectures Llama cannot express export too, as NanoChat or lmtiny: test_architectures.py.)
  cfg = base_config()
  cfg.model.update(vocab_size=512, num_layers=1, d_model=32, num_heads=2, activation="relu2", max_seq_len=64)
  write_run(str(tmp_path / "run"), cfg, nnx.state(Transformer(cfg.model, nnx.Rngs(0)), nnx.Param), tok)
  assert export.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--dtype", "int8"]) == 2
  assert capsys.readouterr().err == "error: --dtype=int8: must be one of float32, bfloat16, float16\n"
  assert not os.path.exists(tmp_path / "out")


def test_cli_refusal_is_one_line_exit_2(imported, tmp_path):
  _, hf_dir, _ = imported["llama_untied_gqa"]
  bad = tmp_path / "bad"
  bad.mkdir()
  cfg = json.load(open(os.path.join(hf_dir, "config.json")))
  cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
  (bad / "config.json").write_text(json.dumps(cfg))
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-m", "lmtiny.import_hf", "--hf", str(bad), "--workdir", str(tmp_path / "r")],
                        capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1
  assert "rope type 'llama3'" in proc.stderr and "config.json" in proc.stderr


@pytest.mark.parametrize("change,message", [
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(model_type="gpt2"), "model_type='gpt2'"),
    (dict(num_key_value_heads=3), "num_key_value_heads=3: must divide num_attention_heads=4"),  # HF's names
])
def test_import_refuses_unsupported_configs(imported, tmp_path, capsys, change, message):
  _, hf_dir, _ = imported["llama_untied_gqa"]
  for name in ("model.safetensors", "tokenizer.model"):
    shutil.copyfile(os.path.join(hf_dir, name), tmp_path / name)
  cfg = dict(json.load(open(os.path.join(hf_dir, "config.json"))), **change)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  assert import_hf.main(["--hf", str(tmp_path), "--workdir", str(tmp_path / "r")]) == 2
  err = capsys.readouterr().err
  assert message in err and "model." not in err and err.count("\n") == 1
  assert not os.path.exists(tmp_path / "r")


def test_import_reports_a_missing_tensor(imported, tmp_path, capsys):
  _, hf_dir, _ = imported["llama_untied_gqa"]
  from lmtiny.interop.safetensors_io import write_file
  tensors = read_checkpoint(hf_dir)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  write_file(str(tmp_path / "model.safetensors"), tensors)
  (tmp_path / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
  (tmp_path / "tokenizer.model").write_bytes(open(os.path.join(hf_dir, "tokenizer.model"), "rb").read())
  assert import_hf.main(["--hf", str(tmp_path), "--workdir", str(tmp_path / "r")]) == 2
  assert "model.layers.1.mlp.up_proj.weight is missing" in capsys.readouterr().err


def _snapshot(directory):
  """{relative path: bytes} of every file under `directory`."""
  return {os.path.relpath(os.path.join(d, name), directory): open(os.path.join(d, name), "rb").read()
          for d, _, names in os.walk(directory) for name in names}


EXPORT_FILES = ["config.json", "generation_config.json", "lmtiny_export.json", "model.safetensors",
                "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]


def test_export_refuses_the_run_itself_other_runs_and_directories_it_did_not_write(imported, tmp_path, capsys):
  # Before: a non-empty --out with a Hugging Face config.json (a downloaded model, the directory a run
  # was imported from) was deleted and replaced, exit 0.
  _, hf_dir, run = imported["llama_untied_gqa"]
  _, _, other = imported["llama_tied_mha"]
  downloaded = tmp_path / "downloaded"
  shutil.copytree(hf_dir, downloaded)
  (downloaded / "notes.txt").write_text("mine")
  notes = tmp_path / "notes"
  notes.mkdir()
  (notes / "todo.txt").write_text("mine")
  kept = {path: _snapshot(path) for path in (run, other, hf_dir, str(downloaded), str(notes))}
  not_export = "not empty and not an earlier lmtiny export (no lmtiny_export.json), so not replaced"
  for out, message in ((str(downloaded), not_export), (hf_dir, not_export), (str(notes), not_export),
                       (run, "is (or holds) the run directory"), (os.path.dirname(run), "is (or holds) the run"),
                       (other, "holds an lmtiny run (checkpoints/)")):
    assert export.main(["--workdir", run, "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out={out}: ") and message in err and err.count("\n") == 1, err
  assert {path: _snapshot(path) for path in kept} == kept  # nothing touched
  assert load_run(other).cfg.model.tie_embeddings


def test_export_replaces_an_earlier_export_whole(imported, tmp_path):
  _, hf_dir, run = imported["llama_untied_gqa"]
  _, _, tied = imported["llama_tied_mha"]
  out = tmp_path / "hf"
  assert export.main(["--workdir", tied, "--out", str(out)]) == 0
  assert json.load(open(out / "lmtiny_export.json"))["source"] == tied
  assert "lmtiny_export.json" in json.load(open(out / "lmtiny_export.json"))["files"]
  (out / "MY_NOTES.txt").write_text("mine")  # a file the export did not write: never deleted
  assert export.main(["--workdir", run, "--out", str(out)]) == 2
  assert (out / "MY_NOTES.txt").read_text() == "mine" and json.load(open(out / "lmtiny_export.json"))["source"] == tied
  os.remove(out / "MY_NOTES.txt")
  assert export.main(["--workdir", run, "--out", str(out)]) == 0
  assert sorted(os.listdir(out)) == EXPORT_FILES  # no stale file survives
  a, b = read_checkpoint(hf_dir), read_checkpoint(str(out))
  assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
  assert "max_length" not in json.load(open(out / "generation_config.json"))  # max_new_tokens alone decides
  record = json.load(open(out / "lmtiny_export.json"))
  assert {k: record[k] for k in ("source", "step", "dtype", "architecture")} == {
      "source": run, "step": 0, "dtype": "float32", "architecture": "LlamaForCausalLM"}
  assert os.listdir(tmp_path) == ["hf"]  # no temporary sibling left


def test_export_onto_a_read_only_location_is_one_line_up_front(imported, tmp_path, capsys, monkeypatch):
  # Before: the weights were read and converted first, then the write failed with a traceback.
  _, _, run = imported["llama_untied_gqa"]
  monkeypatch.setattr("lmtiny.runs.directory.load_weights", lambda *a, **k: pytest.fail("read the weights first"))
  ro = ReadOnly(tmp_path)
  try:
    why = ro.freeze()
    assert export.main(["--workdir", run, "--out", str(ro.root / "hf")]) == 2
    assert os.listdir(ro.root) == []
  finally:
    ro.release()
  assert capsys.readouterr().err == f"error: --out={ro.root / 'hf'}: cannot write to {ro.root} ({why})\n"


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(imported, tmp_path, capsys, monkeypatch):
  # Before: a traceback (nothing was lost: the temporary directory was removed).
  _, _, run = imported["llama_untied_gqa"]
  full = tmp_path / "full"
  full.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)],  # the export is ~0.7 MB
                           capture_output=True).returncode == 0
  if not mounted:
    def no_space(*args, **kwargs):
      raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("lmtiny.interop.convert.write_file", no_space)
  try:
    assert export.main(["--workdir", run, "--out", str(full / "hf")]) == 1
    assert os.listdir(full) == []  # no half-written directory, no temporary sibling
  finally:
    if mounted:
      subprocess.run(["umount", "-l", str(full)], check=True)
  assert capsys.readouterr().err == (f"error: --out={full / 'hf'}: disk full (No space left on device) while "
                                     "writing the export; nothing was written (an earlier export there is as it was)\n")


def test_interrupted_export_leaves_the_earlier_export_intact(imported, tmp_path, monkeypatch):
  _, _, run = imported["llama_untied_gqa"]
  _, _, tied = imported["llama_tied_mha"]
  out = str(tmp_path / "hf")
  assert export.main(["--workdir", tied, "--out", out]) == 0
  before = _snapshot(out)

  def interrupted(*args):
    raise KeyboardInterrupt
  monkeypatch.setattr("lmtiny.tokenizer.huggingface.write_tokenizer", interrupted)  # after the weights
  with pytest.raises(KeyboardInterrupt):
    export.main(["--workdir", run, "--out", out])
  assert _snapshot(out) == before and os.listdir(tmp_path) == ["hf"]


def test_interrupted_import_leaves_nothing_and_can_be_rerun(imported, tmp_path, monkeypatch):
  _, hf_dir, _ = imported["llama_untied_gqa"]
  run = str(tmp_path / "run")

  def interrupted(*args):
    raise KeyboardInterrupt
  monkeypatch.setattr("lmtiny.tokenizer.huggingface.save_run_tokenizer", interrupted)  # after the checkpoint
  with pytest.raises(KeyboardInterrupt):
    import_checkpoint(hf_dir, run)
  assert os.listdir(tmp_path) == []
  monkeypatch.undo()
  import_checkpoint(hf_dir, run)
  assert sorted(os.listdir(run)) == ["checkpoints", "config.json", "hf_import.json", "run_kind.json", "tokenizer.model"]
  assert json.load(open(os.path.join(run, "run_kind.json")))["kind"] == "import"  # no training verb writes into it
  assert load_run(run).step == 0
  with pytest.raises(RunError, match=rf"^--workdir={run}: already holds a run"):
    import_checkpoint(hf_dir, run)
