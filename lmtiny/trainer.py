"""The training loop: sharded state, jitted train/eval steps, logging, evaluation, checkpoints.

`build_steps` is the reusable core (also used by the benchmark and the LR finder): it creates the
optimizer, the abstract train state and its shardings, a jitted initialiser whose outputs are
born sharded, and one `jax.jit` train step with explicit in/out shardings and donated state.

Gradient accumulation: the global batch (train.batch_tokens) is split into micro-batches of
train.micro_batch_size sequences that a `lax.scan` runs one after another, summing the loss and
gradients over all loss-mask tokens before one normalisation, so the update is the same as one
big batch regardless of how many devices there are.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from lmtiny import arch, config as config_lib, loss_scale, metrics as metrics_lib, preflight, runkind, sharding
from lmtiny import xla_options
from lmtiny.checkpoint import Checkpointer, abstract_with_shardings
from lmtiny.config import ConfigError
from lmtiny.files import atomic_write
from lmtiny.model import Transformer, abstract_model, cast_params, compute_dtype
from lmtiny.optim import make_optimizer
from lmtiny.preemption import Preemption as _Preemption
from lmtiny.runlock import RunLock, main_only

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


class TrainingDiverged(config_lib.RunFailed):
  """Loss or gradient norm became NaN/Inf; the last good checkpoint was left intact."""


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


def token_losses(graphdef, params, batch, with_lse: bool = False):
  """Per-token cross-entropy [B, T] in float32 (and the logsumexp, for z-loss, with_lse), from
  the model's memory-efficient loss path (no [B, T, V] logits)."""
  model = nnx.merge(graphdef, params)
  ce_BxT, lse_BxT = model.token_losses(batch["inputs"], batch["targets"], batch["positions"], batch["segment_ids"])
  return (ce_BxT, lse_BxT) if with_lse else ce_BxT


def check_batch_divisibility(cfg, mesh) -> None:
  dp = sharding.data_parallel_size(mesh)
  t = config_lib.resolve_batch(cfg, dp).train
  micro = config_lib.micro_batch_size(t)
  if micro % dp:
    field = "train.micro_batch_size" if t.micro_batch_size else "train.batch_tokens"
    value = t.micro_batch_size or t.batch_tokens
    raise ConfigError(f"config.{field}={value!r}: {micro} sequences per (micro-)batch do not divide over "
                      f"the data-parallel size {dp} (mesh data x fsdp)")
  if micro % jax.process_count():
    raise ConfigError(f"config.train.batch_tokens={t.batch_tokens!r}: {micro} sequences per micro-batch do "
                      f"not divide over {jax.process_count()} processes")
  if jax.process_count() > 1:
    sharding.check_process_local_batches(mesh)


def _init_fns(init, state_shardings) -> Callable:
  """init() for a fresh state; init(params) for one that starts from given parameters, which are
  donated: the state takes over their buffers, so fine-tuning never holds its base weights twice."""
  fresh = jax.jit(init, out_shardings=state_shardings)
  from_params = jax.jit(init, out_shardings=state_shardings, donate_argnums=0)
  return lambda params=None: fresh() if params is None else from_params(params)


