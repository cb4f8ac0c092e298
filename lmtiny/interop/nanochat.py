"""lmtiny's Transformer <-> transformers' NanoChat (`NanoChatForCausalLM`), and <-> the modeling
file shipped in an export for what no transformers class expresses (model_type "lmtiny",
lmtiny/interop/remote, loaded with trust_remote_code).

NanoChat computes lmtiny's function exactly when the config is nanochat's original GPT (configs/d12
... d32): a plain MLP (relu2, or gelu (tanh) / silu as HF's hidden_act), parameter-free RMSNorm
(after the embedding, before attention and MLP, at the end), QK-norm without a scale, RoPE rotating
the first half of each head against the second at theta^(-2i/Dh), scores / sqrt(Dh), GQA, no biases,
tied or untied embeddings, an optional logit softcap (final_logit_softcapping). Two differences
in form only: NanoChat's RoPE rotates the other way (nanochat's convention), so q's and k's
weights go over with the second half of each head negated (NANOCHAT_LAYER_TENSORS); and it norms
q and k after RoPE, lmtiny before: a rotation keeps a head's RMS, so without a learned scale the
two are the same function (they differ by float rounding only).

Everything else lmtiny trains goes to "lmtiny": learned norm scales, no QK-norm or no embedding norm
(configs/tiny.py, the 38M designs), a q/k scale, sliding windows, value embeddings, residual scalars,
smear and backout (configs/*_2026.py), SwiGLU with any of those. Its config.json holds every field
the modeling file needs (its docstring describes them) and its tensors follow NanoChat's
names, plus the norms' weights, the value embeddings and the scalars (REMOTE_*).
"""
from __future__ import annotations

import ml_collections

from lmtiny import config as config_lib
from lmtiny.interop.llama import unexpressed_2026_feature
from lmtiny.interop.tensors import InteropError

NANOCHAT = "NanoChatForCausalLM"
REMOTE = "LmtinyForCausalLM"
REMOTE_FILES = ("modeling_lmtiny.py",)  # in lmtiny/interop/remote, copied as is
AUTO_MAP = {"AutoConfig": "modeling_lmtiny.LmtinyConfig", "AutoModelForCausalLM": "modeling_lmtiny.LmtinyForCausalLM"}
# lmtiny activation <-> HF hidden_act (lmtiny's gelu is the tanh approximation)
HIDDEN_ACTS = {"relu2": "relu2", "gelu": "gelu_pytorch_tanh", "silu": "silu", "swiglu": "swiglu"}

LAYER_TENSORS = {
    ("attn", "q"): ("self_attn.q_proj.weight", "heads_in"),
    ("attn", "k"): ("self_attn.k_proj.weight", "heads_in"),
    ("attn", "v"): ("self_attn.v_proj.weight", "heads_in"),
    ("attn", "o"): ("self_attn.o_proj.weight", "heads_out"),
    ("mlp", "up"): ("mlp.fc1.weight", "matrix"),
    ("mlp", "down"): ("mlp.fc2.weight", "matrix"),
    # "lmtiny" only:
    ("mlp", "gate"): ("mlp.gate_proj.weight", "matrix"),
    ("attn_norm", "scale"): ("input_layernorm.weight", "vector"),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", "vector"),
    ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", "vector"),
    ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", "vector"),
    ("attn", "value_embed"): ("self_attn.value_embed.weight", "vocab_rows"),
    ("attn", "ve_gate"): ("self_attn.ve_gate.weight", "matrix"),
}
TOP_TENSORS = {
    ("embed",): ("model.embed_tokens.weight", "vocab_rows"),
    ("lm_head",): ("lm_head.weight", "vocab_matrix"),
    # "lmtiny" only:
    ("final_norm", "scale"): ("model.norm.weight", "vector"),
    ("embed_norm", "scale"): ("model.embed_norm.weight", "vector"),
    ("resid_lambdas",): ("model.resid_lambdas", "vector"),
    ("x0_lambdas",): ("model.x0_lambdas", "vector"),
    ("smear_gate",): ("model.smear_gate.weight", "matrix"),
    ("smear_lambda",): ("model.smear_lambda", "vector"),
    ("backout_lambda",): ("model.backout_lambda", "vector"),
}


