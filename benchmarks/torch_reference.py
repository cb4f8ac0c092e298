"""lmtiny's train step side by side with a PyTorch implementation of the same model and update.

    pip install -e ".[bench]"     # torch (CPU wheels are enough)
    python benchmarks/torch_reference.py --config configs/tiny.py [--rounds 10] [--attention sdpa]
    python benchmarks/torch_reference.py --config configs/d20.py --device cuda --dtype bfloat16 \\
        --compile --only torch --steps 5 --json torch-d20.json     # the GPU suite's PyTorch baseline

The PyTorch model mirrors lmtiny.model for the config's shapes: token embedding (optionally
followed by an RMSNorm, model.embed_norm), pre-norm blocks (RMSNorm with a learned scale or,
model.norm_scale=False, none, and model.norm_eps; q/k/v/o projections with optional QK-norm and
half-split RoPE, causal attention, relu^2 / GELU / SiLU / SwiGLU MLP), final norm, untied or tied
lm_head, cross-entropy with the optional logit softcap; AdamW (b1, b2, eps, weight decay on
matrices only) after global-norm clipping, on the same rows x seq_len tokens per step, split into
the config's micro-batches (train.device_batch_size on one device; lmtiny.config.resolve_batch)
whose gradients accumulate before one update. Attention is
`F.scaled_dot_product_attention(is_causal=True)` (what nanochat runs; flash attention on an H100)
or, with `--attention math`, softmax(QK^T + causal mask) V written out.

`--dtype bfloat16` trains the way nanochat's base_train does: float32 parameters and AdamW state,
forward and loss under `torch.autocast(dtype=bfloat16)`, the residual stream in bf16 (the
embedding output is cast, as lmtiny does), norms and RoPE computed in float32, logits cast to
float32 before the softcap and the loss. `--compile` runs the model (forward + loss) through
torch.compile, as nanochat does. What differs from nanochat's base_train: AdamW on every
parameter where nanochat runs Muon on the block matrices (the optimizer is a small share of a
step: one update per 16 micro-steps on d20, Muon's Newton-Schulz iterations under 1% of the
step's FLOPs), float32 embedding table (nanochat keeps it in bf16), no per-group learning rates.

By default both run in one process on the same threads (torch.set_num_threads = the cores XLA:CPU
uses), one step of each in turn, so background load hits both alike; the script prints each
side's median step time and the ratio torch / lmtiny (> 1 means lmtiny is faster). `--only torch`
times the PyTorch side alone (on a GPU the two cannot share memory at d20 size; the suite takes
lmtiny's figure from `python -m lmtiny.bench`). With any option beyond the CPU side-by-side ones
the script also prints tokens/s, MFU in both conventions (lmtiny.plan.counts.train_flops_per_token and
the chip's peak from lmtiny.arch.PEAK_FLOPS) and peak memory per side; `--json PATH` writes them.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str, overrides: list[str]):
  from lmtiny import config as config_lib
  cfg = config_lib.load_file(path)
  for item in overrides:  # section.field=value
    key, value = item.split("=", 1)
    section, field = key.split(".", 1)
    old = cfg[section][field]
    cfg[section][field] = type(old)(value) if not isinstance(old, bool) else value.lower() in ("1", "true")
  return cfg


# ---------------------------------------------------------------------------------------------
# The PyTorch model.


def build_model(cfg, attention: str = "sdpa", compute_dtype=None):
  """The model as a torch.nn.Module whose forward(tokens, targets) returns the mean loss.

  `compute_dtype` (torch.bfloat16 under autocast, else None) is the residual stream's dtype.
  Parameters are created on torch's current default device (`with torch.device(...)`).
  """
  import torch
  import torch.nn.functional as F
  from torch import nn

  from lmtiny import config as config_lib
  m = cfg.model
  d, h, k, dh = m.d_model, m.num_heads, config_lib.num_kv_heads(m), config_lib.head_dim(m)
  f = config_lib.mlp_dim(m)
  eps = m.get("norm_eps", 1e-6)

  class RMSNorm(nn.Module):
    """In float32, back to the input's dtype (lmtiny.model.transformer.RMSNorm); no parameter without norm_scale."""

    def __init__(self, dim):
      super().__init__()
      self.scale = nn.Parameter(torch.ones(dim)) if m.norm_scale else None

    def forward(self, x):
      x32 = x.float()
      y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
      return (y * self.scale if self.scale is not None else y).type_as(x)

  def rope(x, cos, sin):  # lmtiny.model.transformer.apply_rope: first half against second half, in float32
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)

  def activation(up):
    if m.activation == "relu2":
      return F.relu(up).square()
    if m.activation == "gelu":
      return F.gelu(up, approximate="tanh")
    return F.silu(up)

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
      self.q, self.k, self.v = nn.Linear(d, h * dh, bias=False), nn.Linear(d, k * dh, bias=False), \
          nn.Linear(d, k * dh, bias=False)
      self.o = nn.Linear(h * dh, d, bias=False)
      self.q_norm, self.k_norm = (RMSNorm(dh), RMSNorm(dh)) if m.qk_norm else (None, None)
      self.up = nn.Linear(d, f, bias=False)
      self.gate = nn.Linear(d, f, bias=False) if m.activation == "swiglu" else None
      self.down = nn.Linear(f, d, bias=False)

    def forward(self, x, cos, sin, mask):
      b, t, _ = x.shape
      y = self.attn_norm(x)
      q = self.q(y).view(b, t, h, dh)
      kk = self.k(y).view(b, t, k, dh)
      v = self.v(y).view(b, t, k, dh)
      if self.q_norm is not None:  # before RoPE, as lmtiny (the same as after it without a scale)
        q, kk = self.q_norm(q), self.k_norm(kk)
      q, kk = rope(q, cos, sin).transpose(1, 2), rope(kk, cos, sin).transpose(1, 2)
      v = v.transpose(1, 2)
      if k != h:  # query head j reads kv head j // (h / k), as lmtiny's [K, G] split
        kk, v = kk.repeat_interleave(h // k, dim=1), v.repeat_interleave(h // k, dim=1)
      if attention == "sdpa":
        out = F.scaled_dot_product_attention(q, kk, v, is_causal=True)
      else:
        scores = (q @ kk.transpose(-1, -2)) / math.sqrt(dh)
        out = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v
      x = x + self.o(out.transpose(1, 2).reshape(b, t, h * dh))
      y = self.mlp_norm(x)
      hidden = F.silu(self.gate(y)) * self.up(y) if self.gate is not None else activation(self.up(y))
      return x + self.down(hidden)

  class Model(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(m.vocab_size, d)
      self.blocks = nn.ModuleList([Block() for _ in range(m.num_layers)])
      self.final_norm = RMSNorm(d)
      self.lm_head = None if m.tie_embeddings else nn.Linear(d, m.vocab_size, bias=False)
      self.embed_norm = RMSNorm(d) if m.get("embed_norm", False) else None
      for p in self.parameters():
        if p.dim() >= 2:
          nn.init.normal_(p, std=m.init_std)
      # The RoPE tables as lmtiny.model.transformer.rope_tables computes them (NumPy, float32), once.
      half = dh // 2
      table_len = max(m.max_seq_len, cfg.train.seq_len)
      freqs = (np.float32(m.rope_theta) ** (-np.arange(half, dtype=np.float32) / np.float32(half))).astype(np.float32)
      angles = np.arange(table_len, dtype=np.float32)[:, None] * freqs[None, :]
      for name, fn in (("cos", np.cos), ("sin", np.sin)):
        table = torch.tensor(fn(angles), dtype=torch.float32, device=self.embed.weight.device)
        self.register_buffer(name, table[None, :, None, :], persistent=False)

    def forward(self, tokens, targets):
      t = tokens.shape[1]
      cos, sin = self.cos[:, :t], self.sin[:, :t]
      mask = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril() if attention == "math" else None
      x = self.embed(tokens)
      if compute_dtype is not None:  # lmtiny gathers from the float32 table and casts the rows
        x = x.to(compute_dtype)
      if self.embed_norm is not None:
        x = self.embed_norm(x)
      for block in self.blocks:
        x = block(x, cos, sin, mask)
      x = self.final_norm(x)
      logits = F.linear(x, self.embed.weight if self.lm_head is None else self.lm_head.weight)
      logits = logits.float()  # nanochat: softcap and loss in float32
      if m.logit_softcap > 0:
        logits = m.logit_softcap * torch.tanh(logits / m.logit_softcap)
      return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))

  return Model()


