"""The same recipe, not only the same model: from the same initial weights and the same batches,
N steps of lmtiny's train step (model with nanochat 2026's knobs + optim.name=normuon) and of
nanochat's (an independent PyTorch forward, tests/nanochat_reference_2026.py, its cross-entropy
and backward, and an independent PyTorch version of its optimizer and schedules,
tests/nanochat_optim_reference.py) give the same losses and weights, fp32 on CPU."""
import jax
import numpy as np
import pytest
from flax import nnx

from lmtiny import config as config_lib
from lmtiny.parallel import sharding
from lmtiny.training.steps import build_steps, device_batch

torch = pytest.importorskip("torch")
import nanochat_optim_reference as optim_ref  # noqa: E402  (needs torch)
import nanochat_reference_2026 as model_ref  # noqa: E402

STEPS, ROWS, SEQ, VOCAB = 8, 4, 256, 200
# Measured over the 8 steps: losses to 1.5e-7 relative; each tensor to 1.6e-4 of the largest norm
# the reference's tensor has in the run (Frobenius norms). Against its norm at the same step
# instead, the one-element smear_lambda read 1e-4 to 5.5e-3 by how XLA happened to round: it goes
# 0.08 -> -0.056 -> -4.6e-5, and at that crossing of zero fp32's 2.5e-7 was 5.5e-3 of its value.
# nanochat's own fp32 run is 1.07e-3 from its float64 run there by the same measure.
LOSS_TOLERANCE, WEIGHT_TOLERANCE = 1e-5, 1e-3


def _difference(a, b, scale=None) -> float:
  """||a - b|| over ||b||, or over `scale` (a norm b reaches at some point of the run)."""
  return float(np.linalg.norm(np.asarray(a) - b) / max(np.linalg.norm(b) if scale is None else scale, 1e-30))


def _config():
  """nanochat_leaderboard_config's recipe at a small size where every schedule moves within 8 steps and
  the short window (128) cuts the 256-token rows."""
  cfg = config_lib.nanochat_leaderboard_config(4)
  cfg.model.update(vocab_size=VOCAB, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, num_layers=5,
                   max_seq_len=512, dtype="float32", remat="none")
  cfg.train.update(seq_len=SEQ, batch_tokens=ROWS * SEQ, steps=STEPS, tokens_per_param=0.0, auto_batch=False,
                   lr_batch_scaling=False, weight_decay_scaling=False, device_batch_size=0)
  cfg.optim.update(warmup_steps=2, decay_fraction=0.5, muon_momentum_warmup=3, muon_ns_dtype="float32")
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  return cfg


def _batches():
  """Learnable rows: counting upwards from a random start (mod the vocab), one token in ten random."""
  rng = np.random.default_rng(0)

  def row():
    r = (rng.integers(0, VOCAB) + np.arange(SEQ + 1)) % VOCAB
    noise = rng.random(SEQ + 1) < 0.1
    return np.where(noise, rng.integers(0, VOCAB, SEQ + 1), r)

  rows = [np.stack([row() for _ in range(ROWS)]).astype(np.int32) for _ in range(STEPS)]
  return [dict(inputs=r[:, :-1], targets=r[:, 1:], segment_ids=np.ones((ROWS, SEQ), np.int32),
               positions=np.broadcast_to(np.arange(SEQ, dtype=np.int32), (ROWS, SEQ)).copy(),
               loss_mask=np.ones((ROWS, SEQ), np.float32)) for r in rows]


def _perturbed(params):
  """nanochat's init plus noise: its zero output projections make every block the identity, and
  the final norm then makes the residual scalars' gradients exactly zero (rounding noise, which
  Adam's first step turns into +-lr either way). Small noise everywhere gives real gradients."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.02 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _ours(cfg, batches):
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  steps = build_steps(cfg, mesh, total_steps=STEPS)
  with jax.set_mesh(mesh):
    state = steps.init()
    state["params"] = _perturbed(state["params"])
    start = nnx.to_pure_dict(jax.device_get(state["params"]))
    losses, weights = [], []
    for batch in batches:
      state, metrics = steps.train_step(state, device_batch(batch, mesh))
      losses.append(float(metrics["loss"]))
      weights.append(model_ref.lmtiny_to_nanochat(nnx.to_pure_dict(jax.device_get(state["params"]))))
  return start, losses, weights


def _theirs(cfg, start, batches):
  torch.set_num_threads(1)
  m, o = cfg.model, cfg.optim
  named = {k: v.clone().requires_grad_(True) for k, v in model_ref.lmtiny_to_nanochat(start).items()}
  groups = optim_ref.param_groups(named, model_dim=m.d_model, unembedding_lr=o.unembed_lr, embedding_lr=o.embed_lr,
                                  matrix_lr=o.lr, weight_decay=o.weight_decay, scalar_lr=o.scalar_lr)
  opt = optim_ref.MuonAdamW(named, groups)
  momentum = dict(warmup=o.muon_momentum_warmup, start=o.muon_momentum_start, peak=o.muon_momentum,
                  final=o.muon_momentum_warmdown)
  losses, weights = [], []
  for it, batch in enumerate(batches):
    logits = model_ref.forward(named, torch.from_numpy(batch["inputs"]).long(), n_head=m.num_heads,
                               n_kv_head=m.num_kv_heads, window_pattern=m.window_pattern, sequence_len=m.max_seq_len,
                               vocab_size=m.vocab_size, rope_base=m.rope_theta, qk_scale=m.qk_scale,
                               dtype=getattr(torch, m.dtype))
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.from_numpy(batch["targets"]).long().reshape(-1))
    grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()))))
    optim_ref.set_schedules(groups, it, num_iterations=STEPS, warmup_steps=o.warmup_steps,
                            warmdown_ratio=o.decay_fraction, final_lr_frac=o.min_lr_ratio,
                            weight_decay=o.weight_decay, momentum=momentum)
    with torch.no_grad():
      opt.step(grads)
    losses.append(float(loss.detach()))
    weights.append({k: v.detach().numpy().copy() for k, v in named.items()})
  return losses, weights


@pytest.mark.slow(seconds=25)
def test_training_trajectory_equals_nanochats():
  cfg = _config()
  batches = _batches()
  start, our_losses, our_weights = _ours(cfg, batches)
  their_losses, their_weights = _theirs(cfg, start, batches)
  np.testing.assert_allclose(our_losses, their_losses, rtol=LOSS_TOLERANCE)
  assert their_losses[-1] < their_losses[0] - 0.1  # it learns: the steps do something
  largest = {k: max(np.linalg.norm(theirs[k]) for theirs in their_weights) for k in their_weights[0]}
  worst = max(_difference(ours[k], theirs[k], largest[k]) for ours, theirs in zip(our_weights, their_weights)
              for k in theirs)
  assert worst < WEIGHT_TOLERANCE, worst
  moved = sorted(_difference(their_weights[-1][k], start_value.numpy())
                 for k, start_value in model_ref.lmtiny_to_nanochat(start).items())
  assert moved[len(moved) // 2] > 10 * WEIGHT_TOLERANCE, moved  # most tensors moved far beyond the tolerance
