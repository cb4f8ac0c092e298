"""LoRA: an untrained adapter is the base model, the merge matches a float64 NumPy merge, only
adapters train (and only they have optimizer state), 8-device sharded training equals 1 device."""
import jax
import numpy as np
import pytest
from flax import nnx

import reference_numpy as ref
from lm_fixtures import memory_data, tiny_config
from lmtiny.errors import ConfigError
from lmtiny.model.adapters import LoRA, parse_targets
from lmtiny.model.transformer import abstract_model, Transformer
from lmtiny.parallel import sharding
from lmtiny.training.trainer import Trainer
from lmtiny.training.steps import build_steps, device_batch

ALL = ("q", "k", "v", "o", "up", "gate", "down")


def _model(scan=False, activation="relu2"):
  cfg = tiny_config()
  cfg.model.update(scan_layers=scan, activation=activation)
  graphdef, _ = nnx.split(abstract_model(cfg.model), nnx.Param)
  params = jax.jit(lambda: nnx.state(Transformer(cfg.model, nnx.Rngs(0)), nnx.Param))()  # eager init is slow
  return cfg, graphdef, params


@jax.jit
def _random_adapters(lora_params):
  """Random A and B (a trained adapter's B is no longer zero)."""
  leaves, treedef = jax.tree.flatten(lora_params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(treedef, [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


TOKENS = np.random.default_rng(0).integers(1, 128, (2, 12)).astype(np.int32)


@pytest.mark.slow(seconds=8)
@pytest.mark.parametrize("scan, activation", [(False, "relu2"), (True, "swiglu")])
def test_untrained_adapter_is_the_base_and_merge_matches_numpy(scan, activation):
  cfg, graphdef, params = _model(scan, activation)
  lora = LoRA(params, 4, 8.0, ALL)
  logits = jax.jit(lambda p, ad: nnx.merge(graphdef, lora.merge(p, ad))(TOKENS))
  base_logits = jax.jit(lambda p: nnx.merge(graphdef, p)(TOKENS))(params)
  np.testing.assert_array_equal(logits(params, lora.init(jax.random.key(0))), base_logits)  # B = 0

  adapters = _random_adapters(lora.init(jax.random.key(0)))
  merged_logits = logits(params, adapters)
  # float64 reference: W + (alpha / r) A B with the rank axis contracted by NumPy.
  ref_params = ref.to_numpy64(nnx.to_pure_dict(params))
  for names in lora.specs:
    node_a, node_p = adapters, ref_params
    for n in names:
      node_a = node_a[n]
    for n in names[:-1]:
      node_p = node_p[int(n) if n.isdigit() else n]
    a, b = (np.asarray(node_a[k].get_value(), np.float64) for k in ("a", "b"))
    w = node_p[names[-1]]
    lead = 1 if scan else 0
    if lead:
      delta = np.stack([a.reshape(a.shape[0], -1, 4)[i] @ b.reshape(b.shape[0], 4, -1)[i]
                        for i in range(a.shape[0])])
    else:
      delta = a.reshape(-1, 4) @ b.reshape(4, -1)
    node_p[names[-1]] = w + 2.0 * delta.reshape(w.shape)
  want = ref.forward(ref_params, cfg.model, TOKENS)
  np.testing.assert_allclose(merged_logits, want, rtol=2e-4, atol=2e-4)
  assert not np.allclose(merged_logits, base_logits, atol=1e-3)
  targets = {names[-1] for names in lora.specs}
  assert targets == ({"q", "k", "v", "o", "up", "down"} | ({"gate"} if activation == "swiglu" else set()))


def test_adapter_axes_follow_the_adapted_weight():
  _, _, params = _model()
  adapters = LoRA(params, 4, 4.0, ("q", "o")).init(jax.random.key(0))
  q, o = adapters["layers"]["0"]["attn"]["q"], adapters["layers"]["0"]["attn"]["o"]
  assert q["a"].get_metadata()["logical_axes"] == ("embed", "lora_rank")
  assert q["b"].get_metadata()["logical_axes"] == ("lora_rank", "heads", "head_dim")
  assert o["a"].get_metadata()["logical_axes"] == ("heads", "head_dim", "lora_rank")
  assert o["b"].get_metadata()["logical_axes"] == ("lora_rank", "embed")
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings = sharding.tree_shardings(adapters, mesh)
  spec = lambda x: tuple(x.get_value().spec)
  assert spec(shardings["layers"]["0"]["attn"]["q"]["a"]) == ("fsdp", None)
  assert spec(shardings["layers"]["0"]["attn"]["q"]["b"]) == (None, "tensor", None)


def test_bad_lora_settings():
  _, _, params = _model()
  with pytest.raises(ConfigError, match="config.lora.targets='q,x'"):
    parse_targets("q,x")
  with pytest.raises(ConfigError, match="config.lora.rank=0"):
    LoRA(params, 0, 1.0, ALL)
  with pytest.raises(ConfigError, match="none of these weights"):
    LoRA(params, 2, 1.0, ("gate",))  # relu2 has no gate


def _steps(cfg, mesh, base, lora):
  shardings = sharding.tree_shardings(base, mesh)
  frozen = jax.device_put(base, shardings)
  return build_steps(cfg, mesh, 10, adapter=lora, frozen_params=frozen), frozen


@pytest.mark.slow(seconds=6)
def test_only_adapters_train_and_sharded_equals_one_device():
  cfg, _, base = _model()
  lora = LoRA(base, 4, 8.0, ALL)
  batches = [memory_data().train_docs]  # any docs: pack three batches
  from lmtiny.data.pipeline import make_train_iterator
  it = make_train_iterator(batches[0], seq_len=32, batch_size=16, bos_id=0, seed=0)
  local = [next(it) for _ in range(3)]
  results = []
  # the last: one gradient reduction per step under FSDP (the frozen base gathered whole), 2 micro-steps
  for mesh, reduce, micro in ((sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1]), "auto", 0),
                              (sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), "auto", 0),
                              (sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}), "step", 8)):
    cfg.train.update(grad_reduce=reduce, micro_batch_size=micro)
    steps, frozen = _steps(cfg, mesh, base, lora)
    with jax.set_mesh(mesh):
      state = steps.init()
      start = jax.device_get(state["params"])
      losses = []
      for b in local:
        state, metrics = steps.train_step(state, device_batch(b, mesh))
        losses.append(float(metrics["loss"]))
      results.append((losses, jax.device_get(state["params"]), start, state, frozen))
  (l1, p1, start, state, frozen), (l8, p8, _, state8, _), (l_step, p_step, _, _, _) = results
  for losses, params in ((l8, p8), (l_step, p_step)):
    np.testing.assert_allclose(losses, l1, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p1)):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  # The adapters moved (B left zero), the frozen base did not, and Adam's moments exist only
  # for the adapters.
  changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(start))]
  assert all(changed)
  for got, want in zip(jax.tree.leaves(frozen), jax.tree.leaves(base)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  adapter_sizes = sorted(x.size for x in jax.tree.leaves(p1))
  moment_sizes = sorted(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
  assert moment_sizes == sorted(adapter_sizes * 2)
  assert sum(adapter_sizes) == lora.num_params() < sum(x.size for x in jax.tree.leaves(base)) / 5
  # A sharded adapter lives on the mesh like its weight.
  a_q = state8["params"]["layers"]["0"]["attn"]["q"]["a"].get_value()
  assert a_q.sharding.spec[0] == "fsdp"


@pytest.mark.slow(seconds=4)  # measured on 2 cores: out of the inner loop
def test_trainer_with_adapter_samples_and_evaluates_on_merged_weights(tmp_path):
  cfg, _, base = _model()
  cfg.train.update(steps=2, eval_every=2, checkpoint_every=2)
  mesh = sharding.make_mesh(cfg.mesh)
  frozen = jax.device_put(base, sharding.tree_shardings(base, mesh))
  lora = LoRA(base, 2, 2.0, ("q", "v"))
  summary = Trainer(cfg, str(tmp_path), memory_data(), log=lambda _: None, init_params=frozen,
                    adapter=lora).run()
  # Step 0 validates the base model itself (B = 0): the same loss as the base run evaluates.
  plain = Trainer(cfg, str(tmp_path / "plain"), memory_data(), log=lambda _: None, init_params=frozen)
  with jax.set_mesh(plain.mesh):
    want = plain.evaluate(frozen)["loss"]
  assert summary["val"][0][1] == pytest.approx(want, rel=1e-6)
  assert summary["val"][-1][1] < summary["val"][0][1]