def build_steps(cfg, mesh, total_steps: int, schedule: optax.Schedule | None = None, *,
                adapter=None, frozen_params=None) -> Steps:
  """`adapter` (fine-tuning, e.g. lmtiny.chat.lora.LoRA): train only what `adapter.init()` makes
  (nnx Params with logical axes), with the model's parameters `adapter.merge(frozen_params,
  trained)`; `frozen_params` (sharded arrays) are an input of every step, never updated nor
  saved. `init(params)` starts from given parameters instead of a fresh initialisation."""
  cfg = config_lib.resolve_batch(cfg, sharding.data_parallel_size(mesh))
  m, t = cfg.model, cfg.train
  graphdef, _ = nnx.split(abstract_model(m))
  tx, schedule = make_optimizer(cfg.optim, m.d_model, total_steps, schedule)
  accum = config_lib.accumulation_steps(t)

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
  batch_sharding = sharding.batch_sharding(mesh)
  batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
  micro_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *batch_sharding.spec))

  def full_params(params, frozen):
    return params if adapter is None else adapter.merge(frozen, params)

  def loss_sums(compute_params, micro, frozen=None):
    """(objective, (loss_sum, count)): the objective adds z-loss to the summed cross-entropy.
    loss_mask may hold float per-token weights (RL: the advantage of each sampled token); the
    loss is normalised by the count of nonzero weights, which is the token count for 0/1 masks."""
    mask = micro["loss_mask"].astype(jnp.float32)
    ce_BxT, lse_BxT = token_losses(graphdef, full_params(compute_params, frozen), micro, with_lse=True)
    loss_sum = jnp.sum(ce_BxT * mask)
    counted = (mask != 0).astype(jnp.float32)
    objective = loss_sum + t.z_loss * jnp.sum(jnp.square(lse_BxT) * counted) if t.z_loss else loss_sum
    return objective, (loss_sum, jnp.sum(counted))

  def train_step(state, batch, frozen=None):
    params = state["params"]
    scaling = state.get("loss_scale")
    factor = loss_scale.loss_factor(scaling, batch["inputs"].size)  # 1 unless float16
    # Weight matrices in the compute dtype once per step, not once per micro-step; the gradient
    # of each micro-step is taken with respect to this copy and accumulated in float32, which
    # equals the gradient through the cast into the float32 master weights.
    compute_params = cast_params(params, compute_dtype(m))
    compute_frozen = None if frozen is None else cast_params(frozen, compute_dtype(m))

    def scaled_loss_sums(params, micro):
      objective, aux = loss_sums(params, micro, compute_frozen)
      return objective * factor, aux

    # [B, T] -> [A, B/A, T] taking every A-th row, so each micro-batch spans all data shards.
    micro_batches = {k: jax.lax.with_sharding_constraint(
        jnp.swapaxes(v.reshape(v.shape[0] // accum, accum, *v.shape[1:]), 0, 1), micro_sharding)
        for k, v in batch.items()}

    def accumulate(carry, micro):
      grads_acc, loss_acc, count_acc = carry
      (_, (loss_sum, count)), grads = jax.value_and_grad(scaled_loss_sums, has_aux=True)(compute_params, micro)
      grads_acc = jax.tree.map(lambda acc, g: acc + g.astype(acc.dtype), grads_acc, grads)
      return (grads_acc, loss_acc + loss_sum, count_acc + count), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grad_sums, loss_sum, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), micro_batches)
    tokens, count = count, jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / (count * factor), grad_sums)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {**state, "params": optax.apply_updates(params, updates), "opt_state": opt_state,
                 "step": state["step"] + 1}
    metrics = {"loss": loss_sum / count, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
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
                                                    cast_params(frozen, compute_dtype(m))), batch)
    target_bytes_BxT = token_bytes_V[batch["targets"]].astype(jnp.float32)
    mask = batch["loss_mask"].astype(jnp.float32)
    byte_mask = mask * (target_bytes_BxT > 0)  # special tokens have no bytes: out of bpb
    return {"loss_sum": jnp.sum(losses_BxT * mask), "tokens": jnp.sum(mask != 0).astype(jnp.float32),
            "bpb_loss_sum": jnp.sum(losses_BxT * byte_mask), "bytes": jnp.sum(target_bytes_BxT * byte_mask)}

  replicated = sharding.replicated(mesh)
  # The mesh's platform, not jax's default backend: lmtiny.lowering compiles for TPU devices from a CPU host.
  jit = functools.partial(jax.jit, compiler_options=xla_options.compiler_options(mesh.devices.flat[0].platform))
  steps = Steps(
      mesh=mesh, graphdef=graphdef, tx=tx, schedule=schedule, abstract_state=abstract_state,
      state_shardings=state_shardings,
      init=_init_fns(init, state_shardings),
      train_step=jit(train_step, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, replicated), donate_argnums=0),
      eval_step=jit(eval_step, in_shardings=(state_shardings["params"], batch_shardings, replicated),
                        out_shardings=replicated),
      batch_sharding=batch_sharding)
  if adapter is not None:  # the frozen weights go in as one more (undonated) argument
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen_params)
    train = jit(train_step, in_shardings=(state_shardings, batch_shardings, frozen_shardings),
                out_shardings=(state_shardings, replicated), donate_argnums=0)
    evaluate = jit(eval_step, in_shardings=(state_shardings["params"], batch_shardings, replicated,
                                                frozen_shardings), out_shardings=replicated)
    merge = jax.jit(adapter.merge, out_shardings=frozen_shardings)
    steps.train_step = lambda state, batch: train(state, batch, frozen_params)
    steps.eval_step = lambda params, batch, token_bytes: evaluate(params, batch, token_bytes, frozen_params)
    steps.model_params = lambda params: merge(frozen_params, params)
  return steps


