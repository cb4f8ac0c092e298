"""Per-device memory estimate of one training step, by part (no JAX: lmtiny.arch prints it).

    total = params + optimizer state + gradients + activations + working + fsdp gathers

- params: float32 master weights; FSDP splits every parameter's `embed` dimension, `tensor`
  splits heads, MLP units and vocab (lmtiny.parallel.sharding.RULES; the embedding table's rows stay whole).
- optimizer state: AdamW's two float32 moments, sharded like the parameters (Muon: one float32
  momentum per block matrix, AdamW's two on the rest).
- gradients: the float32 gradient accumulator, one micro-step's compute-dtype gradient and the
  step's compute-dtype copy of the weights (cast once per step), sharded like the parameters;
  the optimizer's update is fused into the new params and moments in place. `platform` "gpu"
  counts what XLA:GPU holds: the float32 sums and the copies of the weights the GEMMs read.
- activations: what the backward keeps per token and layer under the remat policy (model.remat:
  the residuals jax saves, tests/plan/test_memory.py), for one micro-batch of device_batch_size
  sequences, plus each value-embedding layer's looked-up rows (an input of its remat region, so
  always kept) and the embedding output and final norm.
- working: the larger of what the loss and the layer being differentiated hold beside those
  (the loss runs between the forward and the backward: never both at once).
  - loss: lmtiny.kernels.cross_entropy keeps one chunk of model.loss_chunk_tokens x V / tensor
    logits in float32 and their gradient in the compute dtype, except on TPU, where XLA forms
    that gradient inside the dx and dw GEMMs' operand fusions, never whole; none with
    model.loss_kernel=pallas (its logits stay in the kernels' VMEM).
  - the layer: its whole working set less what the policy keeps of it (none under remat "none",
    which recomputes nothing); the xla attention path adds its [T, T] scores, packed cuDNN its
    per-run workspace; a fused kernel (cuDNN, splash: what `auto` picks on a GPU or TPU) keeps
    no scores.
- fsdp gathers: under FSDP each device still holds a whole vocab matrix while it uses it: a
  compute-dtype copy and a float32 gradient before it is reduce-scattered, for one of the
  embedding and lm_head at a time (their uses do not overlap: XLA:TPU's peak holds one of each);
  and the compute-dtype copies of the value-embedding tables, all of them for the whole step when
  it accumulates (XLA hoists their gathers out of the micro-step loop). With
  train.grad_reduce=step (one reduction per step) the gradients are whole float32 sums instead.
Layers under `lax.scan` (model.scan_layers) keep exactly what the remat policy saves, and on TPU
one more attention-sized stack (splash's own output); unrolled layers on XLA:CPU keep more (its
scheduler is not memory-aware), so compare with scan_layers. Of unrolled layers under remat
"none" XLA:TPU and XLA:GPU keep less than their working set, and `platform` "tpu" or "gpu"
counts what each keeps (_kept_by_xla_tpu_unrolled, _kept_by_xla_gpu_unrolled).
`lmtiny.bench` prints XLA's own figure (compiled.memory_analysis()) beside this one, and
`--topology v5e:2x4` XLA:TPU's for TPU chips (its peak); tests keep the estimate within 10% of
XLA:TPU's (v5e under FSDP, the d24 presets on v5p and v6e) and within 25% of XLA:CPU's.
"""
from __future__ import annotations

import copy

from lmtiny import config as config_lib
from lmtiny.plan import counts

GIB = 2 ** 30


def _widths(m) -> dict[str, int]:
  hd = config_lib.head_dim(m)
  return dict(d=m.d_model, q=m.num_heads * hd, kv=config_lib.num_kv_heads(m) * hd, f=config_lib.mlp_dim(m), head=hd,
              gated=m.activation == "swiglu", relu2=m.activation == "relu2", qk_norm=m.qk_norm)


def _layer_working_set(w: dict, c: int) -> float:
  """Bytes per token of everything one layer's forward produces (what remat "none" keeps): its
  compute-dtype matmul inputs and outputs and two float32 [D] norm inputs (RoPE and the other
  float32 steps fuse into the matmuls). relu² keeps its output alone, with no mask
  (lmtiny.model.transformer.relu2)."""
  mlp = (3 if w["gated"] else 2) * w["f"]
  return c * (4 * w["d"] + 2 * w["q"] + 3 * w["kv"] + mlp) + 4 * 2 * w["d"]


