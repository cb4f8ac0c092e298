"""An independent PyTorch forward pass of nanochat's GPT (karpathy/nanochat at 962b6bf, 2026-01-04:
before value embeddings and per-layer residual scalars), written here from its description, and
the mapping of lmtiny weights into it.

nanochat's forward: x = norm(wte[idx]); per block x += c_proj(attn(norm(x))), x += mlp(norm(x));
logits = 15 * tanh(lm_head(norm(x)) / 15). `norm` is F.rms_norm without weight and eps=None
(torch's float32 machine epsilon). Attention: q, k, v = c_q/c_k/c_v(x) viewed as heads; RoPE with
cos/sin of positions * 10000 ** (-2i / Dh) applied as (x1 cos + x2 sin, -x1 sin + x2 cos) over
the two halves of each head (a rotation by -theta); then QK-norm (parameter-free RMSNorm over the
head dim); causal softmax(q k^T / sqrt(Dh)) v; heads side by side into c_proj. MLP: c_proj(relu(c_fc(x))^2).
nanochat keeps its cos/sin tables in bfloat16; `rope_dtype` defaults to float32 so that fp32
forwards can be compared (pass torch.bfloat16 for nanochat's exact tables).

Weight mapping, lmtiny (Flax, x @ W) -> nanochat (torch.nn.Linear, x @ W.T), H heads of Dh:
  embed [V, D]                    -> transformer.wte.weight [V, D]        (as is)
  layers/i/attn/q [D, H, Dh]      -> h[i].attn.c_q.weight [H*Dh, D]       (second half of each head
  layers/i/attn/k [D, K, Dh]      -> h[i].attn.c_k.weight [K*Dh, D]        negated, flattened, transposed)
  layers/i/attn/v [D, K, Dh]      -> h[i].attn.c_v.weight [K*Dh, D]       (flattened, transposed)
  layers/i/attn/o [H, Dh, D]      -> h[i].attn.c_proj.weight [D, H*Dh]    (flattened, transposed)
  layers/i/mlp/up [D, F]          -> h[i].mlp.c_fc.weight [F, D]          (transposed)
  layers/i/mlp/down [F, D]        -> h[i].mlp.c_proj.weight [D, F]        (transposed)
  lm_head [D, V]                  -> lm_head.weight [V, D]                (transposed)
Why the negation: lmtiny rotates by +theta, (x1 cos - x2 sin, x2 cos + x1 sin). If nanochat's
projection gives (x1, x2), lmtiny's gives (x1, -x2) and rotates it to (y1, -y2) where nanochat
has (y1, y2): the same attention scores, since the second halves' signs cancel in q . k. Norms
are unchanged by rotation and sign flips, so nanochat's QK-norm after RoPE equals lmtiny's before
RoPE, as long as the norm has no learned scale (model.norm_scale=False, as in nanochat).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def norm(x):
  return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0, dtype=torch.float32):
  inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
  angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
  return angles.cos().to(dtype)[None, :, None, :], angles.sin().to(dtype)[None, :, None, :]


def rotate(x, cos, sin):
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], dim=-1)


def forward(w: dict, idx: torch.Tensor, *, n_head: int, n_kv_head: int, softcap: float = 15.0,
            rope_dtype=torch.float32) -> torch.Tensor:
  """Logits [B, T, V] in float32 of nanochat's GPT with weights `w` (nanochat names, see above)."""
  b, t = idx.shape
  x = norm(F.embedding(idx, w["transformer.wte.weight"]))
  d = x.shape[-1]
  dh = w["transformer.h.0.attn.c_q.weight"].shape[0] // n_head
  cos, sin = rotary_tables(t, dh, dtype=rope_dtype)
  layer = 0
  while f"transformer.h.{layer}.attn.c_q.weight" in w:
    p = f"transformer.h.{layer}."
    h = norm(x)
    q = F.linear(h, w[p + "attn.c_q.weight"]).view(b, t, n_head, dh)
    k = F.linear(h, w[p + "attn.c_k.weight"]).view(b, t, n_kv_head, dh)
    v = F.linear(h, w[p + "attn.c_v.weight"]).view(b, t, n_kv_head, dh)
    q, k = norm(rotate(q, cos, sin)), norm(rotate(k, cos, sin))
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_head != n_kv_head)
    x = x + F.linear(y.transpose(1, 2).reshape(b, t, d), w[p + "attn.c_proj.weight"])
    h = F.relu(F.linear(norm(x), w[p + "mlp.c_fc.weight"])).square()
    x = x + F.linear(h, w[p + "mlp.c_proj.weight"])
    layer += 1
  logits = F.linear(norm(x), w["lm_head.weight"]).float()
  return softcap * torch.tanh(logits / softcap)


def _heads_to_rows(w_DxNxDh, negate_second_half: bool) -> np.ndarray:
  w = np.array(w_DxNxDh, dtype=np.float32)  # a copy
  if negate_second_half:
    w[..., w.shape[-1] // 2:] *= -1
  return w.reshape(w.shape[0], -1).T


def lmtiny_to_nanochat(params: dict) -> dict[str, torch.Tensor]:
  """lmtiny parameters as a nested dict of arrays (nnx.to_pure_dict(state), layers unrolled:
  params["layers"][i]) -> nanochat's names. Also maps the newer revision's parameters where the
  model has them (value embeddings, their gates, the residual / smear / backout scalars; the
  table in tests/nanochat_reference_2026.py); parameters lmtiny lacks are left out."""
  out = {"transformer.wte.weight": np.asarray(params["embed"]), "lm_head.weight": np.asarray(params["lm_head"]).T}
  for name in ("resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda"):
    if name in params:
      out[name] = np.asarray(params[name])
  if "smear_gate" in params:
    out["smear_gate.weight"] = np.asarray(params["smear_gate"]).T
  for i, layer in sorted(params["layers"].items()):
    p, attn, mlp = f"transformer.h.{i}.", layer["attn"], layer["mlp"]
    out[p + "attn.c_q.weight"] = _heads_to_rows(attn["q"], True)
    out[p + "attn.c_k.weight"] = _heads_to_rows(attn["k"], True)
    out[p + "attn.c_v.weight"] = _heads_to_rows(attn["v"], False)
    o = np.asarray(attn["o"])
    out[p + "attn.c_proj.weight"] = o.reshape(-1, o.shape[-1]).T
    out[p + "mlp.c_fc.weight"] = np.asarray(mlp["up"]).T
    out[p + "mlp.c_proj.weight"] = np.asarray(mlp["down"]).T
    if "value_embed" in attn:
      table = np.asarray(attn["value_embed"])
      out[f"value_embeds.{i}.weight"] = table.reshape(table.shape[0], -1)
    if "ve_gate" in attn:
      out[p + "attn.ve_gate.weight"] = np.asarray(attn["ve_gate"]).T
  return {k: torch.tensor(np.asarray(v, dtype=np.float32)) for k, v in out.items()}


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), math.ulp(1.0)))
