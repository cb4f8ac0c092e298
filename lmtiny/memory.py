"""Per-device memory estimate of one training step, by part (no JAX: lmtiny.arch prints it).

    total = params + optimizer state + gradients + activations + loss chunk

- params: float32 master weights; FSDP splits every parameter's `embed` dimension, `tensor`
  splits heads, MLP units and vocab (lmtiny.sharding.RULES; the embedding table's rows stay whole).
- optimizer state: AdamW's two float32 moments, sharded like the parameters (Muon: one float32
  momentum per block matrix, AdamW's two on the rest).
- gradients: the float32 gradient accumulator, the normalised gradient, the optimizer's float32
  update and new moments, the step's compute-dtype copy of the weight matrices (cast once per
  step) and one micro-step's compute-dtype gradient, sharded like the parameters.
- activations: what the backward keeps per token and layer under the remat policy (model.remat),
  for one micro-batch of device_batch_size sequences, plus one layer's full working set (the
  layer being recomputed / differentiated), including its [T, T] attention scores.
- loss chunk: lmtiny.loss keeps one chunk of model.loss_chunk_tokens x V / tensor logits in
  float32 and their gradient in the compute dtype.
Layers under `lax.scan` (model.scan_layers) keep exactly what the remat policy saves; unrolled
layers on XLA:CPU keep more (its scheduler is not memory-aware), so compare with scan_layers.
`lmtiny.bench` prints XLA's own figure (compiled.memory_analysis()) beside this one; tests keep
them within 25% of each other on small configs.
"""
from __future__ import annotations

from lmtiny import arch, config as config_lib

GIB = 2 ** 30


def _widths(m) -> dict[str, int]:
  hd = config_lib.head_dim(m)
  return dict(d=m.d_model, q=m.num_heads * hd, kv=config_lib.num_kv_heads(m) * hd, f=config_lib.mlp_dim(m),
              gated=m.activation == "swiglu")


def _layer_working_set(w: dict, c: int) -> float:
  """Bytes per token of everything one layer's forward produces (what remat "none" keeps):
  compute-dtype matmul outputs, float32 norm and RoPE intermediates."""
  mlp = (3 if w["gated"] else 2) * w["f"]
  return c * (4 * w["d"] + 2 * w["q"] + 3 * w["kv"] + mlp) + 4 * (2 * w["d"] + 2 * (w["q"] + w["kv"]))


def _saved_per_token(policy: str, w: dict, c: int) -> float:
  """Bytes per token and layer the backward keeps under a remat policy (beyond the block input)."""
  matmul_outputs = c * (w["q"] + 2 * w["kv"] + 2 * w["d"] + (2 if w["gated"] else 1) * w["f"])
  attn_out = c * w["q"]  # the attention output (the fused kernel's logsumexp is negligible)
  table = {  # what each policy of lmtiny.model.REMAT_POLICIES saves
      "none": _layer_working_set(w, c),
      "full": 0.0,
      "save_attn_out": attn_out,
      "save_qkv": attn_out + c * (w["q"] + 2 * w["kv"]),
      "minimal": matmul_outputs + attn_out, "dots_no_batch": matmul_outputs + attn_out,
      "dots": matmul_outputs + attn_out,  # + the T x T scores, counted by the caller
  }
  return table.get(policy, matmul_outputs)  # an unknown policy: assume it keeps the matmul outputs


