"""lmtiny's Transformer <-> the Hugging Face Llama (and Qwen3) checkpoint layout.

The two models compute the same function when lmtiny's config is Llama's: SwiGLU MLP
(down(silu(gate(x)) * up(x))), RMSNorm with a learned scale before attention and MLP and at the
end, RoPE rotating the first half of each head against the second (HF's `rotate_half`, same
frequencies theta^(-2i/Dh)), GQA, no biases, tied or untied embeddings. Qwen3 is Llama plus an
RMSNorm on each query and key head before RoPE: lmtiny's `qk_norm`. Parameter-free RMSNorm
(`norm_scale=False`) is exported as a scale of ones, which computes the identical function.

What neither expresses is refused, naming the field: relu2 / gelu / non-gated silu MLPs, a logit
softcap, an embedding norm. Weight layouts: HF keeps [out, in] matrices; lmtiny keeps [in, out]
with heads unflattened (q [D, H, Dh], o [H, Dh, D]); each conversion is a transpose and a
reshape, so a round trip is bitwise.
"""
from __future__ import annotations

import math

import numpy as np

from lmtiny import config as config_lib
from lmtiny.errors import UserError

DEFAULT_NORM_EPS = 1e-6  # lmtiny's default model.norm_eps (HF configs without rms_norm_eps get it)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# lmtiny path inside a block -> (HF name inside `model.layers.{i}.`, layout)
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
    ("embed",): ("model.embed_tokens.weight", "vector"),  # [V, D] in both
    ("lm_head",): ("lm_head.weight", "matrix"),
    ("final_norm", "scale"): ("model.norm.weight", "vector"),
}
IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry


class InteropError(UserError):
  """A model or checkpoint that cannot be converted; the message names the field or file."""


def _to_hf(layout: str, x: np.ndarray) -> np.ndarray:
  if layout == "vector":
    return x
  if layout == "heads_in":   # [D, N, Dh] -> [N*Dh, D]
    return x.reshape(x.shape[0], -1).T
  if layout == "heads_out":  # [H, Dh, D] -> [D, H*Dh]
    return x.reshape(-1, x.shape[-1]).T
  return x.T                 # [in, out] -> [out, in]