# NanoChat's RoPE turns each (first half, second half) pair the other way (its rotate_half is
# cat(x2, -x1)): q and k go over with their heads' second halves negated, which leaves q.k as it
# was and, the norm having no weight, the QK-norm too.
NANOCHAT_LAYER_TENSORS = {**LAYER_TENSORS, ("attn", "q"): ("self_attn.q_proj.weight", "heads_in_flip"),
                          ("attn", "k"): ("self_attn.k_proj.weight", "heads_in_flip")}


def remote_tensor_name(path: tuple) -> tuple[str, str]:
  """(HF name, layout) of an lmtiny parameter path (layers unstacked) in an "lmtiny" export."""
  return _tensor_name(path, LAYER_TENSORS)


def nanochat_tensor_name(path: tuple) -> tuple[str, str]:
  """The same for NanoChat (which has only the tensors of nanochat's original GPT)."""
  return _tensor_name(path, NANOCHAT_LAYER_TENSORS)


def _tensor_name(path: tuple, layer_tensors: dict) -> tuple[str, str]:
  if path[0] == "layers":
    name, layout = layer_tensors[path[2:]]
    return f"model.layers.{path[1]}.{name}", layout
  return TOP_TENSORS[path]


# ---------------------------------------------------------------------------------------------
# Export.


def nanochat_unexpressed(m) -> str | None:
  """Why transformers' NanoChat cannot compute an lmtiny model config's function, or None."""
  if m.activation == "swiglu":
    return "model.activation='swiglu': NanoChat's MLP is not gated"
  if m.norm_scale:
    return "model.norm_scale=True: NanoChat's RMSNorms have no weight"
  if not m.qk_norm:
    return "model.qk_norm=False: NanoChat always norms q and k"
  if not m.embed_norm:
    return "model.embed_norm=False: NanoChat always norms the embedding"
  if m.qk_scale != 1.0:
    return f"model.qk_scale={m.qk_scale}: NanoChat does not scale q and k"
  return unexpressed_2026_feature(m, "NanoChat")


def _common_config(m, *, dtype: str, bos_id: int, eos_ids: list[int], pad_id: int) -> dict:
  theta = float(m.rope_theta)
  return {
      "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": config_lib.mlp_dim(m),
      "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
      "num_key_value_heads": config_lib.num_kv_heads(m), "head_dim": config_lib.head_dim(m),
      "hidden_act": HIDDEN_ACTS[m.activation], "max_position_embeddings": m.max_seq_len,
      "rms_norm_eps": float(m.norm_eps), "rope_theta": theta,
      "final_logit_softcapping": float(m.logit_softcap) if m.logit_softcap else None,
      "tie_word_embeddings": bool(m.tie_embeddings), "bos_token_id": bos_id, "eos_token_id": eos_ids,
      "pad_token_id": pad_id, "initializer_range": float(m.init_std), "use_cache": True,
      "torch_dtype": dtype, "dtype": dtype,
  }


def nanochat_config(m, *, dtype: str, bos_id: int, eos_ids: list[int], pad_id: int) -> dict:
  """config.json for transformers' NanoChatForCausalLM."""
  return dict(_common_config(m, dtype=dtype, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id), architectures=[NANOCHAT],
              model_type="nanochat", rope_parameters={"rope_type": "default", "rope_theta": float(m.rope_theta)},
              attention_bias=False, attention_dropout=0.0)