def device_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  return sharding.global_batch_from_local({k: local[k] for k in BATCH_KEYS}, mesh)


# ---------------------------------------------------------------------------------------------
# The loop.


@contextlib.contextmanager
def closing_run(ckpt: Checkpointer, writer) -> Iterator[None]:
  """Closes the run's checkpointer (waiting for its last save) and metrics writer when the block
  ends. If the block raised, their own errors are dropped: the block's error is the one to report,
  and a full disk or a broken save would make these fail too."""
  try:
    yield
  except BaseException:
    for close in (ckpt.close, writer.close):
      try:
        close()
      except Exception:  # pylint: disable=broad-except
        pass
    raise
  try:
    ckpt.close()  # a failed last save raises here
  finally:
    writer.close()


def _write_run_files(workdir: epath.Path, cfg, tokenizer, kind: str | None = None) -> None:
  """config.json, the tokenizer so that sampling needs nothing but the run directory, and the run's
  kind (lmtiny.runkind; default: the one its config implies) when the directory is new."""
  text = cfg.to_json_best_effort(indent=2)
  atomic_write(workdir / "config.json", text.encode())
  runkind.record_kind(str(workdir), kind or runkind.infer_kind(json.loads(text)))
  if hasattr(tokenizer, "model_proto") and not (workdir / "tokenizer.model").exists():
    atomic_write(workdir / "tokenizer.model", tokenizer.model_proto)


