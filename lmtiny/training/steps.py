"""The jitted steps for one config on one mesh: `build_steps` creates the optimizer, the abstract
train state and its shardings, a jitted initialiser whose outputs are born sharded, and one
`jax.jit` train step with explicit in/out shardings and donated state (also used by the benchmark,
the LR finder, lowering and validation bits per byte).

Gradient accumulation: the global batch (train.batch_tokens) is split into micro-batches of
train.micro_batch_size sequences that a `lax.scan` runs one after another, summing the loss and
gradients over all weighted tokens before one normalisation (lmtiny.training.objectives), so the
update is the same as one big batch regardless of how many devices there are.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from lmtiny import config as config_lib
from lmtiny.data.pipeline import max_runs_per_row
from lmtiny.model.transformer import abstract_model, cast_params, compute_dtype, Transformer
from lmtiny.parallel import sharding, xla_options
from lmtiny.training import loss_scale
from lmtiny.training.hlo_cost import GRADIENT_SCOPE, OPTIMIZER_SCOPE
from lmtiny.training.objectives import CROSS_ENTROPY, Objective, TOKEN_KEYS
from lmtiny.training.optim import make_optimizer


@dataclasses.dataclass
class Steps:
  """Everything compiled for one config on one mesh."""
  mesh: Any
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: Any
  state_shardings: Any
  init: Callable[[], Any]
  train_step: Callable[[Any, dict], tuple[Any, dict]]
  eval_step: Callable[[Any, dict, jax.Array], dict]
  batch_sharding: Any
  # The model's parameters from the trained ones (identity, or frozen base + adapters for LoRA).
  model_params: Callable[[Any], Any] = lambda params: params


def token_losses(graphdef, params, batch, with_lse: bool = False, document_mask: bool = True, max_runs: int = 0):
  """Per-token cross-entropy [B, T] in float32 (and the logsumexp, for z-loss, with_lse), from
  the model's memory-efficient loss path (no [B, T, V] logits). document_mask: `segment_ids`;
  max_runs: the packer's bound on runs per row (`packed_runs`)."""
  model = nnx.merge(graphdef, params)
  ce_BxT, lse_BxT = model.token_losses(batch["inputs"], batch["targets"], batch["positions"],
                                       segment_ids(batch, document_mask), max_runs)
  return (ce_BxT, lse_BxT) if with_lse else ce_BxT


def segment_ids(batch, document_mask: bool = True):
  """The batch's segment ids for the model; None when config.data.document_mask is False (a static
  choice): the packer then makes each row one causal sequence, and the model runs the plain causal
  attention kernel instead of a packed one."""
  return batch["segment_ids"] if document_mask else None


def packed_runs(data_cfg) -> int:
  """The bound on runs of equal segment ids per row that the packers guarantee for this data
  config (data.max_docs_per_row; 0 = none), for attention kernels that size per-run state by it.
  Every packer that feeds these steps applies the cap: pretraining's, SFT's and RL's (one
  sequence per row)."""
  return max_runs_per_row(data_cfg.max_docs_per_row, data_cfg.document_mask)


def _init_fns(init, state_shardings, jit: Callable) -> Callable:
  """init() for a fresh state; init(params) for one that starts from given parameters, which are
  donated: the state takes over their buffers, so fine-tuning never holds its base weights twice.
  `jit` carries the steps' compiler options (the tiny config's init compiles in 2.0 s instead of
  2.9 s on one CPU core at XLA:CPU's level 1)."""
  fresh = jit(init, out_shardings=state_shardings)
  from_params = jit(init, out_shardings=state_shardings, donate_argnums=0)
  return lambda params=None: fresh() if params is None else from_params(params)


