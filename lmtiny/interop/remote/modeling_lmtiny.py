"""lmtiny's decoder-only transformer in PyTorch for transformers (trust_remote_code), the same
function as lmtiny.model.transformer.Transformer for every configuration lmtiny trains. Load it with

  AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

(config.json's auto_map names this file for both the config and the model: one file, because
lmtiny keeps it in its own package, whose import rules allow no relative import). Weights are
stored as transformers' nn.Linear keeps them ([out, in]); every RMSNorm, gate and scalar mix runs in
float32 and is cast back to the activations' dtype, as lmtiny does. Attention is
torch.nn.functional.scaled_dot_product_attention under an explicit boolean mask (causal, the
layer's window, the padding mask), over a DynamicCache that keeps every key. Generation passes the
token before the new ones (`previous_input_ids`) so that smear sees it; value embeddings need
`input_ids` (not `inputs_embeds`).

`python -m lmtiny.export` writes it (model_type "lmtiny") for the architectures transformers'
own NanoChat and Llama classes do not express: sliding windows, value embeddings, residual
scalars, smear, backout, learned or absent norms, QK-norm and its scale (after RoPE, or before it
with a learned weight), SwiGLU with any of these. LmtinyConfig uses transformers' names where they
exist (hidden_size, num_hidden_layers, rms_norm_eps, final_logit_softcapping, ...); the rest:
  hidden_act            relu2 | gelu_pytorch_tanh | silu | swiglu (silu(gate_proj x) * fc1 x)
  norm_scale            RMSNorms carry a learned weight (False: parameter-free)
  qk_norm, qk_scale     RMSNorm over each query and key head, after RoPE (before it if weighted);
                        then q, k x qk_scale
  embed_norm            an RMSNorm right after the token embedding
  attention_windows     per layer: query i sees keys i - w .. i (0: the whole causal context)
  value_embed_layers    layers whose v gets 3 * sigmoid(ve_gate(h[:, :ve_gate_channels])) x a
                        per-layer [vocab, kv heads x head_dim] table row of the token
  residual_scalars      x = resid_lambdas[i] * x + x0_lambdas[i] * x0 before layer i (x0: the
                        embedded input)
  smear, smear_channels x[t] += smear_lambda * sigmoid(smear_gate(x[t, :smear_channels])) * x[t-1]
  backout_layer         x -= backout_lambda * (the output of that layer) before the final norm;
                        null: off
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers renamed the cache field past_key_values -> cache (5.x): output under the one it has
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class LmtinyConfig(PretrainedConfig):
  model_type = "lmtiny"

  def __init__(self, vocab_size=32768, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=None, head_dim=None, hidden_act="relu2",
               max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0, norm_scale=True,
               qk_norm=False, qk_scale=1.0, embed_norm=False, final_logit_softcapping=None,
               attention_windows=None, value_embed_layers=(), ve_gate_channels=12, residual_scalars=False,
               smear=False, smear_channels=24, backout_layer=None, tie_word_embeddings=False, use_cache=True,
               initializer_range=0.02, **kwargs):
    self.vocab_size = vocab_size
    self.hidden_size = hidden_size
    self.intermediate_size = intermediate_size
    self.num_hidden_layers = num_hidden_layers
    self.num_attention_heads = num_attention_heads
    self.num_key_value_heads = num_key_value_heads or num_attention_heads
    self.head_dim = head_dim or hidden_size // num_attention_heads
    self.hidden_act = hidden_act
    self.max_position_embeddings = max_position_embeddings
    self.rms_norm_eps = rms_norm_eps
    self.rope_theta = rope_theta
    self.norm_scale = norm_scale
    self.qk_norm = qk_norm
    self.qk_scale = qk_scale
    self.embed_norm = embed_norm
    self.final_logit_softcapping = final_logit_softcapping
    self.attention_windows = list(attention_windows or [0] * num_hidden_layers)
    self.value_embed_layers = list(value_embed_layers)
    self.ve_gate_channels = ve_gate_channels
    self.residual_scalars = residual_scalars
    self.smear = smear
    self.smear_channels = smear_channels
    self.backout_layer = backout_layer
    self.use_cache = use_cache
    self.initializer_range = initializer_range
    super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class LmtinyRMSNorm(nn.Module):
  """x / rms(x) in float32, times a learned weight when the config has norm_scale."""

  def __init__(self, dim, eps, learned_scale):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim)) if learned_scale else None

  def forward(self, x):
    x32 = x.float()
    y = x32 * torch.rsqrt((x32 * x32).mean(-1, keepdim=True) + self.eps)
    if self.weight is not None:
      y = y * self.weight.float()
    return y.to(x.dtype)


def rope_tables(position_ids, head_dim, theta):
  """(cos, sin) [B, T, 1, head_dim / 2] in float32: angles position * theta ** (-i / (head_dim / 2))."""
  half = head_dim // 2
  freqs = torch.tensor(theta, dtype=torch.float32) ** (-torch.arange(half, dtype=torch.float32) / half)
  angles = position_ids.to(torch.float32)[..., None] * freqs.to(position_ids.device)
  return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rope(x, cos, sin):
  """Rotates the first half of each head [B, T, N, Dh] against the second half."""
  x1, x2 = x.float().chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def attention_mask_4d(query_positions, key_count, window, padding_mask):
  """Boolean [B, 1, T, S]: key j <= query i, j >= i - window (window > 0), key not padding; a
  query always sees itself (a padded row then attends to itself, not to nothing)."""
  keys = torch.arange(key_count, device=query_positions.device)
  q, k = query_positions[:, None], keys[None, :]
  allowed = k <= q
  if window:
    allowed = allowed & (k >= q - window)
  allowed = allowed[None]
  if padding_mask is not None:
    allowed = allowed & (padding_mask[:, None, -key_count:].bool() | (k == q)[None])
  return allowed[:, None]


class LmtinyAttention(nn.Module):

  def __init__(self, config, layer):
    super().__init__()
    d, h, kv, dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    self.layer, self.heads, self.kv_heads, self.head_dim = layer, h, kv, dh
    self.window = config.attention_windows[layer]
    self.qk_scale = config.qk_scale
    self.q_proj = nn.Linear(d, h * dh, bias=False)
    self.k_proj = nn.Linear(d, kv * dh, bias=False)
    self.v_proj = nn.Linear(d, kv * dh, bias=False)
    self.o_proj = nn.Linear(h * dh, d, bias=False)
    if config.qk_norm:
      self.q_norm = LmtinyRMSNorm(dh, config.rms_norm_eps, config.norm_scale)
      self.k_norm = LmtinyRMSNorm(dh, config.rms_norm_eps, config.norm_scale)
    else:
      self.q_norm = self.k_norm = None
    if layer in config.value_embed_layers:
      self.ve_channels = config.ve_gate_channels
      self.value_embed = nn.Embedding(config.vocab_size, kv * dh)
      self.ve_gate = nn.Linear(self.ve_channels, kv, bias=False)
    else:
      self.value_embed = self.ve_gate = None

  def forward(self, x, input_ids, rope, query_positions, padding_mask, cache):
    b, t, _ = x.shape
    q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
    k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
    v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
    if self.value_embed is not None:
      if input_ids is None:
        raise ValueError("this model's value embeddings look up token ids: pass input_ids, not inputs_embeds")
      gate = 3 * torch.sigmoid(self.ve_gate(x[..., :self.ve_channels]).float())
      ve = self.value_embed(input_ids).view(b, t, self.kv_heads, self.head_dim)
      v = (v.float() + gate[..., None] * ve.float()).to(x.dtype)
    rotate_first = self.q_norm is None or self.q_norm.weight is None  # a weightless norm commutes with RoPE
    if rotate_first:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.qk_scale != 1.0:
      q, k = (q.float() * self.qk_scale).to(x.dtype), (k.float() * self.qk_scale).to(x.dtype)
    if not rotate_first:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # [B, N, T, Dh]
    if cache is not None:
      k, v = cache.update(k, v, self.layer)
    groups = self.heads // self.kv_heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    mask = attention_mask_4d(query_positions, k.shape[2], self.window, padding_mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(self.head_dim))
    return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class LmtinyMLP(nn.Module):

  def __init__(self, config):
    super().__init__()
    self.act = config.hidden_act
    if self.act not in ("relu2", "gelu_pytorch_tanh", "silu", "swiglu"):
      raise ValueError(f"hidden_act={self.act!r}: lmtiny's MLPs are relu2, gelu_pytorch_tanh, silu or swiglu")
    self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
    self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False) if self.act == "swiglu" else None
    self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

  def forward(self, x):
    up = self.fc1(x)
    if self.act == "swiglu":
      hidden = F.silu(self.gate_proj(x)) * up
    elif self.act == "relu2":
      hidden = torch.square(F.relu(up))
    elif self.act == "gelu_pytorch_tanh":
      hidden = F.gelu(up, approximate="tanh")
    else:
      hidden = F.silu(up)
    return self.fc2(hidden)


class LmtinyDecoderLayer(nn.Module):

  def __init__(self, config, layer):
    super().__init__()
    self.input_layernorm = LmtinyRMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_scale)
    self.self_attn = LmtinyAttention(config, layer)
    self.post_attention_layernorm = LmtinyRMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_scale)
    self.mlp = LmtinyMLP(config)

  def forward(self, x, input_ids, rope, query_positions, padding_mask, cache):
    x = x + self.self_attn(self.input_layernorm(x), input_ids, rope, query_positions, padding_mask, cache)
    return x + self.mlp(self.post_attention_layernorm(x))


class LmtinyPreTrainedModel(PreTrainedModel):
  config_class = LmtinyConfig
  base_model_prefix = "model"
  _no_split_modules = ["LmtinyDecoderLayer"]

  def _init_weights(self, module):
    std = self.config.initializer_range
    if isinstance(module, (nn.Linear, nn.Embedding)):
      nn.init.normal_(module.weight, mean=0.0, std=std)


class LmtinyModel(LmtinyPreTrainedModel):
  """Token ids -> the final norm's output [B, T, D]."""

  def __init__(self, config):
    super().__init__(config)
    d, layers = config.hidden_size, config.num_hidden_layers
    self.embed_tokens = nn.Embedding(config.vocab_size, d)
    self.embed_norm = LmtinyRMSNorm(d, config.rms_norm_eps, config.norm_scale) if config.embed_norm else None
    self.layers = nn.ModuleList([LmtinyDecoderLayer(config, i) for i in range(layers)])
    self.norm = LmtinyRMSNorm(d, config.rms_norm_eps, config.norm_scale)
    self.resid_lambdas = nn.Parameter(torch.ones(layers)) if config.residual_scalars else None
    self.x0_lambdas = nn.Parameter(torch.zeros(layers)) if config.residual_scalars else None
    if config.smear:
      self.smear_gate = nn.Linear(config.smear_channels, 1, bias=False)
      self.smear_lambda = nn.Parameter(torch.zeros(1))
    else:
      self.smear_gate = self.smear_lambda = None
    self.backout_lambda = nn.Parameter(torch.zeros(1)) if config.backout_layer is not None else None
    self.post_init()

  def get_input_embeddings(self):
    return self.embed_tokens

  def set_input_embeddings(self, value):
    self.embed_tokens = value

  def embed(self, input_ids):
    x = self.embed_tokens(input_ids)
    return x if self.embed_norm is None else self.embed_norm(x)

  def smear(self, x, position_ids, previous):
    """x[t] += smear_lambda * sigmoid(smear_gate(x[t, :C])) * x[t - 1] where position > 0;
    `previous` is the embedding before x[0] (None: zeros)."""
    if previous is None:
      previous = torch.zeros_like(x[:, :1])
    x_prev = torch.cat([previous.to(x.dtype), x[:, :-1]], dim=1)
    gate = self.smear_lambda.float() * torch.sigmoid(self.smear_gate(x[..., :self.config.smear_channels]).float())
    mixed = torch.where(position_ids[..., None] > 0, gate * x_prev.float(), torch.zeros((), device=x.device))
    return (x.float() + mixed).to(x.dtype)

  def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
              use_cache=None, previous_input_ids=None, past_key_values=None, **kwargs):
    cache = cache if cache is not None else past_key_values
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    use_cache = self.config.use_cache if use_cache is None else use_cache
    if use_cache and cache is None:
      cache = DynamicCache(config=self.config)
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
    b, t = x.shape[:2]
    past = cache.get_seq_length() if cache is not None else 0
    query_positions = torch.arange(past, past + t, device=x.device)
    if position_ids is None:
      position_ids = query_positions[None].expand(b, t)
    if self.smear_gate is not None:
      if past and previous_input_ids is None:
        raise ValueError("smear mixes in the token before the new ones: pass previous_input_ids [B, 1] "
                         "when continuing from a cache (generate does)")
      previous = self.embed(previous_input_ids) if previous_input_ids is not None else None
      x = self.smear(x, position_ids, previous)
    rope = rope_tables(position_ids, self.config.head_dim, self.config.rope_theta)
    x0, x_mid = x, None
    for i, layer in enumerate(self.layers):
      if self.resid_lambdas is not None:
        x = (self.resid_lambdas[i].float() * x.float() + self.x0_lambdas[i].float() * x0.float()).to(x.dtype)
      x = layer(x, input_ids, rope, query_positions, attention_mask, cache)
      if i == self.config.backout_layer:
        x_mid = x
    if self.backout_lambda is not None:
      x = (x.float() - self.backout_lambda.float() * x_mid.float()).to(x.dtype)
    return self.norm(x), cache


