"""Which Hugging Face architecture carries each lmtiny model (lmtiny.interop.architectures), on a core
install (no torch): every shipped config exports to the class its architecture needs, its
config.json imports back to the same model fields and exports to the same config.json, and an
"lmtiny" or NanoChat config.json that lmtiny's model cannot hold is refused with one line naming
the field. Against transformers itself: tests/interop/test_architectures.py."""
import json
import re

import pytest

from arch_fixtures import EXPECTED, shipped_architectures
from lm_fixtures import load_config_module
from lmtiny import config as config_lib, import_hf
from lmtiny.config import base_config
from lmtiny.interop import architectures
from lmtiny.interop.convert import validated_model_config
from lmtiny.interop.tensors import InteropError

GROUPS = shipped_architectures()
SHIPPED = {name: EXPECTED[head] for head, names in GROUPS.items() for name in names}


def _hf_config(m) -> dict:
  arch = architectures.export_architecture(m)
  return architectures.hf_config(arch, m, dtype="float32", bos_id=1, eos_ids=[5, 1], pad_id=0)


def test_every_shipped_architecture_is_tested_against_transformers():
  assert sorted(GROUPS) == sorted(EXPECTED), GROUPS


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_shipped_config_exports_to_its_class_and_imports_back_to_the_same_model(name):
  m = load_config_module(name).get_config().model
  hf = _hf_config(m)
  assert hf["architectures"] == [SHIPPED[name]]
  assert ("auto_map" in hf) == (SHIPPED[name] == "LmtinyForCausalLM")
  model_type, fields, _ = architectures.import_fields(json.loads(json.dumps(hf)), "config.json")
  assert model_type == hf["model_type"]
  back = validated_model_config(fields, "config.json").model
  same = ("vocab_size", "num_layers", "d_model", "num_heads", "activation", "tie_embeddings", "qk_norm",
          "embed_norm", "logit_softcap", "rope_theta", "norm_eps", "max_seq_len", "residual_scalars", "smear",
          "backout", "qk_scale", "value_embeds")
  assert {f: back[f] for f in same} == {f: m[f] for f in same}
  for derived in (config_lib.head_dim, config_lib.num_kv_heads, config_lib.mlp_dim, config_lib.layer_windows):
    assert derived(back) == derived(m), derived.__name__
  assert back.norm_scale == (m.norm_scale or hf["model_type"] in ("llama", "qwen3"))  # Llama: scales of ones
  assert _hf_config(back) == hf


@pytest.mark.parametrize("model,arch", [
    (dict(activation="swiglu"), "llama"),
    (dict(activation="swiglu", qk_norm=True, norm_scale=False), "qwen3"),
    (dict(activation="swiglu", smear=True), "lmtiny"),          # nanochat 2026 features: no transformers class
    (dict(activation="swiglu", logit_softcap=15.0), "lmtiny"),  # NanoChat's MLP is not gated
    (dict(activation="gelu", qk_norm=True, norm_scale=False, embed_norm=True), "nanochat"),
    (dict(activation="relu2", qk_norm=True, norm_scale=False, embed_norm=True, qk_scale=1.2), "lmtiny"),
    (dict(activation="relu2", qk_norm=True, norm_scale=True, embed_norm=True), "lmtiny"),  # learned norms
    (dict(activation="relu2", qk_norm=False, norm_scale=False, embed_norm=True), "lmtiny"),
])
def test_export_picks_the_first_architecture_that_computes_the_model(model, arch):
  m = base_config().model
  m.update(**model)
  assert architectures.export_architecture(m) == arch


def _remote_config(**model) -> dict:
  cfg = load_config_module("tiny_2026").get_config()
  cfg.model.update(**model)
  return _hf_config(cfg.model)


@pytest.mark.parametrize("change,message", [
    (dict(attention_windows=[128, 64, 128, 0]), "attention_windows=[128, 64, 128, 0]: lmtiny has one short window"),
    (dict(attention_windows=[128, 128, 128, 128]), "attention_windows=[128, 128, 128, 128]: lmtiny has one short window"),
    (dict(value_embed_layers=[0, 1]), "value_embed_layers=[0, 1]: lmtiny's model has [1, 3] here"),
    (dict(backout_layer=1), "backout_layer=1: lmtiny's model has 2 here"),
    (dict(smear_channels=16), "smear_channels=16: lmtiny's model has 24 here"),
    (dict(hidden_act="gelu"), "hidden_act='gelu': lmtiny's MLP here is one of relu2, gelu_pytorch_tanh, silu, swiglu"),
    (dict(qk_scale=None), "field 'qk_scale' missing"),
    (dict(attention_windows=64), "attention_windows=64: must be a list of integers >= 0, one per layer"),
])
def test_import_refuses_an_lmtiny_config_its_model_cannot_hold(change, message):
  hf = dict(_remote_config(), **change)
  hf = {k: v for k, v in hf.items() if v is not None}
  with pytest.raises(InteropError, match="^" + re.escape(f"config.json: {message}")):
    architectures.import_fields(hf, "config.json")


def test_a_nanochat_config_without_softcap_or_activation_gets_transformers_defaults():
  hf = _hf_config(load_config_module("d12").get_config().model)
  del hf["final_logit_softcapping"], hf["hidden_act"]  # NanoChatConfig: 15.0 and relu2
  _, fields, _ = architectures.import_fields(hf, "config.json")
  assert (fields["logit_softcap"], fields["activation"]) == (15.0, "relu2")
  _, fields, _ = architectures.import_fields(dict(hf, final_logit_softcapping=None), "config.json")
  assert fields["logit_softcap"] == 0.0


def test_import_refuses_a_nanochat_activation_with_one_line_and_exit_2(tmp_path, capsys):
  hf = _hf_config(load_config_module("d12").get_config().model)
  (tmp_path / "config.json").write_text(json.dumps(dict(hf, hidden_act="gelu")))  # exact GELU: lmtiny's is tanh
  assert import_hf.main(["--hf", str(tmp_path), "--workdir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert err == (f"error: {tmp_path / 'config.json'}: hidden_act='gelu': lmtiny's MLP here is one of relu2, "
                 "gelu_pytorch_tanh, silu\n")
  assert not (tmp_path / "run").exists()