def _kept_by_xla_tpu_unrolled(w: dict, c: int) -> float:
  """Bytes per token and layer XLA:TPU keeps of an unrolled layer under remat "none" (beyond the
  block input). Free to choose, it recomputes the elementwise steps (norms, RoPE, relu², casts)
  inside the backward's fusions and keeps operands: one [D] activation, four query-sized and two
  key/value-sized attention arrays (splash's operands and their head-major forms; two of the
  query-sized ones in 128-lane tiles, which pad 64-wide heads to twice their bytes) and the MLP's
  hidden activations (relu²'s output alone; its mask, kept as bits until relu² kept only its
  output, was 256 B of d4_38m's per-layer heap growth). Per-layer growth of XLA:TPU's heap on a v5e
  (2 against 4 layers, 8,192 tokens), kept / counted with the block input: d4_38m 14.6 / 14.6 KB,
  d7_38m 11.0 / 10.9, d12 unrolled 18.6 / 18.8. (Before the projections kept their heads'
  dimensions on TPU, `dense`, XLA:TPU kept one more [D] array: d4_38m 15.7, d4_38m with SwiGLU
  19.6 against 18.4 counted, with 2 KV heads 12.7 against 14.1; d4_38m with QK-norm kept 20.0, more
  copies of its 64-wide heads, which this leaves out.)"""
  mlp = (2 if w["gated"] else 1) * w["f"]
  q_tiled = w["q"] // w["head"] * -(-w["head"] // 128) * 128  # heads x their width in whole tiles
  return c * (w["d"] + 2 * w["q"] + 2 * q_tiled + 2 * w["kv"] + mlp)


def _kept_by_xla_gpu_unrolled(w: dict, c: int) -> float:
  """Bytes per token and layer XLA:GPU keeps of an unrolled layer under remat "none" (beyond the
  block input): the blocks' GEMM inputs and cuDNN attention's operands and output (both norms'
  outputs, q, k, v, the attention output; the MLP's hidden activation, and its pre-activations
  unless the activation is relu², which keeps its output alone), one float32 [D] residual, and
  with QK-norm the queries and keys before it. The norms' float32 outputs and RoPE's outputs
  it recomputes inside the backward's fusions. Checked on whole steps at the configs' depths, an
  H100's as XLA:GPU compiles them on a CPU host (tests/plan/test_memory.py: 0.95x-0.99x, d12_2026
  as it ships 21.31 GiB counted against 21.70), and per token and layer by second differences of
  that figure (2 against 4 layers, 8 against 16 rows) where those hold still: SwiGLU 32.6 KB
  measured, 33.8 counted. With relu² they move with the layers taken (d12_2026 20.3 KB over 2 and
  4 layers, 22.7 over 4 and 8; 21.5 counted)."""
  mlp = (3 if w["gated"] else 1 if w["relu2"] else 2) * w["f"]
  qk_norm = c * (w["q"] + w["kv"]) if w["qk_norm"] else 0
  return c * (w["d"] + 2 * w["q"] + 2 * w["kv"] + mlp) + 4 * w["d"] + qk_norm


def _saved_per_token(policy: str, w: dict, c: int) -> float:
  """Bytes per token and layer the backward keeps under a remat policy (beyond the block input).
  Under "none" that is the layer's whole working set, as lax.scan's body keeps it. XLA:TPU and
  XLA:GPU keep less of unrolled layers (_kept_by_xla_tpu_unrolled, _kept_by_xla_gpu_unrolled)."""
  # The MLP's down projection feeds only the residual sum (the next layer's input, kept anyway):
  # no backward step reads it, so no policy keeps it.
  matmul_outputs = c * (w["q"] + 2 * w["kv"] + w["d"] + (2 if w["gated"] else 1) * w["f"])
  attn_out = c * w["q"]  # the attention output (the fused kernel's logsumexp is negligible)
  table = {  # what each policy of lmtiny.model.transformer.REMAT_POLICIES saves
      "none": _layer_working_set(w, c),
      "full": 0.0,
      "save_attn_out": attn_out,
      "save_qkv": attn_out + c * (w["q"] + 2 * w["kv"]),
      "minimal": matmul_outputs + attn_out, "dots_no_batch": matmul_outputs + attn_out,
      "dots": matmul_outputs + attn_out,  # + the T x T scores, counted by the caller
  }
  return table.get(policy, matmul_outputs)  # an unknown policy: assume it keeps the matmul outputs


