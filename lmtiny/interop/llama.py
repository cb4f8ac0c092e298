"""lmtiny's Transformer <-> the Hugging Face Llama (and Qwen3) checkpoint layout.

The two models compute the same function when lmtiny's config is Llama's: SwiGLU MLP
(down(silu(gate(x)) * up(x))), RMSNorm with a learned scale before attention and MLP and at the
end, RoPE rotating the first half of each head against the second (HF's `rotate_half`, same
frequencies theta^(-2i/Dh)), GQA, no biases, tied or untied embeddings. Qwen3 is Llama plus an
RMSNorm on each query and key head before RoPE: lmtiny's `qk_norm`. Parameter-free RMSNorm
(`norm_scale=False`) is exported as a scale of ones, which computes the identical function.

What neither expresses (`unexpressed` names the field: relu2 / gelu / non-gated silu MLPs, a
logit softcap, an embedding norm, a q/k scale, nanochat 2026's windows, value embeddings,
residual scalars, smear and backout) goes to lmtiny.interop.nanochat instead. Weight layouts:
lmtiny.interop.tensors.
"""
from __future__ import annotations

import math

import numpy as np

from lmtiny import config as config_lib
from lmtiny.interop import tensors
from lmtiny.interop.tensors import InteropError

DEFAULT_NORM_EPS = 1e-6  # lmtiny's default model.norm_eps (HF configs without rms_norm_eps get it)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# lmtiny path inside a block -> (HF name inside `model.layers.{i}.`, layout: lmtiny.interop.tensors)
LAYER_TENSORS = {
    ("attn", "q"): ("self_attn.q_proj.weight", "heads_in"),
    ("attn", "k"): ("self_attn.k_proj.weight", "heads_in"),
    ("attn", "v"): ("self_attn.v_proj.weight", "heads_in"),
    ("attn", "o"): ("self_attn.o_proj.weight", "heads_out"),
    ("mlp", "gate"): ("mlp.gate_proj.weight", "matrix"),
    ("mlp", "up"): ("mlp.up_proj.weight", "matrix"),
    ("mlp", "down"): ("mlp.down_proj.weight", "matrix"),
    ("attn_norm", "scale"): ("input_layernorm.weight", "vector"),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", "vector"),
    ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", "vector"),
    ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", "vector"),
}
TOP_TENSORS = {
    ("embed",): ("model.embed_tokens.weight", "vocab_rows"),  # [V, D] in both
    ("lm_head",): ("lm_head.weight", "vocab_matrix"),
    ("final_norm", "scale"): ("model.norm.weight", "vector"),
}
IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry


def tensor_name(path: tuple) -> tuple[str, str]:
  """(HF name, layout) of an lmtiny parameter path (layers unstacked)."""
  if path[0] == "layers":
    name, layout = LAYER_TENSORS[path[2:]]
    return f"model.layers.{path[1]}.{name}", layout
  return TOP_TENSORS[path]


# ---------------------------------------------------------------------------------------------
# Configs.


# nanochat 2026's per-layer features, which no transformers class has
NANOCHAT_2026_FIELDS = ("window_pattern", "value_embeds", "residual_scalars", "smear", "backout")


def unexpressed_2026_feature(m, architecture: str) -> str | None:
  """Why `architecture` cannot hold the first 2026 per-layer feature the model config turns on, or None."""
  for field in NANOCHAT_2026_FIELDS:
    if m[field]:
      return f"model.{field}={m[field]!r}: {architecture} has no {field.replace('_', ' ')}"
  return None


def unexpressed(m) -> str | None:
  """Why Llama / Qwen3 cannot compute an lmtiny model config's function (naming the field), or None."""
  if m.activation != "swiglu":
    return f"model.activation={m.activation!r}: Llama's MLP is SwiGLU only (silu(gate) * up)"
  if m.logit_softcap:
    return f"model.logit_softcap={m.logit_softcap}: Llama has no logit softcap"
  if m.embed_norm:
    return "model.embed_norm=True: Llama has no norm after the token embedding"
  if m.qk_scale != 1.0:
    return f"model.qk_scale={m.qk_scale}: Qwen3 does not scale q and k after their norm"
  return unexpressed_2026_feature(m, "Llama")


def export_architecture(m) -> str:
  """"llama" or "qwen3" for an lmtiny model config; InteropError naming what they cannot express."""
  why = unexpressed(m)
  if why:
    raise InteropError(why)
  return "qwen3" if m.qk_norm else "llama"


