"""normuon (nanochat's 2026 optimizer): N steps of lmtiny's optimizer and of an independent
PyTorch version of nanochat's (tests/nanochat_optim_reference.py) from the same weights and
gradients give the same weights; each piece matters; the schedules, the groups, the sharded
update and the config checks."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lm_fixtures import memory_data, tiny_config
from lmtiny import config as config_lib
from lmtiny.data.pipeline import make_train_iterator
from lmtiny.errors import ConfigError
from lmtiny.parallel import sharding
from lmtiny.training import normuon
from lmtiny.training.optim import lr_schedule, make_optimizer
from lmtiny.training.steps import build_steps, device_batch

torch = pytest.importorskip("torch")
import nanochat_optim_reference as ref  # noqa: E402  (needs torch)
import nanochat_reference as mapping  # noqa: E402

# fp32 on CPU: the largest |ours - reference| over a tensor's largest |reference| entry, over
# every tensor and every step of the 12-step trajectory. Measured: 3.4e-6 (backout_lambda as it
# passes near 0, 4e-8 absolute; the matrices 1.6e-6): float32 rounding.
TOLERANCE = 1e-5
STEPS = TOTAL = 12
D, H, K, DH, F, V, L = 32, 4, 2, 8, 128, 64, 4
MOMENTUM = dict(warmup=4, start=0.85, peak=0.97, final=0.90)


def _optim(**changes):
  """A short horizon where every schedule moves: LR warmup over 3 steps and warmdown over the
  last 6 (to 5%), momentum 0.85 -> 0.97 over 4 steps and down to 0.90, cosine weight decay."""
  o = config_lib.base_config().optim
  o.update(name="normuon", lr=0.02, embed_lr=0.3, unembed_lr=0.008, scalar_lr=0.5, smear_lr=0.2,
           scale_lr_by_width=True, weight_decay=0.5, weight_decay_schedule="cosine", cautious_weight_decay=True,
           grad_clip=0.0, schedule="warmdown", warmup_steps=3, decay_fraction=0.5, min_lr_ratio=0.05,
           muon_momentum_start=MOMENTUM["start"], muon_momentum=MOMENTUM["peak"],
           muon_momentum_warmup=MOMENTUM["warmup"], muon_momentum_warmdown=MOMENTUM["final"], muon_beta2=0.9,
           muon_ns_steps=5, muon_ns_dtype="float32")
  o.update(**changes)
  return o


def _param(value, *axes):
  return nnx.Param(jnp.asarray(value, jnp.float32), logical_axes=axes)


def _tree(seed=0) -> dict:
  """nanochat 2026's parameters in lmtiny's layout and names: 4 layers, value embeddings on
  layers 1 and 3, q/o square, k/v wide ([D, K*Dh] with K*Dh < D), up tall, down and ve_gate wide."""
  rng = np.random.default_rng(seed)

  def uniform(shape, fan_in):
    bound = (3 / fan_in) ** 0.5
    return rng.uniform(-bound, bound, shape)

  layers = {}
  for i in range(L):
    attn = {"q": _param(uniform((D, H, DH), D), "embed", "heads", "head_dim"),
            "k": _param(uniform((D, K, DH), D), "embed", "kv_heads", "head_dim"),
            "v": _param(uniform((D, K, DH), D), "embed", "kv_heads", "head_dim"),
            "o": _param(uniform((H, DH, D), H * DH), "heads", "head_dim", "embed")}
    if i % 2 == (L - 1) % 2:
      attn["value_embed"] = _param(uniform((V, K, DH), D), "embed_vocab", "kv_heads", "head_dim")
      attn["ve_gate"] = _param(rng.uniform(0, 0.02, (12, K)), None, "kv_heads")
    layers[i] = {"attn": attn, "mlp": {"up": _param(uniform((D, F), D), "embed", "mlp"),
                                       "down": _param(uniform((F, D), F), "mlp", "embed")}}
  return {"embed": _param(rng.normal(0, 0.8, (V, D)), "embed_vocab", "embed"),
          "lm_head": _param(rng.normal(0, 0.01, (D, V)), "embed", "vocab"), "layers": layers,
          "resid_lambdas": _param(1.15 - 0.1 * np.arange(L) / (L - 1), None),
          "x0_lambdas": _param(0.2 - 0.15 * np.arange(L) / (L - 1), None),
          "smear_gate": _param(rng.uniform(0, 0.02, (24, 1)), None, None),
          "smear_lambda": _param(np.zeros(1), None), "backout_lambda": _param(np.full(1, 0.2), None)}


def _grads(tree, steps=STEPS, seed=1):
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), tree) for _ in range(steps)]


def _nanochat(tree) -> dict:
  """The tree in nanochat's names and layout (as torch tensors)."""
  return mapping.lmtiny_to_nanochat(jax.tree.map(lambda v: np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v),
                                                 tree, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _ours(o, tree, grads):
  """Weights after each step (nanochat's layout), lmtiny's optimizer."""
  tx, _ = make_optimizer(o, D, TOTAL)

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  params, state, out = tree, tx.init(tree), []
  for g in grads:
    params, state = step(params, state, g)
    out.append(_nanochat(params))
  return out


def _theirs(tree, grads, *, momentum=MOMENTUM, cosine_decay=True, **switches):
  torch.set_num_threads(1)
  named = _nanochat(tree)
  groups = ref.param_groups(named, model_dim=D, unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02,
                            weight_decay=0.5, scalar_lr=0.5)
  opt, out = ref.MuonAdamW(named, groups, **switches), []
  for it, g in enumerate(grads):
    ref.set_schedules(groups, it, num_iterations=TOTAL, warmup_steps=3, warmdown_ratio=0.5, final_lr_frac=0.05,
                      weight_decay=0.5, momentum=momentum, cosine_decay=cosine_decay)
    opt.step(_nanochat(g))
    out.append({k: v.numpy().copy() for k, v in named.items()})
  return out


def _difference(ours, theirs) -> float:
  """The largest relative difference over every tensor and step, one element of each matrix and
  step aside. The gradients are fixed inputs, so the weights feed back into a matrix's update only
  through its cautious decay: where u * w lies within rounding of 0 the mask can take the other
  sign on another CPU (seen once in 4,096 elements, 1.3e-5 and 7.4e-4 off), which changes that
  one element's decay from then on and nothing else. A real difference moves many elements.
  Vectors and scalars (AdamW, no cautious mask) are compared whole."""
  def tensor(a, b):
    gaps = np.sort(np.abs(np.asarray(a, np.float64) - b).ravel())
    worst = gaps[-2] if b.ndim >= 2 else gaps[-1]
    return float(worst) / max(float(np.max(np.abs(b))), np.finfo(np.float32).tiny)
  return max(tensor(a[k], b[k]) for a, b in zip(ours, theirs) for k in b)


@pytest.fixture(scope="module")
def trajectory():
  tree = _tree()
  grads = _grads(tree)
  return tree, grads, _ours(_optim(), tree, grads), _theirs(tree, grads)


def test_trajectory_equals_nanochat_reference(trajectory):
  tree, _, ours, theirs = trajectory
  start = _nanochat(tree)
  moved = min(mapping.relative_difference(theirs[-1][k], start[k].numpy()) for k in start)
  assert moved > 1e-2  # every tensor moved well beyond the tolerance
  assert len(theirs[-1]) == len(start) == 4 * 6 + 2 * 2 + 7  # 24 block matrices, 2 tables + 2 gates, 7 others
  assert _difference(ours, theirs) < TOLERANCE


@pytest.mark.parametrize("switch", [dict(equilibrate=False), dict(renormalise=False),
                                    dict(variance_reduction=False), dict(cautious=False),
                                    dict(cosine_decay=False), dict(momentum={**MOMENTUM, "final": 0.97}),
                                    dict(momentum={**MOMENTUM, "start": 0.97})],
                         ids=["muoneq", "muon+", "normuon", "cautious", "cosine_wd", "momentum_warmdown",
                              "momentum_warmup"])
def test_each_piece_matters(trajectory, switch):
  """The reference without one piece leaves the tolerance by orders of magnitude: the equality
  above checks each."""
  tree, grads, ours, _ = trajectory
  assert _difference(ours, _theirs(tree, grads, **switch)) > 100 * TOLERANCE


@pytest.mark.parametrize("ours,theirs", [
    (dict(cautious_weight_decay=False), dict(cautious=False)),
    (dict(weight_decay_schedule="constant"), dict(cosine_decay=False)),
    (dict(muon_momentum_warmdown=0.0), dict(momentum={**MOMENTUM, "final": 0.97}))],
    ids=["plain_decay", "constant_decay", "no_momentum_warmdown"])
def test_knobs_match_the_reference_switched_the_same_way(trajectory, ours, theirs):
  tree, grads, _, _ = trajectory
  assert _difference(_ours(_optim(**ours), tree, grads), _theirs(tree, grads, **theirs)) < TOLERANCE


def test_januarys_muon_is_not_nanochats_2026_optimizer(trajectory):
  tree, grads, _, theirs = trajectory
  january = _optim(name="muon", b1=0.8, b2=0.95, eps=1e-10)
  assert _difference(_ours(january, tree, grads), theirs) > 100 * TOLERANCE


@pytest.mark.parametrize("total,warmup,ratio,final", [(12, 3, 0.5, 0.05), (5000, 40, 0.65, 0.05), (100, 0, 0.2, 0.0),
                                                      (100, 10, 0.0, 0.1), (7, 10, 1.0, 0.5)])
def test_schedules_equal_nanochats(total, warmup, ratio, final):
  o = _optim(warmup_steps=warmup, decay_fraction=ratio, min_lr_ratio=final, muon_momentum_warmup=min(warmup * 10, 400))
  lr, momentum = lr_schedule(o, total), normuon.momentum_schedule(o, total)
  decay = normuon.weight_decay_schedule(o, total)
  mom = dict(MOMENTUM, warmup=o.muon_momentum_warmup)
  for it in sorted(s for s in {*range(0, total, max(total // 50, 1)), total - 1, warmup, warmup - 1} if 0 <= s < total):
    assert float(lr(it)) == pytest.approx(0.02 * ref.lr_multiplier(it, total, warmup, ratio, final), rel=1e-6)
    assert float(momentum(it)) == pytest.approx(ref.muon_momentum(it, total, ratio, **mom), rel=1e-6)
    assert float(decay(it)) == pytest.approx(ref.muon_weight_decay(it, total, 0.5), rel=1e-5, abs=1e-7)
  assert float(lr(0)) == pytest.approx(0.02 / warmup if warmup else 0.02)  # (step + 1) / warmup: moves at once


def test_momentum_without_warmdown_stays_and_constant_decay():
  o = _optim(muon_momentum_warmdown=0.0, weight_decay_schedule="constant")
  assert [float(normuon.momentum_schedule(o, 12)(s)) for s in (0, 2, 4, 11)] == pytest.approx([0.85, 0.91, 0.97, 0.97])
  assert float(normuon.weight_decay_schedule(o, 12)(11)) == pytest.approx(0.5)


def test_groups_and_learning_rates_are_nanochats():
  tree = _tree()
  tree["final_norm"] = {"scale": _param(np.ones(D), "norm")}  # a norm scale (model.norm_scale=True)
  tree["layers"][0]["attn"]["q_lora"] = {"a": _param(np.ones((D, 2)), "embed", None)}  # an adapter
  groups = normuon.group_names(tree)
  assert {k for k, g in groups.items() if g == "muon"} == {
      f"layers/{i}/{n}" for i in range(L) for n in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/up", "mlp/down")
  } | {"layers/1/attn/ve_gate", "layers/3/attn/ve_gate"}
  assert {k: g for k, g in groups.items() if g != "muon"} == {
      "embed": "embed", "lm_head": "unembed", "layers/1/attn/value_embed": "value_embed",
      "layers/3/attn/value_embed": "value_embed", "resid_lambdas": "resid", "x0_lambdas": "x0",
      "smear_gate": "smear", "smear_lambda": "smear", "backout_lambda": "smear", "final_norm/scale": "smear",
      "layers/0/attn/q_lora/a": "other"}
  lrs = normuon.group_lrs(_optim(), D)
  named = _nanochat(_tree())
  theirs = {name: g["lr"] for g in ref.param_groups(named, model_dim=D, unembedding_lr=0.008, embedding_lr=0.3,
                                                     matrix_lr=0.02, weight_decay=0.5, scalar_lr=0.5)
            for name in g["names"]}
  for ours, name in [("muon", "transformer.h.0.attn.c_q.weight"), ("unembed", "lm_head.weight"),
                     ("embed", "transformer.wte.weight"), ("value_embed", "value_embeds.1.weight"),
                     ("resid", "resid_lambdas"), ("x0", "x0_lambdas"), ("smear", "backout_lambda")]:
    assert lrs[ours] == pytest.approx(theirs[name]), ours


def test_factored_second_moment_shapes():
  """One second moment per output unit when fan_out >= fan_in (torch's rows), else per input."""
  layer = _tree()["layers"][1]
  del layer["attn"]["value_embed"]  # AdamW's
  state = normuon.scale_by_normuon(_optim(), TOTAL).init(layer)
  shapes = {k: v.shape for k, v in zip(normuon.group_names(layer), jax.tree.leaves(state.second_moment))}
  assert shapes == {"attn/q": (1, H, DH), "attn/k": (D, 1, 1), "attn/v": (D, 1, 1), "attn/o": (1, 1, D),
                    "attn/ve_gate": (12, 1), "mlp/up": (1, F), "mlp/down": (F, 1)}


def test_trainer_logs_the_matrix_lr():
  tx, schedule = make_optimizer(_optim(), D, TOTAL)
  assert [float(schedule(s)) for s in (0, 2, 6, 9, 12)] == pytest.approx(
      [0.02 / 3, 0.02, 0.02, 0.02 * (0.5 + 0.5 * 0.05), 0.02 * 0.05])


def _sharded_steps(mesh_cfg, devices, steps=3):
  """`steps` updates of the hand-built tree with parameters and state sharded over `devices`."""
  cfg = tiny_config()
  cfg.mesh.update(**mesh_cfg)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  tree = _tree()
  tx, _ = make_optimizer(_optim(), D, TOTAL)
  with jax.set_mesh(mesh):
    params = jax.device_put(tree, sharding.tree_shardings(tree, mesh))
    state_shardings = sharding.tree_shardings(jax.eval_shape(tx.init, tree), mesh)
    state = jax.jit(tx.init, out_shardings=state_shardings)(params)

    @jax.jit
    def step(params, state, g):
      updates, state = tx.update(g, state, params)
      return optax.apply_updates(params, updates), state

    for g in _grads(tree, steps):
      params, state = step(params, state, jax.device_put(g, sharding.tree_shardings(g, mesh)))
    return _nanochat(jax.device_get(params))


@pytest.mark.slow(seconds=4)
@pytest.mark.parametrize("mesh_cfg", [dict(data=1, fsdp=8, tensor=1), dict(data=2, fsdp=2, tensor=2)],
                         ids=["fsdp8", "data2xfsdp2xtensor2"])
def test_sharded_update_equals_one_device(mesh_cfg):
  one = _sharded_steps(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  many = _sharded_steps(mesh_cfg, jax.devices())
  assert _difference([many], [{k: v.numpy() for k, v in one.items()}]) < TOLERANCE


@pytest.mark.slow(seconds=6)
def test_trainer_runs_normuon_sharded():
  """The trainer's step with optim.name=normuon on fsdp=8 equals one device (the factored
  second moment sharded by the weights' logical axes), and the loss falls."""
  it = make_train_iterator(memory_data().train_docs, seq_len=32, batch_size=16, bos_id=0, seed=0)
  batches = [next(it) for _ in range(3)]
  cfg = tiny_config()
  cfg.model.update(scan_layers=True, num_heads=4, num_kv_heads=2)
  cfg.optim = _optim(lr=0.02, warmup_steps=1)
  results = []
  for mesh_cfg, devices in [(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                            (dict(data=1, fsdp=8, tensor=1), jax.devices())]:
    c = cfg.copy_and_resolve_references()
    c.mesh.update(**mesh_cfg)
    mesh = sharding.make_mesh(c.mesh, devices)
    steps = build_steps(c, mesh, total_steps=10)
    with jax.set_mesh(mesh):
      state, losses = steps.init(), []
      for local in batches:
        state, metrics = steps.train_step(state, device_batch(local, mesh))
        losses.append(float(metrics["loss"]))
      results.append((losses, jax.device_get(state["params"])))
  (one_losses, one_params), (losses, params) = results
  np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
  assert one_losses[-1] < one_losses[0]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), params, one_params)


@pytest.mark.parametrize("field,value,msg", [
    ("name", "sgd", "must be one of adamw, muon, normuon"), ("schedule", "linear", "warmdown"),
    ("scalar_lr", 0.0, "must be a finite number > 0"), ("smear_lr", -1.0, "must be a finite number > 0"),
    ("muon_beta2", 1.0, r"must be in \[0, 1\)"), ("muon_momentum_warmdown", 1.5, r"must be in \[0, 1\)"),
    ("weight_decay_schedule", "linear", "must be one of constant, cosine"),
    ("cautious_weight_decay", None, "must be True or False")])
def test_config_fields_are_validated(field, value, msg):
  cfg = tiny_config()
  cfg.optim[field] = value
  with pytest.raises(ConfigError, match=f"config.optim.{field}=.*{msg}"):
    config_lib.validate(cfg)


def test_normuon_takes_at_most_five_polar_express_steps():
  cfg = tiny_config()
  cfg.optim.update(name="normuon", muon_ns_steps=6)
  with pytest.raises(ConfigError, match="config.optim.muon_ns_steps=6.*<= 5"):
    config_lib.validate(cfg)
  cfg.optim.update(name="muon")
  config_lib.validate(cfg)  # Newton-Schulz has no such limit
