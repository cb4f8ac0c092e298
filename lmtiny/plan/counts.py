"""Architecture arithmetic: parameter breakdown, FLOPs per token, token budget and training time.

The counts here are the formula the model must match (tests compare them with an abstract init of
`lmtiny.model`): token embedding [V, D]; lm_head [D, V] unless tied; per layer q [D, H*Dh],
k and v [D, KV*Dh], o [H*Dh, D], MLP up (and gate for SwiGLU) [D, F] and down [F, D]; no biases;
RMSNorm scales of [D] before attention, before the MLP and at the end, plus two [Dh] scales per
layer with QK-norm, all only when `norm_scale`. Importing this module does not import JAX.
"""
from __future__ import annotations

from lmtiny import config as config_lib
from lmtiny.errors import ConfigError

# Dense bf16 peak FLOP/s per chip, without sparsity (vendors print sparse figures at twice these),
# with float32 accumulation where a datasheet gives both. "cpu" is a rough stand-in for a whole
# 16-core AVX2/AVX-512 host in fp32 (~60 GFLOP/s per core; a 2-core dev box measured ~0.2e12
# with a NumPy matmul): CPU MFU figures are indicative only. Sources: NVIDIA's H100 and A100
# datasheets (989 and 312 TFLOPS BF16 Tensor Core; 1,979 / 624 with sparsity), the L4 datasheet
# (242 TFLOPS BF16 with sparsity: 121 dense), the Ada Lovelace whitepaper (RTX 4090: 165.2 peak BF16
# Tensor TFLOPS with FP32 accumulate, 330.4 sparse), the Ampere GA102 whitepaper (RTX 3090: 71,
# RTX 3080: 59.5 BF16 with FP32 accumulate; GeForce cards accumulate in FP32 at half the FP16-accumulate
# rate), Google Cloud's TPU system architecture pages (v5e 197, v5p 459, v6e 918, v4 275 TFLOPS bf16).
PEAK_FLOPS = {
    "h100": 989e12,       # H100 SXM
    "h100_pcie": 756e12,
    "h200": 989e12,
    "a100": 312e12,       # A100 80 GB (SXM)
    "a100_40": 312e12,    # A100 40 GB
    "l4": 121e12,
    "rtx4090": 165.2e12,
    "rtx3090": 71e12,
    "rtx3080": 59.5e12,   # the 10 GB card
    "v5e": 197e12,
    "v5p": 459e12,
    "v6e": 918e12,
    "v4": 275e12,
    "cpu": 1e12,
}
# Memory per chip, in bytes (HBM, or the GeForce and L4 cards' GDDR; GPUs' figures as their vendors
# state them, in GB of 10^9 bytes: H100 80 GB, A100 40 / 80 GB, L4, RTX 4090 and 3090 24 GB, RTX 3080
# 10 GB; TPUs' in GiB as Google states them: v5e 16, v5p 95, v6e 32, v4 32).
HBM_BYTES = {
    "h100": 80e9, "h100_pcie": 80e9, "h200": 141e9, "a100": 80e9, "a100_40": 40e9, "l4": 24e9,
    "rtx4090": 24e9, "rtx3090": 24e9, "rtx3080": 10e9,
    "v5e": 16 * 2**30, "v5p": 95 * 2**30, "v6e": 32 * 2**30, "v4": 32 * 2**30,
}


def _norm_params(m) -> tuple[int, int]:
  """(norm scales per layer, final-norm scale plus the embedding norm's when model.embed_norm)."""
  if not m.norm_scale:
    return 0, 0
  per_layer = 2 * m.d_model + (2 * config_lib.head_dim(m) if m.qk_norm else 0)
  return per_layer, m.d_model * (2 if m.embed_norm else 1)  # final (+ embedding) norm


def param_breakdown(m) -> dict[str, int]:
  """Parameter counts of a model config (`cfg.model`), by part.

  Keys: embedding, lm_head (0 when tied), attention_per_layer, mlp_per_layer, norms_per_layer,
  layer (their sum), num_layers, blocks (num_layers * layer + the value-embedding gates),
  value_embeds, scalars (residual scalars, smear, backout), final_norm, total.
  """
  d, v = m.d_model, config_lib.padded_vocab(m)
  q_width = m.num_heads * config_lib.head_dim(m)
  kv_width = config_lib.num_kv_heads(m) * config_lib.head_dim(m)
  attention = d * q_width + 2 * d * kv_width + q_width * d
  mlp = (3 if m.activation == "swiglu" else 2) * d * config_lib.mlp_dim(m)
  norms, final_norm = _norm_params(m)
  layer = attention + mlp + norms
  ve_layers = len(config_lib.value_embed_layers(m))
  smear = m.smear
  parts = dict(
      embedding=v * d,
      lm_head=0 if m.tie_embeddings else d * v,
      attention_per_layer=attention,
      mlp_per_layer=mlp,
      norms_per_layer=norms,
      layer=layer,
      num_layers=m.num_layers,
      blocks=m.num_layers * layer + ve_layers * config_lib.VE_GATE_CHANNELS * config_lib.num_kv_heads(m),
      value_embeds=ve_layers * v * kv_width,
      scalars=(2 * m.num_layers * bool(m.residual_scalars) + (config_lib.SMEAR_CHANNELS + 1) * bool(smear)
               + bool(m.backout)),
      final_norm=final_norm,
  )
  parts["total"] = (parts["embedding"] + parts["lm_head"] + parts["blocks"] + parts["value_embeds"]
                    + parts["scalars"] + final_norm)
  return parts