def remote_config(m, *, dtype: str, bos_id: int, eos_ids: list[int], pad_id: int) -> dict:
  """config.json for the shipped modeling file (lmtiny/interop/remote/modeling_lmtiny.py)."""
  return dict(_common_config(m, dtype=dtype, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id), architectures=[REMOTE],
              model_type="lmtiny", auto_map=AUTO_MAP, norm_scale=bool(m.norm_scale), qk_norm=bool(m.qk_norm),
              qk_scale=float(m.qk_scale), embed_norm=bool(m.embed_norm),
              attention_windows=list(config_lib.layer_windows(m)),
              value_embed_layers=config_lib.value_embed_layers(m),
              ve_gate_channels=config_lib.VE_GATE_CHANNELS, residual_scalars=bool(m.residual_scalars),
              smear=bool(m.smear), smear_channels=config_lib.SMEAR_CHANNELS,
              backout_layer=m.num_layers // 2 if m.backout else None)


# ---------------------------------------------------------------------------------------------
# Import.


def _require(hf: dict, field: str, where: str):
  if field not in hf:
    raise InteropError(f"{where}: field {field!r} missing")
  return hf[field]


def _activation(hf: dict, where: str, allowed) -> str:
  act = _require(hf, "hidden_act", where)
  by_hf = {v: k for k, v in HIDDEN_ACTS.items() if k in allowed}
  if act not in by_hf:
    raise InteropError(f"{where}: hidden_act={act!r}: lmtiny's MLP here is one of {', '.join(by_hf)}")
  return by_hf[act]


# transformers' NanoChatConfig defaults for the fields a NanoChat config.json may leave out
NANOCHAT_DEFAULTS = {"hidden_act": "relu2", "final_logit_softcapping": 15.0}


def nanochat_fields(hf: dict, where: str) -> dict:
  """lmtiny `model` fields (beyond Llama's shape fields) of a NanoChat config.json."""
  hf = {**NANOCHAT_DEFAULTS, **hf}
  if hf.get("attention_bias"):
    raise InteropError(f"{where}: attention_bias={hf['attention_bias']!r}: lmtiny's projections have no biases")
  cap = hf.get("final_logit_softcapping")
  return dict(activation=_activation(hf, where, ("relu2", "gelu", "silu")), qk_norm=True, norm_scale=False,
              embed_norm=True, logit_softcap=float(cap or 0.0))


def remote_fields(hf: dict, where: str) -> dict:
  """lmtiny `model` fields (beyond Llama's shape fields) of an "lmtiny" config.json; what lmtiny's
  model cannot hold (windows other than one short window on the S layers and a full last layer,
  value embeddings or backout elsewhere than lmtiny puts them, other gate widths) is refused."""
  layers = int(_require(hf, "num_hidden_layers", where))
  windows = _require(hf, "attention_windows", where)
  if not (isinstance(windows, list) and all(isinstance(w, int) and not isinstance(w, bool) and w >= 0
                                            for w in windows)):
    raise InteropError(f"{where}: attention_windows={windows!r}: must be a list of integers >= 0, one per layer")
  short = sorted(set(windows) - {0})
  if len(windows) != layers or len(short) > 1 or (short and windows[-1]):
    raise InteropError(f"{where}: attention_windows={windows}: lmtiny has one short window, full on the "
                       f"last layer, for each of {layers} layers")
  cap = _require(hf, "final_logit_softcapping", where)
  fields = dict(activation=_activation(hf, where, config_lib.ACTIVATIONS),
                norm_scale=bool(_require(hf, "norm_scale", where)), qk_norm=bool(_require(hf, "qk_norm", where)),
                qk_scale=float(_require(hf, "qk_scale", where)), embed_norm=bool(_require(hf, "embed_norm", where)),
                logit_softcap=float(cap or 0.0), residual_scalars=bool(_require(hf, "residual_scalars", where)),
                smear=bool(_require(hf, "smear", where)),
                backout=_require(hf, "backout_layer", where) is not None,
                value_embeds=bool(_require(hf, "value_embed_layers", where)),
                window_pattern="".join("S" if w else "L" for w in windows) if short else "",
                short_window=short[0] if short else 0)
  placed = ml_collections.ConfigDict(dict(num_layers=layers, value_embeds=fields["value_embeds"]))
  expected = {"value_embed_layers": config_lib.value_embed_layers(placed),
              "backout_layer": layers // 2 if fields["backout"] else None,
              "ve_gate_channels": config_lib.VE_GATE_CHANNELS, "smear_channels": config_lib.SMEAR_CHANNELS}
  for field, value in expected.items():
    if _require(hf, field, where) != value:
      raise InteropError(f"{where}: {field}={hf[field]!r}: lmtiny's model has {value!r} here")
  return fields