def build_steps(cfg, mesh, total_steps: int, schedule: optax.Schedule | None = None, *,
                adapter=None, frozen_params=None, objective: Objective = CROSS_ENTROPY,
                lr_scaled: bool = False) -> Steps:
  """The train step minimises `objective` (lmtiny.training.objectives; its batches hold its
  batch_keys); evaluation is always the plain masked cross-entropy. `adapter` (fine-tuning, e.g. lmtiny.model.adapters.LoRA): train only what `adapter.init()` makes
  (nnx Params with logical axes), with the model's parameters `adapter.merge(frozen_params,
  trained)`; `frozen_params` (sharded arrays) are an input of every step, never updated nor
  saved. `init(params)` starts from given parameters instead of a fresh initialisation.
  `lr_scaled`: the train step takes a third argument, a float32 scalar multiplying the update (and
  the logged LR) as a multiplier of the schedule's LR: a traced value, so its changes never
  recompile (lmtiny.training.budget drives the LR this way)."""
  cfg = config_lib.resolve_batch(cfg, sharding.data_parallel_size(mesh))
  m, t = cfg.model, cfg.train
  graphdef, _ = nnx.split(abstract_model(m))
  tx, schedule = make_optimizer(cfg.optim, m.d_model, total_steps, schedule)
  accum = config_lib.accumulation_steps(t)
  document_mask, max_runs = cfg.data.document_mask, packed_runs(cfg.data)

  def init(params=None):
    if params is None and adapter is not None:
      params = adapter.init(jax.random.key(t.seed))
    elif params is None:
      params = nnx.state(Transformer(m, nnx.Rngs(params=t.seed)), nnx.Param)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(t.seed + 1))}
    if loss_scale.enabled(m):  # float16: dynamic loss-scale state, checkpointed with the rest
      state["loss_scale"] = loss_scale.init_state(cfg.optim)
    return state

  abstract_state = jax.eval_shape(init)
  state_shardings = sharding.tree_shardings(abstract_state, mesh)
  frozen_shardings = None if frozen_params is None else jax.tree.map(lambda x: x.sharding, frozen_params)
  param_specs = sharding.specs(state_shardings["params"])
  frozen_specs = P() if frozen_shardings is None else sharding.specs(frozen_shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  batch_shardings = {k: batch_sharding for k in objective.batch_keys}
  eval_shardings = {k: batch_sharding for k in TOKEN_KEYS}
  micro_sharding = jax.sharding.NamedSharding(mesh, P(None, *batch_sharding.spec))
  per_device = sharding.accumulates_per_device(mesh, t.grad_reduce)

  def full_params(params, frozen):
    return params if adapter is None else adapter.merge(frozen, params)

  def loss_sums(params, micro, frozen=None):
    """(objective, (loss_sum, count)): sum_t w_t CE_t plus z-loss on the weighted tokens, and
    the objective's normaliser N (lmtiny.training.objectives)."""
    weights_BxT, count = objective.token_weights(micro)
    model = nnx.merge(graphdef, full_params(params, frozen))
    z_weights_BxT = t.z_loss * (weights_BxT != 0).astype(jnp.float32)
    total, ce_BxT, _ = model.loss_terms(micro["inputs"], micro["targets"], micro["positions"],
                                        segment_ids(micro, document_mask), weights_BxT, z_weights_BxT, max_runs)
    return total, (jnp.sum(ce_BxT * weights_BxT), count)

  def train_step(state, batch, frozen=None, lr_scale=None):
    params = state["params"]
    scaling = state.get("loss_scale")
    factor = loss_scale.loss_factor(scaling, batch["inputs"].size)  # 1 unless float16
    # Each micro-step differentiates the float32 master weights: the model casts a weight to the
    # compute dtype where it multiplies, inside a custom VJP whose weight gradient leaves the GEMM
    # in float32 (model.transformer.matmul, kernels.cross_entropy), so it is reduced across
    # devices and accumulated in float32. The gradient of a bf16 copy made once per step would be
    # bf16, rounded on each device and all-reduced / reduce-scattered in bf16. Frozen weights
    # (LoRA's base) take no gradient and are cast once per step.
    compute_frozen = None if frozen is None else cast_params(frozen, compute_dtype(m))

    # [B, T] -> [A, B/A, T] taking every A-th row, so each micro-batch spans all data shards.
    micro_batches = {k: jax.lax.with_sharding_constraint(
        jnp.swapaxes(v.reshape(v.shape[0] // accum, accum, *v.shape[1:]), 0, 1), micro_sharding)
        for k, v in batch.items()}

    def sums(replicated, micro_batches):
      """(gradient sums, loss sum, weighted-token count) over the micro-steps; `replicated` is
      (params, frozen weights in the compute dtype, loss factor)."""
      params, frozen, factor = replicated

      def scaled_loss_sums(params, micro):
        objective, aux = loss_sums(params, micro, frozen)
        return objective * factor, aux

      def accumulate(carry, micro):
        grads_acc, loss_acc, count_acc = carry
        (_, (loss_sum, count)), grads = jax.value_and_grad(scaled_loss_sums, has_aux=True)(params, micro)
        grads_acc = jax.tree.map(lambda acc, g: acc + g.astype(acc.dtype), grads_acc, grads)
        return (grads_acc, loss_acc + loss_sum, count_acc + count), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      return jax.lax.scan(accumulate, (zeros, 0.0, 0.0), micro_batches)[0]

    replicated = (params, compute_frozen, factor)
    if per_device:  # each device sums its rows' gradients over the micro-steps, reduced once per step
      grad_sums, loss_sum, count = sharding.sum_over_batch_shards(
          sums, mesh, replicated, micro_batches, weight_specs=(param_specs, frozen_specs, P()),
          sum_specs=(param_specs, P(), P()), scope=GRADIENT_SCOPE)
    else:  # sharded gradients: XLA sums each micro-step's, inside the loop (hlo_cost counts them there)
      grad_sums, loss_sum, count = sums(replicated, micro_batches)
    tokens, count = count, jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / (count * factor), grad_sums)
    with jax.named_scope(OPTIMIZER_SCOPE):  # its collectives are told from the gradients' by this name (hlo_cost)
      updates, opt_state = tx.update(grads, state["opt_state"], params)
      if lr_scale is not None:  # every update is linear in the LR: the scale is the LR's
        updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
      new_params = optax.apply_updates(params, updates)
    new_state = {**state, "params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
    lr = schedule(state["step"]) if lr_scale is None else schedule(state["step"]) * lr_scale
    metrics = {"loss": loss_sum / count, "grad_norm": optax.tree.norm(grads), "lr": lr,
               "tokens": tokens}
    if scaling is not None:  # a step with inf/nan gradients leaves params and optimizer state as they were
      finite = loss_scale.all_finite(grads)
      for key in ("params", "opt_state"):
        new_state[key] = loss_scale.apply_if_finite(finite, new_state[key], state[key])
      new_state["loss_scale"] = loss_scale.next_state(scaling, finite, cfg.optim.loss_scale_period)
      metrics.update(loss_scale=scaling["scale"], skipped=1 - finite.astype(jnp.int32),
                     skipped_steps=new_state["loss_scale"]["skipped_steps"])
    return new_state, metrics

  def eval_step(params, batch, token_bytes_V, frozen=None):
    compute = cast_params(params, compute_dtype(m))
    losses_BxT = token_losses(graphdef, full_params(compute, None if frozen is None else
                                                    cast_params(frozen, compute_dtype(m))), batch,
                              document_mask=document_mask, max_runs=max_runs)
    target_bytes_BxT = token_bytes_V[batch["targets"]].astype(jnp.float32)
    mask = batch["loss_mask"].astype(jnp.float32)
    byte_mask = mask * (target_bytes_BxT > 0)  # special tokens have no bytes: out of bpb
    return {"loss_sum": jnp.sum(losses_BxT * mask), "tokens": jnp.sum(mask != 0).astype(jnp.float32),
            "bpb_loss_sum": jnp.sum(losses_BxT * byte_mask), "bytes": jnp.sum(target_bytes_BxT * byte_mask)}

  replicated = sharding.replicated(mesh)
  # The mesh's device (platform and chip), not jax's default backend: lmtiny.training.lowering
  # compiles for TPU devices from a CPU host.
  jit = functools.partial(jax.jit, compiler_options=xla_options.device_options(mesh.devices.flat[0]))
  steps = Steps(
      mesh=mesh, graphdef=graphdef, tx=tx, schedule=schedule, abstract_state=abstract_state,
      state_shardings=state_shardings,
      init=_init_fns(init, state_shardings, jit),
      train_step=jit(train_step, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, replicated), donate_argnums=0),
      eval_step=jit(eval_step, in_shardings=(state_shardings["params"], eval_shardings, replicated),
                        out_shardings=replicated),
      batch_sharding=batch_sharding)
  def scaled_train_step(state, batch, lr_scale, frozen=None):
    return train_step(state, batch, frozen, lr_scale)

  scale_sharding = (replicated,) if lr_scaled else ()
  if lr_scaled and adapter is None:
    steps.train_step = jit(scaled_train_step, in_shardings=(state_shardings, batch_shardings, replicated),
                           out_shardings=(state_shardings, replicated), donate_argnums=0)
  if adapter is not None:  # the frozen weights go in as one more (undonated) argument
    train = jit(scaled_train_step if lr_scaled else train_step,
                in_shardings=(state_shardings, batch_shardings, *scale_sharding, frozen_shardings),
                out_shardings=(state_shardings, replicated), donate_argnums=0)
    evaluate = jit(eval_step, in_shardings=(state_shardings["params"], eval_shardings, replicated,
                                                frozen_shardings), out_shardings=replicated)
    merge = jit(adapter.merge, out_shardings=frozen_shardings)
    steps.train_step = lambda state, batch, *scale: train(state, batch, *scale, frozen_params)
    steps.eval_step = lambda params, batch, token_bytes: evaluate(params, batch, token_bytes, frozen_params)
    steps.model_params = lambda params: merge(frozen_params, params)
  return steps


def device_batch(local: dict[str, np.ndarray], mesh, keys: tuple[str, ...] = TOKEN_KEYS) -> dict[str, jax.Array]:
  """The process's rows of a batch's `keys` as global arrays sharded over the mesh's batch axes."""
  return sharding.global_batch_from_local({k: local[k] for k in keys}, mesh)
