"""An independent float64 NumPy forward pass of the lmtiny transformer, written from the math.

It shares nothing with lmtiny's code except the parameter layout it reads: a nested dict as
`nnx.to_pure_dict(nnx.state(model, nnx.Param))` gives it, with per-layer entries either under
integer keys (`layers[i]`) or stacked on a leading layer axis (scan_layers=True).

  embedding:  x = E[token]
  block:      x = x + Attn(RMSNorm(x));  x = x + MLP(RMSNorm(x))
  RMSNorm:    y = x / sqrt(mean(x^2) + eps) (* scale when learned)
  attention:  q = x Wq, k = x Wk, v = x Wv per head; optional RMSNorm over head_dim on q and k;
              RoPE with rotate-half (first half against second half), freq_i = theta^(-i/half);
              query i sees key j iff j <= i and both are in the same segment; query head h uses
              kv head h // (H / K); softmax(q.k / sqrt(Dh)) v; output projection over (h, dh)
  MLP:        relu2 = relu(x)^2, gelu (tanh approximation), silu = x sigmoid(x),
              swiglu = silu(x Wgate) * (x Wup); then Wdown
  logits:     RMSNorm(x) W_lm_head (or E^T when tied); optional cap * tanh(logits / cap)
"""
from __future__ import annotations

import math

import numpy as np

EPS = 1e-6


def to_numpy64(tree):
  """The parameter dict with every leaf as a float64 NumPy array."""
  if isinstance(tree, dict):
    return {k: to_numpy64(v) for k, v in tree.items()}
  return np.asarray(tree, dtype=np.float64)


def rms_norm(x, scale=None):
  y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)
  return y if scale is None else y * scale


def rotary(x_TxNxDh, positions_T, theta):
  half = x_TxNxDh.shape[-1] // 2
  freqs = theta ** (-np.arange(half, dtype=np.float64) / half)
  angles = positions_T.astype(np.float64)[:, None] * freqs[None, :]   # [T, half]
  cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
  a, b = x_TxNxDh[..., :half], x_TxNxDh[..., half:]
  return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
  return x / (1.0 + np.exp(-x))


def softmax(x, axis=-1):
  x = x - np.max(x, axis=axis, keepdims=True)
  e = np.exp(x)
  return e / np.sum(e, axis=axis, keepdims=True)


def allowed_keys(segment_ids_T):
  """[T, T] boolean: query i may attend key j (causal and same segment)."""
  t = len(segment_ids_T)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  return (j <= i) & (segment_ids_T[:, None] == segment_ids_T[None, :])


def attend(q_TxHxDh, k_SxKxDh, v_SxKxDh, allowed_TxS):
  """Softmax attention, one sequence; query head h reads kv head h // (H / K)."""
  t, h, dh = q_TxHxDh.shape
  group = h // k_SxKxDh.shape[1]
  out = np.zeros_like(q_TxHxDh)
  for head in range(h):
    kv = head // group
    scores = q_TxHxDh[:, head, :] @ k_SxKxDh[:, kv, :].T / math.sqrt(dh)
    scores = np.where(allowed_TxS, scores, -np.inf)
    out[:, head, :] = softmax(scores) @ v_SxKxDh[:, kv, :]
  return out


def _scale(p, name, m):
  """A norm's learned scale, or None for the parameter-free RMSNorm (norm_scale=False)."""
  return p[name]["scale"] if m.norm_scale else None


def _layer(params, i):
  layers = params["layers"]
  if 0 in layers or "0" in layers:
    return layers[i] if i in layers else layers[str(i)]
  return _index_tree(layers, i)


def _index_tree(tree, i):
  if isinstance(tree, dict):
    return {k: _index_tree(v, i) for k, v in tree.items()}
  return tree[i]


def _num_layers(params):
  layers = params["layers"]
  if 0 in layers or "0" in layers:
    return len(layers)
  return len(layers["attn"]["q"])


def _mlp(p, x_TxD, activation):
  up = x_TxD @ p["up"]
  if activation == "swiglu":
    hidden = silu(x_TxD @ p["gate"]) * up
  elif activation == "relu2":
    hidden = np.maximum(up, 0.0) ** 2
  elif activation == "gelu":
    hidden = gelu_tanh(up)
  elif activation == "silu":
    hidden = silu(up)
  else:
    raise ValueError(activation)
  return hidden @ p["down"]


def _attention_block(p, x_TxD, positions_T, segment_ids_T, m):
  q = np.einsum("td,dhk->thk", x_TxD, p["q"])
  k = np.einsum("td,dhk->thk", x_TxD, p["k"])
  v = np.einsum("td,dhk->thk", x_TxD, p["v"])
  if m.qk_norm:  # RMSNorm over head_dim, before RoPE
    q = rms_norm(q, _scale(p, "q_norm", m))
    k = rms_norm(k, _scale(p, "k_norm", m))
  q, k = rotary(q, positions_T, m.rope_theta), rotary(k, positions_T, m.rope_theta)
  out = attend(q, k, v, allowed_keys(segment_ids_T))
  return np.einsum("thk,hkd->td", out, p["o"])


def forward(params, m, tokens_BxT, positions_BxT=None, segment_ids_BxT=None):
  """Logits [B, T, V] in float64; `m` is the model ConfigDict (only its flags are read)."""
  params = to_numpy64(params)
  tokens_BxT = np.asarray(tokens_BxT)
  b, t = tokens_BxT.shape
  positions_BxT = np.broadcast_to(np.arange(t), (b, t)) if positions_BxT is None else np.asarray(positions_BxT)
  segment_ids_BxT = np.ones((b, t), np.int64) if segment_ids_BxT is None else np.asarray(segment_ids_BxT)
  embed = params["embed"]
  w_DxV = embed.T if m.tie_embeddings else params["lm_head"]
  logits = []
  for row in range(b):
    x = embed[tokens_BxT[row]]
    for i in range(_num_layers(params)):
      p = _layer(params, i)
      x = x + _attention_block(p["attn"], rms_norm(x, _scale(p, "attn_norm", m)), positions_BxT[row],
                               segment_ids_BxT[row], m)
      x = x + _mlp(p["mlp"], rms_norm(x, _scale(p, "mlp_norm", m)), m.activation)
    z = rms_norm(x, _scale(params, "final_norm", m)) @ w_DxV
    if m.logit_softcap > 0:
      z = m.logit_softcap * np.tanh(z / m.logit_softcap)
    logits.append(z)
  return np.stack(logits)


def cross_entropy(logits_BxTxV, targets_BxT):
  """Mean next-token cross-entropy in nats."""
  z = logits_BxTxV - logits_BxTxV.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return float(-np.take_along_axis(logp, np.asarray(targets_BxT)[..., None], -1).mean())