def hf_config(m, *, dtype: str, bos_id: int, eos_ids: list[int], pad_id: int) -> dict:
  """config.json for transformers (both the v4 and v5 spellings of rope and dtype)."""
  arch = export_architecture(m)
  cfg = {
      "architectures": [ARCHITECTURES[arch]], "model_type": arch,
      "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": config_lib.mlp_dim(m),
      "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
      "num_key_value_heads": config_lib.num_kv_heads(m), "head_dim": config_lib.head_dim(m),
      "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
      "rms_norm_eps": float(m.norm_eps),
      "rope_theta": float(m.rope_theta), "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rope_theta)},
      "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
      "tie_word_embeddings": bool(m.tie_embeddings), "bos_token_id": bos_id, "eos_token_id": eos_ids,
      "pad_token_id": pad_id, "initializer_range": float(m.init_std), "use_cache": True,
      "torch_dtype": dtype, "dtype": dtype,
  }
  if arch == "qwen3":
    cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.num_layers)
  return cfg


def _rope(hf: dict) -> tuple[float, str]:
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  kinds = {params.get("rope_type"), scaling.get("rope_type"), scaling.get("type")} - {None, "default"}
  return float(theta), (sorted(kinds) or ["default"])[0]


def model_fields(hf: dict, where: str) -> dict:
  """lmtiny `model` fields for a Llama / Qwen3 config.json (what lmtiny cannot represent is refused)."""
  arch = hf.get("model_type")
  if arch not in ARCHITECTURES:
    raise InteropError(f"{where}: model_type={arch!r}; lmtiny imports {', '.join(ARCHITECTURES)}")
  _need(hf, hf.get("hidden_act", "silu") == "silu", "hidden_act", "lmtiny's SwiGLU MLP uses silu", where)
  _need(hf, not hf.get("mlp_bias", False), "mlp_bias", "lmtiny's MLP has no biases", where)
  _need(hf, not hf.get("use_sliding_window", False), "use_sliding_window", "lmtiny attends to the whole context",
        where)
  return dict(shape_fields(hf, where), activation="swiglu", qk_norm=arch == "qwen3", norm_scale=True,
              logit_softcap=0.0)


def _need(hf: dict, ok: bool, field: str, why: str, where: str) -> None:
  if not ok:
    raise InteropError(f"{where}: {field}={hf.get(field)!r}: {why}")


def shape_fields(hf: dict, where: str) -> dict:
  """The lmtiny `model` fields every supported config.json spells alike: vocabulary, depth, width,
  heads, MLP width, RoPE theta (plain RoPE only), context, norm eps, tied embeddings; no biases."""
  if not isinstance(hf, dict):
    raise InteropError(f"{where}: a JSON {type(hf).__name__}, not an object of config fields")
  _need(hf, not hf.get("attention_bias", False), "attention_bias", "lmtiny's projections have no biases", where)
  theta, kind = _rope(hf)
  if kind != "default":
    raise InteropError(f"{where}: rope type {kind!r}: lmtiny implements plain RoPE only (no scaling)")
  for field in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
    if field not in hf:
      raise InteropError(f"{where}: field {field!r} missing")
    _need(hf, _is_positive_int(hf[field]), field, "must be an integer > 0", where)
  for field in ("head_dim", "num_key_value_heads", "max_position_embeddings"):
    _need(hf, hf.get(field) is None or _is_positive_int(hf[field]), field, "must be an integer > 0 (or absent)", where)
  try:
    d, h = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    fields = dict(vocab_size=int(hf["vocab_size"]), num_layers=int(hf["num_hidden_layers"]), d_model=d,
                  num_heads=h, head_dim=int(hf.get("head_dim") or d // h),
                  num_kv_heads=int(hf.get("num_key_value_heads") or h), mlp_dim=int(hf["intermediate_size"]),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=theta,
                  max_seq_len=int(hf.get("max_position_embeddings", 2048)))
  except (KeyError, TypeError, ValueError) as e:
    raise InteropError(f"{where}: missing or bad field {e}") from None
  if fields["head_dim"] == d // h and d % h == 0:
    fields["head_dim"] = 0
  fields["norm_eps"] = float(hf.get("rms_norm_eps", DEFAULT_NORM_EPS))
  return fields


def _is_positive_int(value) -> bool:
  """An integer > 0 as JSON writes one (5, or 5.0 from some exporters), not a bool."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
          and value == int(value))


# ---------------------------------------------------------------------------------------------
# Tensors. `flat` maps lmtiny parameter paths (as nnx flat_state gives them) to NumPy arrays.


def to_hf_tensors(flat: dict, m) -> dict[str, np.ndarray]:
  """HF tensors (float32) of an lmtiny model's parameters (per-layer paths); parameter-free norms
  become scales of ones."""
  out = tensors.export_tensors(flat, tensor_name, m.vocab_size)
  if not m.norm_scale:
    ones = lambda n: np.ones((n,), np.float32)
    out["model.norm.weight"] = ones(m.d_model)
    for i in range(m.num_layers):
      for key in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{i}.{key}.weight"] = ones(m.d_model)
      if m.qk_norm:
        for key in ("q_norm", "k_norm"):
          out[f"model.layers.{i}.self_attn.{key}.weight"] = ones(config_lib.head_dim(m))
  return out