def packed_cudnn_workspace(cfg, rows: int, heads: int) -> float:
  """Bytes of the float32 dQ accumulator and softmax statistics that packed cuDNN attention's
  backward zeroes for the layer it differentiates: one [T, Dh + 1] block per run bound, head and
  row, as if every run were a whole row (an H100 profile of d12_2026, 32 rows, T // 64 = 32 runs:
  a 6.49 GB memset per layer and micro-step, 14% of the step). 0 where rows are one causal
  sequence: no document mask, or a bound of one run."""
  t = cfg.train.seq_len
  runs = config_lib.cudnn_max_runs(t, cfg.data.max_docs_per_row) if cfg.data.document_mask else 1
  return 0.0 if runs < 2 else 4.0 * rows * runs * heads * t * (config_lib.head_dim(cfg.model) + 1)


def mesh_axes(mesh_shape: dict[str, int] | None) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes of a mesh shape; an axis it leaves out (or no shape) is 1."""
  shape = mesh_shape or {}
  return shape.get("data", 1), shape.get("fsdp", 1), shape.get("tensor", 1)


def estimate(cfg, mesh_shape: dict[str, int] | None = None, compute_bytes: int | None = None,
             attention: str | None = None, platform: str | None = None) -> dict[str, float]:
  """Estimated bytes per device of one train step: params, optimizer, gradients, activations,
  loss_chunk, fsdp_gathers and total. `mesh_shape` ({data, fsdp, tensor}) defaults to one device;
  `compute_bytes` to 4 for model.dtype float32, else 2 (bf16, as on TPU/GPU); `attention` (the
  backend that runs) to model.attention, where `auto` counts as a fused kernel (GPU/TPU);
  `platform` "tpu" counts the loss chunk as XLA:TPU holds it (anything else: as XLA:GPU would), and
  "tpu" or "gpu" unrolled layers under remat "none" as that compiler keeps them."""
  m, t = cfg.model, cfg.train
  data, fsdp, tensor = mesh_axes(mesh_shape)
  dp = data * fsdp
  c = compute_bytes or (4 if m.dtype == "float32" else 2)
  p = counts.param_breakdown(m)
  embedding = p["embedding"]
  sharded = p["total"] - embedding
  param_elems = embedding / fsdp + sharded / (fsdp * tensor)

  resolved = config_lib.resolve_batch(cfg, dp).train
  rows = max(1, config_lib.micro_batch_size(resolved) // dp)
  tokens = rows * t.seq_len
  w = _widths(m)
  heads_local = max(1, m.num_heads // tensor) if m.num_heads % tensor == 0 else m.num_heads
  tp_w = dict(w, q=w["q"] * heads_local // m.num_heads,
              kv=w["kv"] // tensor if config_lib.num_kv_heads(m) % tensor == 0 else w["kv"],
              f=w["f"] // tensor if w["f"] % tensor == 0 else w["f"])
  if m.remat == "none" and platform == "tpu" and not m.scan_layers:
    kept = _kept_by_xla_tpu_unrolled(tp_w, c)
  elif m.remat == "none" and platform == "gpu" and not m.scan_layers:
    kept = _kept_by_xla_gpu_unrolled(tp_w, c)
  else:
    kept = _saved_per_token(m.remat, tp_w, c)
  backend = attention or m.attention
  if platform == "tpu" and m.scan_layers and backend in ("auto", "splash") and m.remat not in ("none", "full"):
    # Under lax.scan XLA:TPU stacks splash's head-major output beside the attention output the
    # policy names (d12 on a v5e-4: five [L, B, T, H, Dh] stacks where jax saves four).
    kept += c * tp_w["q"]
  per_layer = tokens * (c * w["d"] + kept)
  ve_layers = len(config_lib.value_embed_layers(m))
  # The layer being recomputed and differentiated holds its whole working set, of which what the
  # policy keeps is counted in per_layer already (remat "none" recomputes nothing: its gradients
  # replace the saved tensors they consume).
  layer = 0.0 if m.remat == "none" else tokens * max(0.0, _layer_working_set(tp_w, c) - c * w["d"] - kept)
  # Each value-embedding layer's rows (under "none" the working set kept per layer holds them).
  activations = 0.0 if m.remat == "none" else ve_layers * tokens * c * tp_w["kv"]
  if backend == "xla":
    # The layer being differentiated holds float32 scores, probabilities and their gradients,
    # for the causal blocks the xla path computes (lmtiny.model.attention.xla_causal_attention).
    blocks = config_lib.attention_query_blocks(t.seq_len)
    square = rows * heads_local * t.seq_len * t.seq_len * (blocks + 1) / (2 * blocks)
    layer += square * 16
    if m.remat == "dots":
      per_layer += square * 4
    if m.remat == "none":
      per_layer += square * (4 + c)  # float32 scores, probabilities
  if backend == "cudnn":
    layer += packed_cudnn_workspace(cfg, rows, heads_local)
  activations += m.num_layers * per_layer + tokens * (4 * 3 + c) * w["d"]  # + embedding output, final norm, grads
  vocab_local = m.vocab_size // tensor if m.vocab_size % tensor == 0 else m.vocab_size
  dlogits = 0 if platform == "tpu" else c
  loss_chunk = min(m.loss_chunk_tokens, tokens) * vocab_local * (4 + dlogits)  # float32 logits, their gradient
  if m.loss_kernel == "pallas":
    loss_chunk = 0
  # AdamW keeps two float32 moments per parameter; Muon one momentum buffer per block matrix
  # (AdamW's two on embeddings, lm_head and norms: lmtiny.training.muon; normuon's factored second
  # moment is one row or column per matrix, not counted).
  block_elems = m.num_layers * (p["attention_per_layer"] + p["mlp_per_layer"]) / (fsdp * tensor)
  muon = cfg.optim.name in ("muon", "normuon")
  moments = 8.0 * param_elems - (4.0 * block_elems if muon else 0.0)
  # The value-embedding tables are gathered whole in the compute dtype too (embed_lookup). Their
  # gathers do not change across micro-steps, so XLA hoists them out of the accumulation loop:
  # every table's copy is held for the whole step (one at a time without accumulation).
  accumulating = config_lib.accumulation_steps(resolved) > 1
  ve_tables_held = p["value_embeds"] if accumulating or not ve_layers else p["value_embeds"] / ve_layers
  # XLA:GPU holds the float32 gradient sums and the compute-dtype copies of the weights the GEMMs
  # read (the blocks' and lm_head's; embedding lookups cast the rows they gather), and adds each
  # micro-step's gradient into the sums as it is formed, never holding it whole.
  lm_head = p["lm_head"] or (embedding if m.tie_embeddings else 0)
  gemm_weight_elems = (p["blocks"] + lm_head) / (fsdp * tensor)
  out = {
      "params": 4.0 * param_elems,
      "optimizer": moments,
      "gradients": (4.0 * param_elems + c * gemm_weight_elems if platform == "gpu" else (4.0 + 2 * c) * param_elems),
      "activations": float(activations),
      # The loss runs after the forward and before the backward reaches a layer: its logits chunk
      # and the layer being differentiated are never held at once (XLA:TPU's peak holds the loss's).
      "working": float(max(loss_chunk, layer)),
      # A whole vocab matrix in the compute dtype and its float32 gradient, less the shares of
      # them counted above.
      "fsdp_gathers": 0.0 if fsdp == 1 else ((c + 4.0) * embedding + c * ve_tables_held) * (1 - 1 / fsdp),
  }
  if t.grad_reduce == "step" and fsdp > 1:
    # One gradient reduction per step (lmtiny.parallel.sharding.accumulates_per_device): each
    # device sums whole float32 gradients (ZeRO-2's memory), and with accumulation a micro-step's
    # float32 gradient of a vocab matrix waits beside the sums; the weights arrive whole once per
    # step, XLA gathering their compute-dtype casts, of which a vocab matrix is the largest
    # (XLA:TPU's peak for a 2-layer d12 on v5e:2x2, 2 micro-steps: tests/plan/test_memory.py).
    whole = p["total"]  # mesh.tensor is 1 (config.validate)
    out["gradients"] = 4.0 * whole + (4.0 * embedding if accumulating else 0.0)
    out["fsdp_gathers"] = c * embedding
  out["total"] = sum(out.values())
  return out


V5E_BYTES = counts.HBM_BYTES["v5e"]
# The share of a chip's memory a plan's estimate may use. Against XLA:TPU's peak for every
# config's v5e plans (benchmarks/tpu_plans.py), the d24 presets and d12_2026 on a v5p the estimate
# reads 0.93x-1.05x, so 80% of a TPU chip keeps the compiled step under 86% of it. Against an
# H100's (2026-11-27, jax 0.11.2; XLA:GPU's figure is what the runtime peaked at) it reads 1.02x
# (d12_2026 under remat minimal, 17.56 GiB) and 1.00x (d24_2026, 44.84) in bf16, 0.99x for
# d12_2026 in fp8 (XLA:GPU compiled for an H100 on a CPU host: 18.00 GiB) and, compiled the same
# way, 1.00x for d12_2026 as it ships (remat none, 28.11 GiB): 80% of a GPU keeps the step under
# 81% of it (tests/plan/test_memory.py).
PLAN_HEADROOM = {"tpu": 0.8, "gpu": 0.8}


def fsdp_plans(cfg, chip_bytes: float = V5E_BYTES, headroom: float = PLAN_HEADROOM["tpu"],
               max_fsdp: int = 256) -> list[tuple[int, int | None, int, float]]:
  """How the config fits TPU chips of `chip_bytes` (default a 16 GB v5e) at each FSDP degree.

  For every power-of-two FSDP degree that divides the global batch's sequences (up to
  max_fsdp): the largest device_batch_size, at most the config's, that divides the sequences
  each device gets and whose estimate fits `headroom` of the chip, as (fsdp, device_batch_size,
  accumulation steps, estimated bytes); (fsdp, None, 0, bytes at 1 sequence) when none fits.
  """
  t = cfg.train
  sequences = config_lib.global_batch_size(t)
  most = t.device_batch_size or config_lib.micro_batch_size(t)
  plans, fsdp = [], 1
  while fsdp <= min(max_fsdp, sequences) and sequences % fsdp == 0:
    per_device = sequences // fsdp
    mesh_shape = {"data": 1, "fsdp": fsdp, "tensor": 1}
    plan = None
    for dbs in (d for d in range(min(most, per_device), 0, -1) if per_device % d == 0):
      trial = copy.deepcopy(cfg)
      trial.train.device_batch_size = dbs
      total = estimate(trial, mesh_shape, platform="tpu")["total"]
      if total <= headroom * chip_bytes:
        plan = (fsdp, dbs, per_device // dbs, total)
        break
    plans.append(plan or (fsdp, None, 0, total))
    fsdp *= 2
  return plans


def format_plans(cfg, chip: str = "16 GB v5e", chip_bytes: float = V5E_BYTES, rows: int = 4) -> list[str]:
  """The smallest FSDP degrees at which the config fits `chip` chips, one line each."""
  plans = fsdp_plans(cfg, chip_bytes)
  fits = [p for p in plans if p[1] is not None]
  head = (f"{chip} chips (data=1, fsdp=N; largest train.device_batch_size whose estimate stays under "
          f"{PLAN_HEADROOM['tpu']:.0%} of the chip):")
  if not fits:
    return [head, f"  no FSDP degree up to {plans[-1][0]} fits; lower train.seq_len or the model"]
  lines = [head]
  if fits[0][0] > 1:
    lines.append(f"  mesh.fsdp < {fits[0][0]}: does not fit")
  lines += [f"  mesh.fsdp={f:<4} train.device_batch_size={dbs:<3} accumulation {acc:<3} {total / GIB:6.2f} GiB"
            for f, dbs, acc, total in fits[:rows]]
  return lines


def format_estimate(cfg, mesh_shape=None) -> list[str]:
  """Lines for lmtiny.arch's report."""
  e = estimate(cfg, mesh_shape)
  t = cfg.train
  data, fsdp, _ = mesh_axes(mesh_shape)
  dp = data * fsdp
  resolved = config_lib.resolve_batch(cfg, dp).train
  rows = max(1, config_lib.micro_batch_size(resolved) // max(dp, 1))
  lines = [f"Memory per device (estimate; {rows} sequences x {t.seq_len} per micro-step, "
           f"accumulation {config_lib.accumulation_steps(resolved)}, remat {cfg.model.remat}, "
           f"{'float32' if cfg.model.dtype == 'float32' else 'bf16'} compute, one device):"]
  lines += [f"  {k:<12}{v / GIB:>9.2f} GiB" for k, v in e.items()]
  return lines + format_plans(cfg)