def count_params(m) -> int:
  """Total parameter count of a model config."""
  return param_breakdown(m)["total"]


def scaling_params(m) -> int:
  """nanochat's count for its horizon and batch-size rules: the blocks' matrices and lm_head
  (its cleanest scaling laws; embeddings, value embeddings and scalars excluded)."""
  p = param_breakdown(m)
  return p["blocks"] - m.num_layers * p["norms_per_layer"] + (p["lm_head"] or p["embedding"])


def matmul_params(m) -> int:
  """Parameters in weight matrices that multiply activations: attention, MLP, the gates and the
  unembedding (its vocab_size columns: padded ones get no logit).

  The embedding lookups are excluded; with tied embeddings the shared matrix counts once, as the
  unembedding. Norm scales are elementwise and excluded.
  """
  p = param_breakdown(m)
  gates = config_lib.SMEAR_CHANNELS * bool(m.smear)
  return p["blocks"] - m.num_layers * p["norms_per_layer"] + gates + m.d_model * m.vocab_size


def _attended_keys(seq_len: int, window: int, convention: str) -> float:
  """Keys one query of a length-T row attends to, on average: T / 2 causal (T under nanochat's
  full-square convention); a window w caps it at w + 1 (nanochat counts min(w, T))."""
  if convention == "nanochat":
    return min(window, seq_len) if window else seq_len
  if not window or window >= seq_len:
    return seq_len / 2
  return (window + 1) - window * (window + 1) / (2 * seq_len)  # ramp to w + 1 keys, then flat


def _attention_flops_per_token(m, seq_len: int, convention: str = "causal-half") -> float:
  """QK^T and AV per token over the layers, forward: 2 matmuls x 2 FLOP x keys x H x Dh."""
  keys = sum(_attended_keys(seq_len, w, convention) for w in config_lib.layer_windows(m))
  return 4.0 * keys * m.num_heads * config_lib.head_dim(m)


MFU_CONVENTIONS = ("causal-half", "nanochat")


def train_flops_per_token(m, seq_len: int, convention: str = "causal-half") -> float:
  """Training FLOPs per token: 6 * N_matmul + 6 * L * T * H * Dh ("causal-half", the default),
  or 6 * N_matmul + 12 * L * T * H * Dh ("nanochat").

  6 = forward (2) + backward (4) FLOPs per multiply-accumulate of a weight. The causal-half
  convention follows MaxText: half of nanochat's 12 * L * T * H * Dh, since half the score
  matrix is masked. nanochat counts the full square. MFU divides either by the chip's peak;
  every printed MFU names its convention.
  """
  if convention not in MFU_CONVENTIONS:
    raise ValueError(f"convention={convention!r}: one of {MFU_CONVENTIONS}")
  return 6.0 * matmul_params(m) + 3.0 * _attention_flops_per_token(m, seq_len, convention)


def inference_flops_per_token(m, seq_len: int) -> float:
  """Forward FLOPs per token: 2 * N_matmul + 2 * L * T * H * Dh.

  Same causal convention as training: the average token of a length-T sequence attends to T/2
  positions (equally: one decoded token with a KV cache, averaged over positions 0..T).
  """
  return 2.0 * matmul_params(m) + _attention_flops_per_token(m, seq_len)


def chinchilla_tokens(m, tokens_per_param: float = 20.0) -> float:
  """Training-token budget: tokens_per_param x total parameters (Chinchilla: ~20)."""
  if not tokens_per_param > 0:
    raise ConfigError(f"--tokens-per-param={tokens_per_param:g}: must be > 0")
  return tokens_per_param * count_params(m)


def training_seconds(m, seq_len: int, tokens: float, chip: str, mfu: float, num_chips: int = 1) -> float:
  """Wall-clock estimate: tokens x training FLOPs per token / (chips x peak x MFU)."""
  if chip not in PEAK_FLOPS:
    raise ConfigError(f"--chip={chip!r}: unknown chip; choose one of {', '.join(PEAK_FLOPS)}")
  if not 0 < mfu <= 1:
    raise ConfigError(f"--mfu={mfu}: must be in (0, 1]")
  if num_chips < 1:
    raise ConfigError(f"--chips={num_chips}: must be >= 1")
  return tokens * train_flops_per_token(m, seq_len) / (num_chips * PEAK_FLOPS[chip] * mfu)


# ---------------------------------------------------------------------------------------------
# Report.


def describe(m) -> str:
  """One line naming the architecture."""
  hd, kv, f = config_lib.head_dim(m), config_lib.num_kv_heads(m), config_lib.mlp_dim(m)
  return (f"depth {m.num_layers}, width {m.d_model}, {m.num_heads} heads x {hd} ({kv} kv heads), "
          f"{m.activation} MLP {f} ({f / m.d_model:g}x), vocab {m.vocab_size:,}, "
          f"{'tied' if m.tie_embeddings else 'untied'}, norm scale {'on' if m.norm_scale else 'off'}, "
          f"qk-norm {'on' if m.qk_norm else 'off'}")