class Trainer:
  """One training run in `workdir`; `data` has train_docs, val_docs, token_bytes and tokenizer
  (lmtiny.data.dataset.Data; tests pass in-memory documents with the same attributes).

  Fine-tuning hooks: `init_params` (sharded model parameters, e.g. another run's checkpoint via
  lmtiny.rundir.load_weights) start a fresh run instead of a random init, and are consumed by it
  (their buffers become the state's; on a resume they are dropped); with an `adapter` (LoRA) they
  stay frozen and only the adapter's parameters train. Subclasses may replace
  `train_iterator` / `eval_iterator` with other packed batches (lmtiny.chat.data), and set `kind`
  (lmtiny.runkind): a run directory holding another kind of run is refused before any write."""

  kind = "train"

  def __init__(self, cfg, workdir: str, data, *, log: Callable[[str], None] = print,
               schedule: optax.Schedule | None = None, init_params=None, adapter=None):
    self.cfg, self.workdir, self.data, self.log = cfg, workdir, data, log
    self.init_params, self.adapter = init_params, adapter
    t = cfg.train
    self.mesh = sharding.make_mesh(cfg.mesh)
    check_batch_divisibility(cfg, self.mesh)
    if int(data.tokenizer.vocab_size) != cfg.model.vocab_size:
      raise ConfigError(f"config.model.vocab_size={cfg.model.vocab_size}: the data's tokenizer has "
                        f"{data.tokenizer.vocab_size} tokens")
    self.num_params = arch.count_params(cfg.model)
    self.total_steps = config_lib.total_steps(cfg, self.num_params)
    self.flops_per_token = arch.train_flops_per_token(cfg.model, t.seq_len)
    self.flops_per_token_nanochat = arch.train_flops_per_token(cfg.model, t.seq_len, "nanochat")
    self.main = jax.process_index() == 0
    self.steps = build_steps(cfg, self.mesh, self.total_steps, schedule, adapter=adapter,
                             frozen_params=init_params if adapter is not None else None)
    self.process_batch = config_lib.global_batch_size(t) // jax.process_count()
    self.core_items = self._load_core_items() if t.get("core_every", 0) else None

  # -- data ----------------------------------------------------------------------------------

  def train_iterator(self):
    from lmtiny.data.pipeline import make_train_iterator
    t = self.cfg.train
    return make_train_iterator(self.data.train_docs, seq_len=t.seq_len, batch_size=self.process_batch,
                               bos_id=self.data.tokenizer.bos_id, seed=self.cfg.data.shuffle_seed,
                               process_index=jax.process_index(), process_count=jax.process_count(),
                               num_workers=self.cfg.data.num_workers)

  def eval_iterator(self):
    from lmtiny.data.pipeline import make_eval_iterator
    t = config_lib.resolve_batch(self.cfg, sharding.data_parallel_size(self.mesh)).train
    return make_eval_iterator(self.data.val_docs, seq_len=t.seq_len,
                              batch_size=config_lib.micro_batch_size(t) // jax.process_count(),
                              bos_id=self.data.tokenizer.bos_id, num_batches=t.eval_batches,
                              process_index=jax.process_index(), process_count=jax.process_count())

  def evaluate(self, params) -> dict | None:
    t = self.cfg.train
    if not t.eval_batches or not len(self.data.val_docs):
      return None
    batches = self.eval_iterator()
    token_bytes = jnp.asarray(self.data.token_bytes, jnp.int32)
    totals = None
    for local in batches:
      out = jax.device_get(self.steps.eval_step(params, device_batch(local, self.mesh), token_bytes))
      totals = out if totals is None else {k: totals[k] + out[k] for k in out}
    loss = float(totals["loss_sum"] / max(totals["tokens"], 1.0))
    return {"loss": loss, "bpb": metrics_lib.bits_per_byte(float(totals["bpb_loss_sum"]), float(totals["bytes"])),
            "tokens": float(totals["tokens"])}

  def _load_core_items(self) -> dict:
    """The CORE tasks' items, read before training starts (a missing file or no network fails now)."""
    from lmtiny.evals import core
    t = self.cfg.train
    names = core.task_names(t.core_tasks, f"config.train.core_tasks={t.core_tasks!r}")
    return {name: core.load_items(name, t.core_data_dir or None, t.core_items, flag="config.train.core_data_dir")
            for name in names}

  def log_core(self, params, step: int, writer) -> None:
    """CORE (lmtiny.evals.core, the eval CLI's scoring) of the current parameters: logged, and kept
    in metrics.jsonl as split "core" (all processes score, since the programs span the mesh)."""
    from lmtiny.evals.core import evaluate_core
    from lmtiny.evals.scoring import Scorer
    t0 = time.perf_counter()
    model = nnx.merge(self.steps.graphdef, self.steps.model_params(params))
    scorer = Scorer(model, self.mesh, rows_per_batch=4 * sharding.data_parallel_size(self.mesh))
    out = evaluate_core(scorer, self.data.tokenizer, self.core_items)
    seconds = time.perf_counter() - t0
    writer.write(step, "core", {"core": out["core"], "seconds": seconds,
                                **{name: r["centered"] for name, r in out["results"].items()}})
    tasks = " ".join(f"{name} {r['accuracy']:.3f}" for name, r in out["results"].items())
    self.log(f"step {step:>6}/{self.total_steps} | CORE {out['core']:.4f} | accuracy: {tasks} | {seconds:.0f}s")

  def sample(self, params, step: int, writer) -> None:
    """Continuations of train.sample_prompt, logged and kept in metrics.jsonl (all processes
    run the sampler, since its programs span the mesh; the main one writes)."""
    if not hasattr(self.data.tokenizer, "decode"):  # in-memory token data has no text
      return
    prompt, text = self.sample_pair(nnx.merge(self.steps.graphdef, self.steps.model_params(params)))
    writer.write(step, "sample", {"prompt": prompt, "text": text})
    self.log(f"step {step:>6}/{self.total_steps} | sample: {prompt + text!r}")

  def sample_pair(self, model) -> tuple[str, str]:
    """(prompt, sampled text): train.sample_prompt and its continuation (a chat run: a reply)."""
    from lmtiny.sampling import sample_text
    t = self.cfg.train
    (text,) = sample_text(model, self.data.tokenizer, [t.sample_prompt], max_new_tokens=t.sample_tokens, seed=t.seed)
    return t.sample_prompt, text

  # -- state -----------------------------------------------------------------------------------

  def _start(self, ckpt: Checkpointer, train_iter):
    """The newest checkpoint that restores cleanly (corrupt ones are moved aside), else a fresh state."""
    found = ckpt.restore_newest(lambda step: self._restore(ckpt, step, train_iter), self.log)
    params = None
    if self.adapter is None:  # full fine-tuning: the base is consumed, or dropped on a resume
      params, self.init_params = self.init_params, None
    if found is not None:  # logged here, not in _restore: another process may yet reject that step
      self.log(f"resumed from checkpoint at step {found[0]}")
      return found[::-1]
    return self.steps.init(params), 0

  def _restore(self, ckpt: Checkpointer, step: int, train_iter):
    from lmtiny.data.pipeline import map_train_state, worker_count
    target = abstract_with_shardings(self.steps.abstract_state, self.steps.state_shardings)
    saved, template = ckpt.data_states(step), train_iter.get_state()
    if saved is None or (len(saved) == jax.process_count() and worker_count(saved[0]) == worker_count(template)):
      state = ckpt.restore(step, target, train_iter)
    else:  # another process or worker count: model state as is, data position mapped
      state = ckpt.restore(step, target)
      data_state, note = map_train_state(saved, len(self.data.train_docs), jax.process_index(),
                                         jax.process_count(), template=template)
      train_iter.set_state(data_state)
      self.log(f"{note} (checkpoint written by {len(saved)} processes, resuming with {jax.process_count()})")
    return state

  # -- loop ------------------------------------------------------------------------------------

  def run(self, stop_after: int | None = None) -> dict:
    """Train to the end, or (as a preemption would) checkpoint and return after `stop_after`."""
    cfg, t = self.cfg, self.cfg.train
    workdir = epath.Path(self.workdir)
    with RunLock(self.workdir, log=self.log, enabled=self.main):
      changes = main_only(lambda: self._check_workdir(cfg), self.main)  # before any write
      if self.main:
        workdir.mkdir(parents=True, exist_ok=True)
        _write_run_files(workdir, cfg, self.data.tokenizer, self.kind)
        preflight.check_disk_space(self.workdir, preflight.state_bytes(self.steps.abstract_state),
                                   t.keep_checkpoints, self.log)
      ckpt = Checkpointer(str(workdir / "checkpoints"), keep=t.keep_checkpoints,
                          async_save=t.async_checkpointing)
      train_iter = self.train_iterator()
      with jax.set_mesh(self.mesh):
        try:
          state, start = self._start(ckpt, train_iter)
        except BaseException:
          ckpt.close()
          raise
        if self.main:
          preflight.record_config_changes(self.workdir, changes or {}, start, self.log)
        writer = metrics_lib.MetricsWriter(self.workdir, enabled=self.main, resume_step=start)
        with closing_run(ckpt, writer):
          summary = self._loop(state, start, ckpt, train_iter, writer, stop_after)
    if self.main and t.plot:
      metrics_lib.plot_loss_curve(self.workdir)
    return summary

  def _check_workdir(self, cfg) -> dict:
    """The run directory holds no run or one of this kind, whose config changes no shape (else a
    one-line error); returns the config's changes (preflight.config_changes)."""
    runkind.check_kind(self.workdir, self.kind)
    return preflight.config_changes(self.workdir, cfg)

  def _eval_missing(self, step: int) -> bool:
    """A resumed run at an eval step whose val record a kill (during that eval) prevented."""
    t = self.cfg.train
    if step % t.eval_every and step != self.total_steps:
      return False
    return bool(main_only(lambda: not any(r.get("split") == "val" and r.get("step") == step
                                          for r in metrics_lib.read_metrics(self.workdir)), self.main))

  def _log_eval(self, params, step: int, history: dict, writer) -> None:
    val = self.evaluate(params)
    if val is not None:
      history["val"].append((step, val["loss"], val["bpb"]))
      writer.write(step, "val", val)
      self.log(f"step {step:>6}/{self.total_steps} | val loss {val['loss']:.4f} | val bpb {val['bpb']:.4f}")

  def _loop(self, state, start: int, ckpt: Checkpointer, train_iter, writer, stop_after) -> dict:
    t = self.cfg.train
    self.log(f"model {self.num_params / 1e6:.2f}M params | {self.total_steps} steps of "
             f"{t.batch_tokens} tokens | mesh {dict(self.mesh.shape)} | {jax.device_count()} devices")
    if getattr(self.data, "description", ""):  # a weighted mixture of shard directories
      self.log(self.data.description)
    history = {"train_loss": [], "val": []}
    last_saved, pending, step, stop = start, None, start, False
    window_start, window_steps, t0 = time.perf_counter(), 0, time.perf_counter()

    def flush(pending):
      """Read a step's metrics (one step late, so the host never waits on the device)."""
      nonlocal window_start, window_steps
      done_step, device_metrics = pending
      values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
      if values.get("skipped"):  # float16: non-finite gradients, update skipped, scale halved
        self.log(f"step {done_step:>6}/{self.total_steps} | skipped: non-finite gradients at loss scale "
                 f"{values['loss_scale']:g} (halved; {values['skipped_steps']:.0f} skipped so far)")
        if values["loss_scale"] <= 1.0:
          raise TrainingDiverged(f"non-finite gradients even at loss scale {values['loss_scale']:g} at step "
                                 f"{done_step}: training stopped; the last good checkpoint is step {last_saved}")
      elif not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
        raise TrainingDiverged(f"loss={values['loss']} grad_norm={values['grad_norm']} at step {done_step}: "
                               f"training stopped; the last good checkpoint is step {last_saved}")
      history["train_loss"].append((done_step, values["loss"]))
      window_steps += 1
      if done_step % t.log_every == 0 or done_step == self.total_steps:
        elapsed = time.perf_counter() - window_start
        tok_s = window_steps * t.batch_tokens / max(elapsed, 1e-9)
        mfu = metrics_lib.mfu(self.flops_per_token, tok_s)
        mfu_nanochat = metrics_lib.mfu(self.flops_per_token_nanochat, tok_s)
        eta = (self.total_steps - done_step) * elapsed / window_steps
        scaling = {k: values[k] for k in ("loss_scale", "skipped_steps") if k in values}
        writer.write(done_step, "train", {"seconds": time.perf_counter() - t0, "segment": start,
                                          "loss": values["loss"], "lr": values["lr"],
                                          "grad_norm": values["grad_norm"], "tokens_per_sec": tok_s, "mfu": mfu,
                                          "mfu_nanochat": mfu_nanochat, **scaling})
        mfu_text = (f" | MFU {100 * mfu:.2f}% causal-half, {100 * mfu_nanochat:.2f}% nanochat"
                    if mfu is not None else "")
        if scaling:
          mfu_text += f" | scale {scaling['loss_scale']:g} | skipped {scaling['skipped_steps']:.0f}"
        self.log(f"step {done_step:>6}/{self.total_steps} | loss {values['loss']:.4f} | lr {values['lr']:.2e} | "
                 f"gnorm {values['grad_norm']:.3f} | {tok_s:,.0f} tok/s{mfu_text} | "
                 f"ETA {metrics_lib.format_duration(eta)}")
        window_start, window_steps = time.perf_counter(), 0

    if start == 0 or self._eval_missing(start):  # the val curve's start, or a point a kill lost
      self._log_eval(state["params"], start, history, writer)
    with _Preemption() as preemption:
      preemption.inherit()
      while step < self.total_steps:
        if step == start and (stop := preemption.decided(step)):
          self.log(f"stopped (SIGTERM) before step {step + 1}: nothing new to save")
          break
        ckpt.check_errors()  # a failed async save surfaces here, one step later
        batch = device_batch(next(train_iter), self.mesh)
        state, step_metrics = self.steps.train_step(state, batch)
        step += 1
        preemption.requested |= step == stop_after
        stop = preemption.decided(step)  # agreed by all processes; a later signal waits a step
        if pending is not None:
          flush(pending)
        pending = (step, step_metrics)
        at_end = step == self.total_steps
        if step % t.checkpoint_every == 0 or at_end or stop:
          flush(pending)  # never checkpoint a state whose loss we have not seen to be finite
          pending = None
          ckpt.save(step, state, train_iter)
          last_saved = step
        if step % t.eval_every == 0 or at_end:
          if pending is not None:
            flush(pending)
            pending = None
          self._log_eval(state["params"], step, history, writer)
        if self.core_items is not None and (at_end or step % t.core_every == 0):
          self.log_core(state["params"], step, writer)
        if at_end or (t.sample_every and step % t.sample_every == 0):
          self.sample(state["params"], step, writer)
        if stop:
          self.log(f"stopped early (SIGTERM or stop_after): saved checkpoint at step {step}")
          break
      if pending is not None:
        flush(pending)
    seconds = time.perf_counter() - t0
    writer.write(step, "run", {"seconds": seconds, "segment": start, "steps": step - start, "tokens": (step - start) * t.batch_tokens,
                               "chips": 1 if metrics_lib.chip_name() == "cpu" else jax.device_count(),
                               "chip": metrics_lib.chip_name(),
                               "peak_flops": metrics_lib.peak_flops_total()})  # for the report card
    self.state = state
    return {"step": step, "num_params": self.num_params, "total_steps": self.total_steps,
            "train_loss": history["train_loss"], "val": history["val"], "preempted": stop,
            "seconds": time.perf_counter() - t0}