def load_lmtiny_params(model, params) -> None:
  """Copies lmtiny parameters (nnx.to_pure_dict of the Param state; layers as a list of blocks
  or stacked under model.scan_layers) into `model` from build_model. lmtiny multiplies x @ W
  with heads as axes, torch.nn.Linear x @ W.T with heads flattened."""
  import torch

  def put(param, value):
    with torch.no_grad():
      param.copy_(torch.from_numpy(np.array(value, dtype=np.float32)))  # a writable copy

  def rows(w):  # [in..., out...] as a Linear weight [out, in]
    w = np.asarray(w, dtype=np.float32)
    return w.reshape(w.shape[0], -1).T

  put(model.embed.weight, params["embed"])
  if model.lm_head is not None:
    put(model.lm_head.weight, np.asarray(params["lm_head"]).T)
  layers = params["layers"]
  stacked = "attn" in layers  # scan_layers: one block whose leaves carry a leading layer axis
  for i, block in enumerate(model.blocks):
    layer = layers if stacked else layers[i] if i in layers else layers[str(i)]
    pick = (lambda x, i=i: np.asarray(x)[i]) if stacked else np.asarray
    attn, mlp = layer["attn"], layer["mlp"]
    for name in ("q", "k", "v"):
      put(getattr(block, name).weight, rows(pick(attn[name])))
    o = pick(attn["o"])
    put(block.o.weight, o.reshape(-1, o.shape[-1]).T)
    for name in ("up", "gate", "down"):
      if getattr(block, name) is not None:
        put(getattr(block, name).weight, pick(mlp[name]).T)
    for norm, tree in ((block.attn_norm, layer.get("attn_norm")), (block.mlp_norm, layer.get("mlp_norm")),
                       (block.q_norm, attn.get("q_norm")), (block.k_norm, attn.get("k_norm"))):
      if norm is not None and norm.scale is not None:  # parameter-free norms have no entry
        put(norm.scale, pick(tree["scale"]))
  for norm, name in ((model.final_norm, "final_norm"), (model.embed_norm, "embed_norm")):
    if norm is not None and norm.scale is not None:
      put(norm.scale, params[name]["scale"])


