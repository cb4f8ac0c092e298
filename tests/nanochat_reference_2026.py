"""An independent PyTorch forward pass of nanochat's current GPT (karpathy/nanochat at 92d63d4,
2026-07-03: the March 2026 leaderboard model, with sliding windows, value embeddings, per-layer
residual scalars, smear and backout), written here from its description, and the mapping of lmtiny
weights into it. tests/nanochat_reference.py is the same for the January revision (962b6bf).

nanochat's forward (training mode, no KV cache), every tensor float32:
  norm is F.rms_norm over the last dim without weight and eps=None (float32 machine epsilon).
  x = norm(wte[idx]) (wte has Vp >= vocab rows: the vocab padded to a multiple of 64).
  Smear: for t >= 1, x[t] += smear_lambda * sigmoid(smear_gate . x[t, :24]) * x[t-1], where both
    x on the right are the normed embeddings before the smear; position 0 is left as it is.
  x0 = x (after the smear). Per layer i of L:
    x = resid_lambdas[i] * x + x0_lambdas[i] * x0   (also at layer 0, where x is x0)
    h = norm(x); q, k, v = c_q/c_k/c_v(h) viewed as [B, T, heads, Dh] (K <= H kv heads, GQA)
    value embedding on layers with i % 2 == (L - 1) % 2 (alternating, the last included):
      v += 3 * sigmoid(ve_gate(h[..., :12]))[..., None] * value_embeds[i][idx] viewed as [B, T, K, Dh]
      (the gate reads the block's normed input, one gate per kv head; the table is not normed)
    RoPE on q and k: angles = position * base ** (-2j / Dh), halves (x1, x2) of each head go to
      (x1 cos + x2 sin, -x1 sin + x2 cos) (a rotation by -theta); then q, k = norm(q), norm(k)
      (QK-norm over the head dim); then q, k *= qk_scale (1.2 each, so scores are 1.44x sharper).
    attention: softmax(q k^T / sqrt(Dh)) v where query i sees keys j with i - w <= j <= i, w the
      layer's window (window_sizes below); heads side by side into c_proj; x += that.
    x += mlp.c_proj(relu(mlp.c_fc(norm(x)))^2)
    after layer i == L // 2 (0-based) the residual x is kept as x_mid.
  x = x - backout_lambda * x_mid; logits = lm_head(norm(x))[..., :vocab]; 15 * tanh(logits / 15).
nanochat keeps cos/sin in its compute dtype: float32 on CPU (bfloat16 on recent GPUs); `rope_dtype`
defaults to the compute dtype.

In bfloat16 (`dtype=torch.bfloat16`; nanochat's COMPUTE_DTYPE, NANOCHAT_DTYPE=bfloat16, which
replaced autocast): master weights stay float32 and every Linear casts its weight to the
activation's dtype; the embedding and value-embedding rows are bf16 (nanochat stores those tables
in bf16); the residual stream, norms (F.rms_norm on bf16), RoPE (bf16 tables), attention and MLP are
bf16; resid_lambdas[i] and x0_lambdas[i] multiply bf16 activations as float32 0-dim tensors (torch
reads the scalar at float precision and rounds the product once), smear_lambda and backout_lambda
are cast to bf16 first, q and k are scaled by the Python float 1.2; the logits become float32 after
the lm_head GEMM, for the softcap and the loss. Every float32 forward is unchanged by these casts.

Weight mapping, lmtiny (Flax, x @ W) -> nanochat (torch.nn.Linear, x @ W.T), H heads and K kv heads
of Dh, the model width D, the MLP width F, the padded vocab Vp, L layers:
  embed [Vp, D]                        -> transformer.wte.weight [Vp, D]           (as is)
  layers/i/attn/q [D, H, Dh]           -> transformer.h.i.attn.c_q.weight [H*Dh, D] (second half of
  layers/i/attn/k [D, K, Dh]           -> transformer.h.i.attn.c_k.weight [K*Dh, D]  each head negated,
                                                                                     flattened, transposed)
  layers/i/attn/v [D, K, Dh]           -> transformer.h.i.attn.c_v.weight [K*Dh, D] (flattened, transposed)
  layers/i/attn/o [H, Dh, D]           -> transformer.h.i.attn.c_proj.weight [D, H*Dh] (flattened, transposed)
  layers/i/mlp/up [D, F]               -> transformer.h.i.mlp.c_fc.weight [F, D]   (transposed)
  layers/i/mlp/down [F, D]             -> transformer.h.i.mlp.c_proj.weight [D, F] (transposed)
  layers/i/attn/value_embed [Vp, K*Dh] -> value_embeds.i.weight [Vp, K*Dh]        (as is; VE layers)
  layers/i/attn/ve_gate [12, K]        -> transformer.h.i.attn.ve_gate.weight [K, 12] (transposed)
  lm_head [D, Vp]                      -> lm_head.weight [Vp, D]                   (transposed)
  resid_lambdas [L], x0_lambdas [L], smear_lambda [1], backout_lambda [1]  -> same names, as they are
  smear_gate [24, 1]                   -> smear_gate.weight [1, 24]                (transposed)
Why the negation: lmtiny rotates by +theta, (x1 cos - x2 sin, x2 cos + x1 sin). If nanochat's
projection gives (x1, x2), lmtiny's gives (x1, -x2) and rotates it to (y1, -y2) where nanochat has
(y1, y2): the same scores, since the second halves' signs cancel in q . k. Rotations and sign flips
keep norms, so nanochat's QK-norm after RoPE equals lmtiny's before it, and the scalar qk_scale
commutes with both. v and the value embeddings are not rotated and keep their signs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Unchanged since January: RoPE (its base is an argument), and the weight mapping, which covers the
# newer parameters too.
from nanochat_reference import lmtiny_to_nanochat, relative_difference, rotary_tables, rotate  # noqa: F401

SMEAR_CHANNELS = 24
VE_GATE_CHANNELS = 12


def norm(x):
  return F.rms_norm(x, (x.size(-1),))


def linear(x, weight):
  """nanochat's Linear: the float32 master weight cast to the activation's dtype."""
  return F.linear(x, weight.to(x.dtype))


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def window_sizes(n_layer: int, pattern: str, sequence_len: int) -> list[int]:
  """Each layer's left window (keys i - w .. i): the pattern tiled over the layers, S short and L
  long, the last layer always long. Long = sequence_len; short = a quarter of it, rounded up, then
  up to a multiple of 128 (= 128 * ceil(sequence_len / 512); 2048 -> 512)."""
  pattern = pattern.upper()
  if not pattern or set(pattern) - set("SL"):
    raise ValueError(f"window pattern {pattern!r}: use only S and L")
  long = sequence_len
  short = _ceil_div(_ceil_div(sequence_len, 4), 128) * 128
  sizes = [short if pattern[i % len(pattern)] == "S" else long for i in range(n_layer)]
  sizes[-1] = long
  return sizes


def has_value_embed(layer: int, n_layer: int) -> bool:
  return layer % 2 == (n_layer - 1) % 2


def attention(q, k, v, window: int):
  """Causal attention over [B, T, heads, Dh], query i seeing keys i - window .. i. Like nanochat's
  SDPA path: the causal kernel when the window covers the sequence, an explicit mask otherwise."""
  t = q.shape[1]
  q, k, v = (z.transpose(1, 2) for z in (q, k, v))
  gqa = q.shape[1] != k.shape[1]
  if window >= t:
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
  else:
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    mask = (j <= i) & (i - j <= window)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
  return y.transpose(1, 2)


def smear(x, w):
  """x[t] += smear_lambda * sigmoid(smear_gate . x[t, :24]) * x[t - 1] for t >= 1, both x before the smear."""
  gate = w["smear_lambda"].to(x.dtype) * torch.sigmoid(linear(x[:, 1:, :SMEAR_CHANNELS], w["smear_gate.weight"]))
  return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)


def _attention_block(w, p, h, idx, ve_name, cos, sin, *, n_head, n_kv_head, qk_scale, window):
  b, t, d = h.shape
  dh = w[p + "attn.c_q.weight"].shape[0] // n_head
  q = linear(h, w[p + "attn.c_q.weight"]).view(b, t, n_head, dh)
  k = linear(h, w[p + "attn.c_k.weight"]).view(b, t, n_kv_head, dh)
  v = linear(h, w[p + "attn.c_v.weight"]).view(b, t, n_kv_head, dh)
  if ve_name is not None:
    ve = F.embedding(idx, w[ve_name]).to(h.dtype).view(b, t, n_kv_head, dh)
    gate = 3 * torch.sigmoid(linear(h[..., :VE_GATE_CHANNELS], w[p + "attn.ve_gate.weight"]))
    v = v + gate[..., None] * ve
  q, k = norm(rotate(q, cos, sin)) * qk_scale, norm(rotate(k, cos, sin)) * qk_scale
  y = attention(q, k, v, window).reshape(b, t, n_head * dh)
  return linear(y, w[p + "attn.c_proj.weight"])


def _mlp_block(w, p, h):
  return linear(F.relu(linear(h, w[p + "mlp.c_fc.weight"])).square(), w[p + "mlp.c_proj.weight"])


def count_layers(w: dict) -> int:
  n = 0
  while f"transformer.h.{n}.attn.c_q.weight" in w:
    n += 1
  return n


def forward(w: dict[str, torch.Tensor], idx: torch.Tensor, *, n_head: int, n_kv_head: int,
            window_pattern: str = "SSSL", sequence_len: int, vocab_size: int, softcap: float = 15.0,
            rope_base: float = 100000.0, qk_scale: float = 1.2, rope_dtype=None,
            windows: list[int] | None = None, dtype=torch.float32) -> torch.Tensor:
  """Logits [B, T, vocab_size] in float32 of nanochat's GPT with float32 weights `w` (nanochat's
  names, see above), computed in `dtype` as nanochat's COMPUTE_DTYPE (see above; RoPE tables in
  `rope_dtype`, None = `dtype`). `windows` overrides the per-layer windows that window_sizes(...)
  would give (a test may want a short last layer, which nanochat's rule never makes)."""
  b, t = idx.shape
  n_layer = count_layers(w)
  if windows is None:
    windows = window_sizes(n_layer, window_pattern, sequence_len)
  assert len(windows) == n_layer and w["lm_head.weight"].shape[0] >= vocab_size
  dh = w["transformer.h.0.attn.c_q.weight"].shape[0] // n_head
  cos, sin = rotary_tables(t, dh, rope_base, dtype=rope_dtype or dtype)
  x = smear(norm(F.embedding(idx, w["transformer.wte.weight"]).to(dtype)), w)
  x0, x_mid = x, None
  for i in range(n_layer):
    p = f"transformer.h.{i}."
    ve_name = f"value_embeds.{i}.weight" if has_value_embed(i, n_layer) else None
    x = w["resid_lambdas"][i] * x + w["x0_lambdas"][i] * x0
    x = x + _attention_block(w, p, norm(x), idx, ve_name, cos, sin, n_head=n_head, n_kv_head=n_kv_head,
                             qk_scale=qk_scale, window=windows[i])
    x = x + _mlp_block(w, p, norm(x))
    if i == n_layer // 2:
      x_mid = x
  x = x - w["backout_lambda"].to(x.dtype) * x_mid
  logits = linear(norm(x), w["lm_head.weight"])[..., :vocab_size].float()
  return softcap * torch.tanh(logits / softcap)


def with_neutral_extras(w: dict[str, torch.Tensor], *, n_kv_head: int) -> dict[str, torch.Tensor]:
  """`w` plus, for each of nanochat's newer parameters it lacks, a value that makes it inert:
  resid_lambdas 1, x0_lambdas 0, smear_lambda 0 (gate weights 0), backout_lambda 0, value
  embeddings 0 (gates 0). A January-style weight dict becomes a current-revision one."""
  out = dict(w)
  n_layer = count_layers(w)
  vp, _ = w["transformer.wte.weight"].shape
  kv_width = w["transformer.h.0.attn.c_k.weight"].shape[0]
  out.setdefault("resid_lambdas", torch.ones(n_layer))
  out.setdefault("x0_lambdas", torch.zeros(n_layer))
  out.setdefault("smear_lambda", torch.zeros(1))
  out.setdefault("smear_gate.weight", torch.zeros(1, SMEAR_CHANNELS))
  out.setdefault("backout_lambda", torch.zeros(1))
  for i in range(n_layer):
    if has_value_embed(i, n_layer):
      out.setdefault(f"value_embeds.{i}.weight", torch.zeros(vp, kv_width))
      out.setdefault(f"transformer.h.{i}.attn.ve_gate.weight", torch.zeros(n_kv_head, VE_GATE_CHANNELS))
  return out


def param_groups(names) -> dict[str, str]:
  """Each nanochat parameter name -> its group in nanochat's setup_optimizer: AdamW groups lm_head,
  wte, value_embeds, resid, x0, smear (smear_gate.weight, smear_lambda, backout_lambda); the Muon
  group matrix for everything under transformer.h (the ve_gate weights included)."""
  fixed = {"lm_head.weight": "lm_head", "transformer.wte.weight": "wte", "resid_lambdas": "resid",
           "x0_lambdas": "x0", "smear_gate.weight": "smear", "smear_lambda": "smear", "backout_lambda": "smear"}

  def group(name: str) -> str:
    if name in fixed:
      return fixed[name]
    if name.startswith("value_embeds."):
      return "value_embeds"
    if name.startswith("transformer.h."):
      return "matrix"
    raise KeyError(f"not a nanochat parameter: {name}")

  return {name: group(name) for name in names}