class LmtinyForCausalLM(LmtinyPreTrainedModel, GenerationMixin):
  _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

  def __init__(self, config):
    super().__init__(config)
    self.model = LmtinyModel(config)
    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    self.post_init()

  def get_input_embeddings(self):
    return self.model.embed_tokens

  def set_input_embeddings(self, value):
    self.model.embed_tokens = value

  def get_output_embeddings(self):
    return self.lm_head

  def set_output_embeddings(self, value):
    self.lm_head = value

  def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
    inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
    new = inputs.get("input_ids")
    if self.config.smear and new is not None and 0 < new.shape[1] < input_ids.shape[1]:
      inputs["previous_input_ids"] = input_ids[:, -new.shape[1] - 1:-new.shape[1]]
    return inputs

  def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
              labels=None, use_cache=None, logits_to_keep=0, previous_input_ids=None, past_key_values=None,
              **kwargs):
    hidden, cache = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                               use_cache=use_cache, previous_input_ids=previous_input_ids)
    if logits_to_keep:
      hidden = hidden[:, -logits_to_keep:]
    logits = self.lm_head(hidden).float()
    cap = self.config.final_logit_softcapping
    if cap:
      logits = cap * torch.tanh(logits / cap)
    loss = None
    if labels is not None:
      loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                             ignore_index=-100)
    return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