class TorchTrainer:
  """The PyTorch train step: gradient accumulation over the config's micro-batches, global-norm
  clip, AdamW; float32 or nanochat's bf16 autocast; optionally torch.compile'd."""

  def __init__(self, cfg, *, attention: str = "sdpa", device: str = "cpu", dtype: str = "float32",
               compile: bool = False):  # pylint: disable=redefined-builtin
    import torch

    from lmtiny import config as config_lib
    resolved = config_lib.resolve_batch(cfg, 1).train  # one device: micro = train.device_batch_size
    self.micro, self.accum = config_lib.micro_batch_size(resolved), config_lib.accumulation_steps(resolved)
    self.device, self.dtype = device, dtype
    compute = torch.bfloat16 if dtype == "bfloat16" else None
    with torch.device(device):
      self.model = build_model(cfg, attention, compute)
    self.forward = torch.compile(self.model, dynamic=False) if compile else self.model
    o = cfg.optim
    self.grad_clip = o.grad_clip

    def decayed(n, p):
      return p.dim() >= 2 and "embed" not in n and "lm_head" not in n

    params = list(self.model.named_parameters())
    # fused AdamW on a GPU (nanochat's choice); on CPU foreach, as this script always ran
    kind = {"fused": True} if device == "cuda" else {"foreach": True}
    self.opt = torch.optim.AdamW([{"params": [p for n, p in params if decayed(n, p)], "weight_decay": o.weight_decay},
                                  {"params": [p for n, p in params if not decayed(n, p)], "weight_decay": 0.0}],
                                 lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, **kind)

  def _autocast(self):
    import torch
    if self.dtype == "bfloat16":
      return torch.autocast(self.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()

  def loss_and_grads(self, tokens, targets):
    """Mean loss over the whole batch (a 0-d tensor); gradients accumulated into .grad. Every
    micro-batch holds the same number of tokens, so the mean of the micro-batch means (each
    backward scaled by 1 / accumulation, as nanochat does) is lmtiny's sum / count."""
    total = None
    for i in range(self.accum):
      rows = slice(i * self.micro, (i + 1) * self.micro)
      with self._autocast():
        loss = self.forward(tokens[rows], targets[rows])
      (loss / self.accum if self.accum > 1 else loss).backward()
      total = loss.detach() if total is None else total + loss.detach()
    return total / self.accum if self.accum > 1 else total

  def step(self, tokens, targets) -> float:
    import torch
    self.opt.zero_grad(set_to_none=True)
    loss = self.loss_and_grads(tokens, targets)
    if self.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
    self.opt.step()
    return loss.item()  # waits for the GPU: the step is done when this returns


# ---------------------------------------------------------------------------------------------
# Timing and the report.


def _side_report(times: list[float], first_s: float | None, loss: float, tokens: int, flops: tuple[float, float],
                 peak: float | None, device: str, memory: int | None) -> dict:
  med = statistics.median(times)
  tok_s = tokens / med
  return {"median_step_s": med, "min_step_s": min(times), "step_times": times, "first_step_s": first_s,
          "tokens_per_s": tok_s, "mfu": flops[0] * tok_s / peak if peak else None,
          "mfu_nanochat": flops[1] * tok_s / peak if peak else None, "peak_flops": peak, "device": device,
          "peak_memory_bytes": memory, "final_loss": loss}


def _gib(n) -> str:
  return "n/a" if not n else f"{n / 2**30:.2f} GiB"


def _pct(x) -> str:
  return "n/a" if x is None else f"{100 * x:.3g}%"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/tiny.py")
  ap.add_argument("--rounds", "--steps", type=int, default=10, dest="rounds",
                  help="timed steps of each side (alternating when both run)")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each side first")
  ap.add_argument("--attention", choices=("sdpa", "math"), default="sdpa")
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (XLA:CPU uses all cores)")
  ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="the PyTorch side's device")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                  help="bfloat16: autocast with float32 master weights (torch), model.dtype=bfloat16 (lmtiny)")
  ap.add_argument("--compile", action="store_true", help="torch.compile the PyTorch model")
  ap.add_argument("--only", choices=("torch", "lmtiny", "both"), default="both")
  ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
  ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config override")
  args = ap.parse_args(argv)
  if args.rounds < 1 or args.warmup < 0:
    ap.error("--rounds/--steps must be >= 1 and --warmup >= 0")
  # The historical CPU side-by-side prints its four lines and nothing else (the README quotes them).
  detailed = (args.device, args.dtype, args.compile, args.only, args.json) != ("cpu", "float32", False, "both", None)
  sides = ("lmtiny", "torch") if args.only == "both" else (args.only,)
  if "lmtiny" not in sides:  # jax must not claim the GPU the PyTorch side runs on; it only makes tokens here
    os.environ["JAX_PLATFORMS"] = "cpu"
  elif args.device == "cuda":  # both on one GPU: jax must not preallocate 75% of it
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

  import torch  # before jax: its CUDA libraries are the ones loaded first
  from lmtiny.plan import counts
  from lmtiny.training import benchmark as bench
  from lmtiny.fs import atomic as files
  from lmtiny.runs import metrics as metrics_lib
  from lmtiny import config as config_lib

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  if args.device == "cuda":
    if not torch.cuda.is_available():
      print("error: --device cuda: torch sees no CUDA device", file=sys.stderr)
      return 2
    torch.set_float32_matmul_precision("high")  # as nanochat: TF32 for what autocast leaves in float32
  cfg = load_config(args.config, args.set)
  if cfg.optim.name != "adamw":  # the PyTorch side implements AdamW: time the same update
    if "lmtiny" in sides:
      print(f"lmtiny runs optim.name=adamw here (the config says {cfg.optim.name})")
    else:
      print(f"the PyTorch side runs AdamW on every parameter (the config says {cfg.optim.name}; nanochat runs Muon "
            "on the block matrices)")
    cfg.optim.name = "adamw"
  cfg.model.dtype = args.dtype
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  config_lib.validate(cfg)
  t = cfg.train
  rows = config_lib.global_batch_size(t)
  local = bench.synthetic_batch(cfg, rows)
  flops = (counts.train_flops_per_token(cfg.model, t.seq_len), counts.train_flops_per_token(cfg.model, t.seq_len, "nanochat"))

  runners, devices, peaks = {}, {}, {}
  losses, times, first = {}, {name: [] for name in sides}, {}
  if "torch" in sides:
    trainer = TorchTrainer(cfg, attention=args.attention, device=args.device, dtype=args.dtype, compile=args.compile)
    tokens_pt = torch.from_numpy(local["inputs"].astype(np.int64)).to(args.device)
    targets_pt = torch.from_numpy(local["targets"].astype(np.int64)).to(args.device)
    devices["torch"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    chip = metrics_lib.chip_name(SimpleNamespace(device_kind=devices["torch"]))  # "NVIDIA H100 80GB HBM3" -> h100
    peaks["torch"] = counts.PEAK_FLOPS[chip] if chip else None
    if args.device == "cuda":
      torch.cuda.reset_peak_memory_stats()
    runners["torch"] = lambda: trainer.step(tokens_pt, targets_pt)
  mesh_ctx = contextlib.nullcontext()
  if "lmtiny" in sides:
    import jax
    from lmtiny.parallel import sharding
    from lmtiny.training.steps import build_steps, device_batch
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    steps = build_steps(cfg, mesh, total_steps=args.rounds + args.warmup + 1)
    mesh_ctx = jax.set_mesh(mesh)
    devices["lmtiny"] = jax.devices()[0].device_kind
    chip = metrics_lib.chip_name()  # one device's peak: the step runs on jax.devices()[0] alone
    peaks["lmtiny"] = counts.PEAK_FLOPS[chip] if chip else None
    with mesh_ctx:
      lm = {"state": steps.init()}
      batch = device_batch(local, mesh)
      compiled = steps.train_step.lower(lm["state"], batch).compile()

    def lmtiny_step():
      lm["state"], out = compiled(lm["state"], batch)
      return float(out["loss"])
    runners["lmtiny"] = lmtiny_step

  with mesh_ctx:
    for i in range(args.warmup + args.rounds):
      order = sides if i % 2 == 0 else sides[::-1]
      for name in order:
        t0 = time.perf_counter()
        losses[name] = runners[name]()
        dt = time.perf_counter() - t0
        first.setdefault(name, dt)  # the first step: torch.compile's compile happens here
        if i >= args.warmup:
          times[name].append(dt)

  memory = {}
  if "torch" in sides and args.device == "cuda":
    memory["torch"] = torch.cuda.max_memory_allocated()
  if "lmtiny" in sides:
    memory["lmtiny"] = bench.peak_memory_bytes()
  report = {name: _side_report(times[name], first[name], losses[name], t.batch_tokens, flops, peaks[name],
                               devices[name], memory.get(name)) for name in sides}
  med = {k: v["median_step_s"] for k, v in report.items()}

  if detailed:
    accum = config_lib.accumulation_steps(config_lib.resolve_batch(cfg, 1).train)
    micro = f" ({accum} micro-batches of {rows // accum})" if accum > 1 else ""
    print(f"config {args.config}: {rows} x {t.seq_len} tokens per step{micro}, {args.dtype}, torch on {args.device}"
          f"{' compiled' if args.compile else ' eager'}, {args.threads} torch threads, torch attention "
          f"{args.attention}, {args.rounds} {'alternating rounds' if len(sides) == 2 else 'timed steps'} after "
          f"{args.warmup} warmup")
  else:
    print(f"config {args.config}: {rows} x {t.seq_len} tokens per step, float32, {args.threads} torch threads, "
          f"torch attention {args.attention}, {args.rounds} alternating rounds")
  for name in sides:
    print(f"  {name:<7} median {1e3 * med[name]:8.1f} ms  min {1e3 * min(times[name]):8.1f} ms  "
          f"(last loss {losses[name]:.3f})")
    if detailed:
      r = report[name]
      print(f"          {r['tokens_per_s']:,.0f} tokens/s, MFU {_pct(r['mfu'])} causal-half, "
            f"{_pct(r['mfu_nanochat'])} nanochat ({r['device']}), first step {r['first_step_s']:.1f} s, "
            f"peak memory {_gib(r['peak_memory_bytes'])}")
  if len(sides) == 2:
    print(f"  speed ratio torch/lmtiny step time: {med['torch'] / med['lmtiny']:.2f}x (> 1: lmtiny faster)")
  if args.json:
    out = {"config": args.config, "overrides": args.set, "seq_len": t.seq_len, "batch_tokens": t.batch_tokens,
           "global_batch": rows, "dtype": args.dtype, "device": args.device, "compile": args.compile,
           "attention": args.attention, "optimizer": "adamw", "params": counts.count_params(cfg.model),
           "flops_per_token": flops[0], "flops_per_token_nanochat": flops[1], "warmup": args.warmup,
           "steps": args.rounds, "sides": report,
           "ratio_torch_over_lmtiny": med["torch"] / med["lmtiny"] if len(sides) == 2 else None}
    resolved = config_lib.resolve_batch(cfg, 1).train
    out.update(micro_batch=config_lib.micro_batch_size(resolved), accumulation=config_lib.accumulation_steps(resolved),
               torch=torch.__version__)
    files.atomic_write_json(args.json, out)
  return 0


if __name__ == "__main__":
  sys.path.insert(0, ROOT)  # lmtiny from this checkout without an install
  sys.exit(main())