def _hf_shape(layout: str, shape) -> tuple:
  n = int(np.prod(shape))
  if layout == "vector":
    return tuple(shape)
  if layout == "heads_out":
    return (shape[-1], n // shape[-1])
  return (n // shape[0], shape[0])


def _from_hf(layout: str, y: np.ndarray, shape) -> np.ndarray:
  if layout == "vector":
    return y.reshape(shape)
  return y.T.reshape(shape)


# ---------------------------------------------------------------------------------------------
# Configs.


def export_architecture(m) -> str:
  """"llama" or "qwen3" for an lmtiny model config; InteropError naming what HF cannot express."""
  if m.activation != "swiglu":
    raise InteropError(f"model.activation={m.activation!r}: Llama's MLP is SwiGLU only (silu(gate) * up); "
                       "train with model.activation='swiglu' to export")
  if m.logit_softcap:
    raise InteropError(f"model.logit_softcap={m.logit_softcap}: Llama has no logit softcap")
  if m.embed_norm:
    raise InteropError("model.embed_norm=True: Llama has no norm after the token embedding")
  return "qwen3" if m.qk_norm else "llama"


def hf_config(m, *, dtype: str, bos_id: int, eos_ids: list[int]) -> dict:
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
      "pad_token_id": None, "initializer_range": float(m.init_std), "use_cache": True,
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
  """lmtiny `model` fields for an HF config.json (what lmtiny cannot represent is refused)."""
  if not isinstance(hf, dict):
    raise InteropError(f"{where}: a JSON {type(hf).__name__}, not an object of config fields")
  arch = hf.get("model_type")
  if arch not in ARCHITECTURES:
    raise InteropError(f"{where}: model_type={arch!r}; lmtiny imports {', '.join(ARCHITECTURES)}")

  def need(ok, field, why):
    if not ok:
      raise InteropError(f"{where}: {field}={hf.get(field)!r}: {why}")

  need(hf.get("hidden_act", "silu") == "silu", "hidden_act", "lmtiny's SwiGLU MLP uses silu")
  need(not hf.get("attention_bias", False), "attention_bias", "lmtiny's projections have no biases")
  need(not hf.get("mlp_bias", False), "mlp_bias", "lmtiny's MLP has no biases")
  need(not hf.get("use_sliding_window", False), "use_sliding_window", "lmtiny attends to the whole context")
  theta, kind = _rope(hf)
  if kind != "default":
    raise InteropError(f"{where}: rope type {kind!r}: lmtiny implements plain RoPE only (no scaling)")
  for field in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
    if field not in hf:
      raise InteropError(f"{where}: field {field!r} missing")
    need(_is_positive_int(hf[field]), field, "must be an integer > 0")
  for field in ("head_dim", "num_key_value_heads", "max_position_embeddings"):
    need(hf.get(field) is None or _is_positive_int(hf[field]), field, "must be an integer > 0 (or absent)")
  try:
    d, h = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    fields = dict(vocab_size=int(hf["vocab_size"]), num_layers=int(hf["num_hidden_layers"]), d_model=d,
                  num_heads=h, head_dim=int(hf.get("head_dim") or d // h),
                  num_kv_heads=int(hf.get("num_key_value_heads") or h), mlp_dim=int(hf["intermediate_size"]),
                  activation="swiglu", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                  qk_norm=arch == "qwen3", norm_scale=True, rope_theta=theta,
                  max_seq_len=int(hf.get("max_position_embeddings", 2048)), logit_softcap=0.0)
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


def unstack_layers(flat: dict, num_layers: int) -> dict:
  """Per-layer paths ('layers', i, ...) from scan-stacked ones ('layers', ...) with a leading L axis."""
  out = {}
  for path, x in flat.items():
    if path[0] == "layers" and not isinstance(path[1], int):
      for i in range(num_layers):
        out[("layers", i) + path[1:]] = x[i]
    else:
      out[path] = x
  return out


def stack_layers(flat: dict, num_layers: int) -> dict:
  """The inverse of unstack_layers."""
  out, stacked = {}, {}
  for path, x in flat.items():
    if path[0] == "layers":
      stacked.setdefault(path[2:], [None] * num_layers)[path[1]] = x
    else:
      out[path] = x
  out.update({("layers",) + rest: np.stack(xs) for rest, xs in stacked.items()})
  return out


def to_hf_tensors(flat: dict, m, dtype) -> dict[str, np.ndarray]:
  """HF tensors (in `dtype`) of an lmtiny model's parameters (per-layer paths); parameter-free
  norms become scales of ones."""
  out = {}
  for path, x in flat.items():
    if path[0] == "layers":
      name, layout = LAYER_TENSORS[path[2:]]
      out[f"model.layers.{path[1]}.{name}"] = _to_hf(layout, x)
    else:
      name, layout = TOP_TENSORS[path]
      out[name] = _to_hf(layout, x)
  if not m.norm_scale:
    ones = lambda n: np.ones((n,), np.float32)
    out["model.norm.weight"] = ones(m.d_model)
    for i in range(m.num_layers):
      for key in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{i}.{key}.weight"] = ones(m.d_model)
      if m.qk_norm:
        for key in ("q_norm", "k_norm"):
          out[f"model.layers.{i}.self_attn.{key}.weight"] = ones(config_lib.head_dim(m))
  return {k: np.ascontiguousarray(v.astype(dtype)) for k, v in out.items()}


def from_hf_tensors(tensors: dict[str, np.ndarray], shapes: dict, where: str) -> dict:
  """lmtiny per-layer parameters (float32) from HF tensors; `shapes` maps every lmtiny path to
  its shape. Missing, unexpected or mis-shaped tensors raise InteropError naming them."""
  names = {}
  for path in shapes:
    if path[0] == "layers":
      name, layout = LAYER_TENSORS[path[2:]]
      names[f"model.layers.{path[1]}.{name}"] = (path, layout)
    else:
      names[TOP_TENSORS[path][0]] = (path, TOP_TENSORS[path][1])
  extra = sorted(k for k in tensors if k not in names and not k.endswith(IGNORED_HF_TENSORS))
  if extra:
    raise InteropError(f"{where}: tensor {extra[0]} has no place in the lmtiny model"
                       + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
  out = {}
  for name, (path, layout) in names.items():
    if name not in tensors:
      raise InteropError(f"{where}: tensor {name} is missing")
    y = tensors[name]
    shape = shapes[path]
    if tuple(y.shape) != _hf_shape(layout, shape):
      raise InteropError(f"{where}: tensor {name} has shape {list(y.shape)}, expected "
                         f"{list(_hf_shape(layout, shape))} (from config.json)")
    out[path] = np.asarray(_from_hf(layout, y, shape), np.float32)
  return out
