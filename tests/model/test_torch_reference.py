"""benchmarks/torch_reference.py: the PyTorch baseline is lmtiny's model and update, or its figures
mean nothing. Given lmtiny's initialised weights the PyTorch loss equals lmtiny's (fp32, CPU) for
nanochat's choices and lmtiny's others; gradient accumulation equals one big batch; bf16 autocast
and torch.compile run the same model; the CLI keeps its old output and writes --json."""
import json
import os
import re
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmtiny import config as config_lib
from lmtiny.model.transformer import Transformer

from lm_fixtures import ROOT

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import torch_reference as tr  # noqa: E402  (needs torch)



def _cfg(**model):
  """nanochat's choices (embed_norm, parameter-free norms with torch's eps, QK-norm, softcap 15,
  relu^2, untied) at a small size; gpt2 init at a large std so that no block starts as the
  identity (nanochat's init zeroes the output projections) and every weight matters."""
  c = config_lib.nanochat_config(2)
  c.model.update(vocab_size=256, d_model=64, num_heads=2, head_dim=32, max_seq_len=64, dtype="float32",
                 init="gpt2", init_std=0.3, remat="none", scan_layers=False)
  c.model.update(**model)
  c.train.update(seq_len=48, batch_tokens=4 * 48, device_batch_size=0)
  c.optim.name = "adamw"
  return c