def estimate(cfg, mesh_shape: dict[str, int] | None = None, compute_bytes: int | None = None) -> dict[str, float]:
  """Estimated bytes per device of one train step: params, optimizer, gradients, activations,
  loss_chunk and total. `mesh_shape` ({data, fsdp, tensor}) defaults to one device;
  `compute_bytes` to 4 for model.dtype float32, else 2 (bf16, as on TPU/GPU)."""
  m, t = cfg.model, cfg.train
  mesh_shape = mesh_shape or {"data": 1, "fsdp": 1, "tensor": 1}
  fsdp, tensor = mesh_shape.get("fsdp", 1), mesh_shape.get("tensor", 1)
  dp = mesh_shape.get("data", 1) * fsdp
  c = compute_bytes or (4 if m.dtype == "float32" else 2)
  p = arch.param_breakdown(m)
  embedding = p["embedding"]
  sharded = p["total"] - embedding
  param_elems = embedding / fsdp + sharded / (fsdp * tensor)
  matrix_elems = (p["total"] - embedding - p["final_norm"] - m.num_layers * p["norms_per_layer"]) / (fsdp * tensor)

  resolved = config_lib.resolve_batch(cfg, dp).train
  rows = max(1, config_lib.micro_batch_size(resolved) // dp)
  tokens = rows * t.seq_len
  w = _widths(m)
  heads_local = max(1, m.num_heads // tensor) if m.num_heads % tensor == 0 else m.num_heads
  tp_w = dict(w, q=w["q"] * heads_local // m.num_heads,
              kv=w["kv"] // tensor if config_lib.num_kv_heads(m) % tensor == 0 else w["kv"],
              f=w["f"] // tensor if w["f"] % tensor == 0 else w["f"])
  # The layer being differentiated holds float32 scores, probabilities and their gradients, for
  # the causal blocks the xla path computes (lmtiny.attention.xla_causal_attention).
  blocks = config_lib.attention_query_blocks(t.seq_len)
  square = rows * heads_local * t.seq_len * t.seq_len * (blocks + 1) / (2 * blocks)
  scores = square * 16
  per_layer = tokens * (c * w["d"] + _saved_per_token(m.remat, tp_w, c))
  if m.remat == "dots":
    per_layer += square * 4
  if m.remat == "none":
    per_layer += square * (4 + c)  # float32 scores, probabilities
  activations = m.num_layers * per_layer + tokens * _layer_working_set(tp_w, c) + scores
  activations += tokens * (4 * 3 + c) * w["d"]  # embedding output, final norm, their gradients
  vocab_local = m.vocab_size // tensor if m.vocab_size % tensor == 0 else m.vocab_size
  loss_chunk = min(m.get("loss_chunk_tokens", 4096), tokens) * vocab_local * (4 + c)  # fp32 logits, dlogits
  # AdamW keeps two float32 moments per parameter; Muon one momentum buffer per block matrix
  # (AdamW's two on embeddings, lm_head and norms: lmtiny.muon).
  block_elems = m.num_layers * (p["attention_per_layer"] + p["mlp_per_layer"]) / (fsdp * tensor)
  moments = 8.0 * param_elems - (4.0 * block_elems if cfg.optim.get("name", "adamw") == "muon" else 0.0)
  out = {
      "params": 4.0 * param_elems,
      "optimizer": moments,
      "gradients": 8.0 * param_elems + moments + 2 * c * matrix_elems,
      "activations": float(activations),
      "loss_chunk": float(loss_chunk),
  }
  out["total"] = sum(out.values())
  return out


def recommend_fsdp(cfg, chip_bytes: float = 16 * GIB, headroom: float = 0.9, max_devices: int = 4096) -> int | None:
  """The smallest power-of-two FSDP degree at which the estimate fits `headroom` of a chip's
  memory (default: a 16 GB v5e) at the config's device_batch_size; None if none up to max_devices."""
  f = 1
  while f <= max_devices:
    if estimate(cfg, {"data": 1, "fsdp": f, "tensor": 1})["total"] <= headroom * chip_bytes:
      return f
    f *= 2
  return None


def format_estimate(cfg, mesh_shape=None) -> list[str]:
  """Lines for lmtiny.arch's report."""
  e = estimate(cfg, mesh_shape)
  t = cfg.train
  dp = (mesh_shape or {}).get("data", 1) * (mesh_shape or {}).get("fsdp", 1)
  resolved = config_lib.resolve_batch(cfg, dp).train
  rows = max(1, config_lib.micro_batch_size(resolved) // max(dp, 1))
  lines = [f"Memory per device (estimate; {rows} sequences x {t.seq_len} per micro-step, "
           f"accumulation {config_lib.accumulation_steps(resolved)}, remat {cfg.model.remat}, "
           f"{'float32' if cfg.model.dtype == 'float32' else 'bf16'} compute, one device):"]
  lines += [f"  {k:<12}{v / GIB:>9.2f} GiB" for k, v in e.items()]
  fsdp = recommend_fsdp(cfg)
  lines.append("  16 GB v5e chips: " + (f"FSDP degree {fsdp} (mesh.fsdp={fsdp}) fits" if fsdp else
                                        "does not fit at this device_batch_size; lower train.device_batch_size"))
  return lines