def _lmtiny(cfg, seed=0):
  """lmtiny's model with norm scales (where it has them) drawn at random, so that they matter too."""
  model = Transformer(cfg.model, nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  rng = np.random.default_rng(seed)

  def randomize(tree):
    for key, value in tree.items():
      if isinstance(value, dict):
        randomize(value)
      elif key == "scale":
        tree[key] = jnp.asarray(rng.uniform(0.5, 1.5, np.shape(value)), jnp.float32)

  randomize(pure)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return model, pure


def _tokens(cfg, rows=2, seed=0):
  t = np.random.default_rng(seed).integers(0, cfg.model.vocab_size, (rows, cfg.train.seq_len + 1))
  return t[:, :-1], t[:, 1:]


def _lmtiny_loss(model, inputs, targets) -> float:
  ce, _ = model.token_losses(jnp.asarray(inputs), jnp.asarray(targets))
  return float(jnp.mean(ce))


def _torch_loss(cfg, pure, inputs, targets, attention="sdpa") -> float:
  torch.set_num_threads(1)
  model = tr.build_model(cfg, attention)
  tr.load_lmtiny_params(model, pure)
  with torch.no_grad():
    return float(model(torch.from_numpy(inputs), torch.from_numpy(targets)))


@pytest.mark.parametrize("model, attention", [
    ({}, "sdpa"),                                             # nanochat's d20 choices
    ({"num_kv_heads": 1, "scan_layers": True}, "math"),       # MQA; stacked layer parameters
    ({"norm_scale": True, "activation": "swiglu", "tie_embeddings": True, "logit_softcap": 0.0,
      "norm_eps": 1e-6}, "sdpa"),                             # lmtiny's other choices, learned scales
])
def test_loss_equals_lmtiny_given_the_same_weights(model, attention):
  cfg = _cfg(**model)
  lm, pure = _lmtiny(cfg)
  inputs, targets = _tokens(cfg)
  ours, theirs = _lmtiny_loss(lm, inputs, targets), _torch_loss(cfg, pure, inputs, targets, attention)
  assert ours > np.log(cfg.model.vocab_size) + 0.5  # far from uniform: the weights shape the logits
  assert abs(theirs - ours) / ours < 1e-5, (ours, theirs)


@pytest.mark.parametrize("change", [{"embed_norm": False}, {"norm_eps": 1e-1}, {"logit_softcap": 0.0},
                                    {"qk_norm": False}])
def test_each_nanochat_choice_changes_the_loss(change):
  """The equality above is sensitive: a torch model without one of the choices loses differently."""
  cfg = _cfg()
  lm, pure = _lmtiny(cfg)
  inputs, targets = _tokens(cfg)
  other = _cfg(**change)
  assert abs(_torch_loss(other, pure, inputs, targets) - _lmtiny_loss(lm, inputs, targets)) > 1e-3


def _trainer(cfg, **kw):
  torch.manual_seed(0)
  return tr.TorchTrainer(cfg, **kw)


def test_gradient_accumulation_equals_one_big_batch():
  torch.set_num_threads(1)
  whole = _cfg()
  split = _cfg()
  split.train.device_batch_size = 1
  a, b = _trainer(whole), _trainer(split)
  assert (a.accum, a.micro, b.accum, b.micro) == (1, 4, 4, 1)
  inputs, targets = (torch.from_numpy(x) for x in _tokens(whole, rows=4, seed=1))
  for t in (a, b):
    t.opt.zero_grad(set_to_none=True)
  la, lb = float(a.loss_and_grads(inputs, targets)), float(b.loss_and_grads(inputs, targets))
  assert abs(la - lb) / la < 1e-6
  for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
    np.testing.assert_allclose(pb.grad.numpy(), pa.grad.numpy(), rtol=1e-4, atol=1e-6 * pa.grad.abs().max().item(),
                               err_msg=name)
  for t in (a, b):
    t.opt.zero_grad(set_to_none=True)
  a.step(inputs, targets), b.step(inputs, targets)  # one update each, then the loss it leads to
  la, lb = a.step(inputs, targets), b.step(inputs, targets)
  assert abs(la - lb) / la < 1e-5, (la, lb)


def test_bfloat16_autocast_runs_the_same_model():
  torch.set_num_threads(1)
  cfg = _cfg()
  f32, bf16 = _trainer(cfg), _trainer(cfg, dtype="bfloat16")
  bf16.model.load_state_dict(f32.model.state_dict())
  assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # master weights stay float32
  inputs, targets = (torch.from_numpy(x) for x in _tokens(cfg, rows=4))
  l32, l16 = float(f32.loss_and_grads(inputs, targets)), float(bf16.loss_and_grads(inputs, targets))
  assert l32 != l16 and abs(l16 - l32) / l32 < 2e-2
  assert all(p.grad.dtype == torch.float32 for p in bf16.model.parameters())


@pytest.mark.slow(seconds=5)
def test_compiled_model_equals_eager():
  """torch.compile traces the model (what the GPU suite runs with --compile); the tiniest size:
  compiling costs ~20 s on a 2-core CPU."""
  from torch._dynamo.utils import counters
  torch.set_num_threads(2)
  torch._dynamo.reset()
  counters.clear()
  cfg = _cfg(num_layers=1, d_model=32, num_heads=1)
  cfg.train.update(seq_len=16, batch_tokens=2 * 16, device_batch_size=1)
  eager, compiled = _trainer(cfg), _trainer(cfg, compile=True)
  inputs, targets = (torch.from_numpy(x) for x in _tokens(cfg))
  le, lc = float(eager.loss_and_grads(inputs, targets)), float(compiled.loss_and_grads(inputs, targets))
  assert abs(le - lc) / le < 1e-5, (le, lc)
  compiled.loss_and_grads(inputs, targets)
  # One graph for every micro-batch (each a view at another offset) and step: no recompiles, no
  # silent fallback to eager once torch's recompile limit is hit.
  assert compiled.accum == 2 and counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def _small_flags():
  return ["--config", os.path.join(ROOT, "configs/tiny.py"), "--set", "model.num_layers=1", "--set",
          "train.seq_len=64", "--set", "train.batch_tokens=512", "--steps", "2", "--warmup", "1"]


def test_cli_default_output_is_the_four_lines_it_always_printed(capsys):
  assert tr.main(_small_flags()) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "lmtiny runs optim.name=adamw here (the config says muon)"
  assert re.fullmatch(r"config \S+tiny.py: 8 x 64 tokens per step, float32, \d+ torch threads, "
                      r"torch attention sdpa, 2 alternating rounds", lines[1]), lines[1]
  for line, name in zip(lines[2:4], ("lmtiny", "torch")):
    assert re.fullmatch(rf"  {name} +median +[\d.]+ ms  min +[\d.]+ ms  \(last loss [\d.]+\)", line), line
  assert re.fullmatch(r"  speed ratio torch/lmtiny step time: [\d.]+x \(> 1: lmtiny faster\)", lines[4])
  assert len(lines) == 5


def test_cli_torch_only_writes_json(tmp_path, capsys):
  path = tmp_path / "torch.json"
  flags = _small_flags() + ["--set", "train.device_batch_size=4", "--only", "torch", "--json", str(path)]
  assert tr.main(flags) == 0
  out = capsys.readouterr().out
  assert "tokens/s" in out and "lmtiny " not in out
  r = json.loads(path.read_text())
  assert (r["global_batch"], r["micro_batch"], r["accumulation"], r["seq_len"]) == (8, 4, 2, 64)
  assert list(r["sides"]) == ["torch"] and r["ratio_torch_over_lmtiny"] is None
  side = r["sides"]["torch"]
  assert side["tokens_per_s"] == pytest.approx(512 / side["median_step_s"])
  assert side["device"] == "cpu" and side["mfu"] == pytest.approx(r["flops_per_token"] * side["tokens_per_s"] / 1e12)
  assert len(side["step_times"]) == 2 and side["mfu_nanochat"] > side["mfu"]
