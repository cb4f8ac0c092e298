"""Next-token training as a stage of the run loop (lmtiny.training.loop): pretraining, and SFT by
composition (lmtiny.chat.finetune gives it chat batches and the chat suite).

  summary = Trainer(cfg, workdir, data).run()

`data` has train_docs, val_docs, token_bytes and tokenizer (lmtiny.data.dataset.Data; tests pass
in-memory documents with the same attributes). What a Trainer is made of:
- its `batches` (default `DocumentBatches`: documents packed into rows) give the train and
  held-out iterators and the sample shown every train.sample_every steps;
- its `evaluations` run on their own cadences after a step (CORE / HF6 on train.core_every;
  SFT adds the chat suite);
- `init_params` (sharded parameters, e.g. another run's via lmtiny.runs.directory.load_weights)
  start a fresh run instead of a random init and are consumed by it (their buffers become the
  state's; a resume drops them); with an `adapter` (LoRA) they stay frozen and only the adapter's
  parameters train.
- `init_opt_state` (fresh optimizer state -> the one to start with, e.g. the base run's for SFT:
  lmtiny.chat.warm_start) replaces a fresh run's optimizer state; a resume never calls it.
Metrics are read one step late, so the host never waits on the device.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lmtiny.data.pipeline import make_eval_iterator, make_train_iterator, map_train_state
from lmtiny.errors import ConfigError
from lmtiny.model.sampling import sample_text
from lmtiny.parallel import sharding
from lmtiny.plan import counts
from lmtiny.plan.units import duration
from lmtiny.runs import kind as runkind, metrics as metrics_lib
from lmtiny.runs.lock import main_only
from lmtiny.tasks import dclm, hf6
from lmtiny.tasks.scoring import Scorer
from lmtiny.training import loop, resume
from lmtiny.training.resolved import resolve_run, ResolvedRun
from lmtiny.training.steps import build_steps, device_batch


class Batches(Protocol):
  """Where a Trainer's rows come from."""

  def train_iterator(self, batch_size: int):
    """Endless, checkpointable (get_state / set_state) batches of `batch_size` rows for this process."""

  def eval_iterator(self, batch_size: int, num_batches: int):
    """The first `num_batches` held-out batches of `batch_size` rows for this process."""

  def sample_pair(self, model) -> tuple[str, str]:
    """(prompt, the model's continuation), logged every train.sample_every steps and at the end."""


class Evaluation(Protocol):
  """Periodic work on the current model: due(step, at_end) -> bool; run(model, step, writer)."""

  def due(self, step: int, at_end: bool) -> bool: ...

  def run(self, model, step: int, writer) -> None: ...


class DocumentBatches:
  """Pretraining's rows: documents packed with BOS as data.packing says, at most data.max_docs_per_row to a row."""

  def __init__(self, cfg, data):
    self.cfg, self.data = cfg, data

  def _layout(self) -> dict:
    d = self.cfg.data
    return dict(max_docs_per_row=d.max_docs_per_row, document_mask=d.document_mask, packing=d.packing,
                bestfit_buffer=d.bestfit_buffer)

  def train_iterator(self, batch_size: int):
    t, d = self.cfg.train, self.cfg.data
    return make_train_iterator(self.data.train_docs, seq_len=t.seq_len, batch_size=batch_size,
                               bos_id=self.data.tokenizer.bos_id, seed=d.shuffle_seed,
                               process_index=jax.process_index(), process_count=jax.process_count(),
                               num_workers=d.num_workers, prefetch=d.prefetch, **self._layout())

  def eval_iterator(self, batch_size: int, num_batches: int):
    t = self.cfg.train
    return make_eval_iterator(self.data.val_docs, seq_len=t.seq_len, batch_size=batch_size,
                              bos_id=self.data.tokenizer.bos_id, num_batches=num_batches,
                              process_index=jax.process_index(), process_count=jax.process_count(),
                              **self._layout())

  def sample_pair(self, model) -> tuple[str, str]:
    """train.sample_prompt and its continuation."""
    t = self.cfg.train
    (text,) = sample_text(model, self.data.tokenizer, [t.sample_prompt], max_new_tokens=t.sample_tokens, seed=t.seed)
    return t.sample_prompt, text


class CoreEvaluation:
  """DCLM CORE (lmtiny.tasks.dclm) and/or the HF6 tasks' mean (lmtiny.tasks.hf6) on
  train.core_every, scored as the eval CLI scores them: logged, and kept in metrics.jsonl as splits
  "core" (CORE and each task's centered accuracy as core:<label>) and "hf6". Its items are read
  when it is made, before training starts (a missing file or no network fails then)."""

  def __init__(self, cfg, tokenizer, mesh, total_steps: int, log: Callable[[str], None]):
    t = cfg.train
    self.every, self.tokenizer, self.mesh, self.total_steps, self.log = t.core_every, tokenizer, mesh, total_steps, log
    names = hf6.task_names(t.core_tasks, f"config.train.core_tasks={t.core_tasks!r}", also=(dclm.CORE,))
    data_dir, flag = t.core_data_dir or None, "config.train.core_data_dir"
    self.items = {}
    if dclm.CORE in names:
      self.items[dclm.CORE] = dclm.load_suite(data_dir, t.core_items, flag=flag)
    tasks = [name for name in names if name != dclm.CORE]
    if tasks:
      self.items[hf6.HF6] = {name: hf6.load_items(name, data_dir, t.core_items, flag=flag) for name in tasks}

  def due(self, step: int, at_end: bool) -> bool:
    return at_end or step % self.every == 0

  def run(self, model, step: int, writer) -> None:
    """Every process scores (the programs span the mesh); the main one writes."""
    scorer = Scorer(model, self.mesh, rows_per_batch=4 * sharding.data_parallel_size(self.mesh))
    for suite, items in self.items.items():
      t0 = time.perf_counter()
      if suite == dclm.CORE:
        out = dclm.evaluate_core(scorer, self.tokenizer, items)
        label = f"CORE (DCLM, {len(out['results'])} tasks)"
      else:
        out = hf6.evaluate_hf6(scorer, self.tokenizer, items)
        label = "HF6 mean" if len(items) == len(hf6.TASKS) else f"HF6 mean ({len(items)}/{len(hf6.TASKS)})"
      seconds = time.perf_counter() - t0
      writer.write(step, suite, {suite: out[suite], "seconds": seconds,
                                 **{name: r["centered"] for name, r in out["results"].items()}})
      tasks = " ".join(f"{name.removeprefix(dclm.KEY_PREFIX)} {r['accuracy']:.3f}"
                       for name, r in out["results"].items())
      self.log(f"step {step:>6}/{self.total_steps} | {label} {out[suite]:.4f} | accuracy: {tasks} | {seconds:.0f}s")


class Trainer:
  """One next-token training run in `workdir` (see the module's docstring); `cfg` is a config or a
  ResolvedRun (lmtiny.training.resolved: a verb that resolved it to fail early passes that)."""

  def __init__(self, cfg, workdir: str, data, *, log: Callable[[str], None] = print,
               schedule: optax.Schedule | None = None, init_params=None, adapter=None,
               kind: str = "train", name: str = "training", batches: Batches | None = None,
               evaluations: Sequence[Evaluation] = (), init_opt_state: Callable | None = None,
               lr_by_progress: Callable[[int, float], float] | None = None):
    run = cfg if isinstance(cfg, ResolvedRun) else resolve_run(cfg)
    self.cfg, self.mesh, self.total_steps = run.cfg, run.mesh, run.total_steps
    self.process_batch, self.micro_batch = run.process_batch, run.micro_batch
    self.workdir, self.data, self.log, self.kind, self.name = workdir, data, log, kind, name
    self.init_params, self.adapter, self.init_opt_state = init_params, adapter, init_opt_state
    self.tokenizer = data.tokenizer
    m, t = self.cfg.model, self.cfg.train
    if int(data.tokenizer.vocab_size) != m.vocab_size:
      raise ConfigError(f"config.model.vocab_size={m.vocab_size}: the data's tokenizer has "
                        f"{data.tokenizer.vocab_size} tokens")
    if t.time_budget > 0 and kind == "train" and jax.process_count() > 1:
      raise ConfigError(f"config.train.time_budget={t.time_budget:g}: one process only (each host's clock would "
                        f"give its own learning rate and stop); use train.steps or tokens_per_param on "
                        f"{jax.process_count()} processes")
    self.num_params = counts.count_params(m)
    self.flops_per_token = counts.train_flops_per_token(m, t.seq_len)
    self.flops_per_token_nanochat = counts.train_flops_per_token(m, t.seq_len, "nanochat")
    self.main = jax.process_index() == 0
    # train.time_budget: the LR follows the budget's progress, as a multiplier of a constant optim.lr;
    # `lr_by_progress(step, progress)`: that multiplier from the data's progress through one epoch
    # (the batches' iterator is a lmtiny.training.epoch.OneEpoch)
    self.lr_follows_budget = kind == "train" and schedule is None and t.time_budget > 0
    self.lr_by_progress = lr_by_progress
    lr_scaled = self.lr_follows_budget or lr_by_progress is not None
    if lr_scaled:
      schedule = optax.constant_schedule(self.cfg.optim.lr)
    self.steps = build_steps(self.cfg, self.mesh, self.total_steps, schedule, adapter=adapter,
                             frozen_params=init_params if adapter is not None else None, lr_scaled=lr_scaled)
    self.batches = batches or DocumentBatches(self.cfg, data)
    self.core = CoreEvaluation(self.cfg, self.tokenizer, self.mesh, self.total_steps, log) if t.core_every else None
    self.evaluations = list(evaluations)

  def run(self, stop_after: int | None = None, clock=None) -> dict:
    """Train to the end, or (as a preemption would) checkpoint and return after `stop_after`.
    `clock`: train.time_budget's (lmtiny.training.budget.Clock; tests)."""
    self.state, summary = loop.run(self, stop_after, clock)
    return summary

  # -- batches and evaluation ----------------------------------------------------------------

  def train_iterator(self):
    return self.batches.train_iterator(self.process_batch)

  def eval_iterator(self):
    """train.eval_batches batches of the global batch's size, fed a micro-batch at a time: the rows
    scored do not depend on how a batch is split over devices and accumulation micro-steps."""
    micro = self.micro_batch // jax.process_count()
    return self.batches.eval_iterator(micro, self.cfg.train.eval_batches * (self.process_batch // micro))

  def model(self, params):
    """The model with the trained parameters (a LoRA run's merged onto its frozen base)."""
    return nnx.merge(self.steps.graphdef, self.steps.model_params(params))

  def evaluate(self, params) -> dict | None:
    """Loss and bits per byte over the held-out batches (None without any)."""
    if not self.cfg.train.eval_batches or not len(self.data.val_docs):
      return None
    token_bytes = jnp.asarray(self.data.token_bytes, jnp.int32)
    totals = None
    for local in self.eval_iterator():
      out = jax.device_get(self.steps.eval_step(params, device_batch(local, self.mesh), token_bytes))
      totals = out if totals is None else {k: totals[k] + out[k] for k in out}
    loss = float(totals["loss_sum"] / max(totals["tokens"], 1.0))
    return {"loss": loss, "bpb": metrics_lib.bits_per_byte(float(totals["bpb_loss_sum"]), float(totals["bytes"])),
            "tokens": float(totals["tokens"])}

  # -- the stage (lmtiny.training.loop.Stage) -------------------------------------------------

  def prepare(self) -> dict:
    runkind.check_kind(self.workdir, self.kind)
    return resume.config_changes(self.workdir, self.cfg)

  def data_iterator(self):
    return self.train_iterator()

  def map_data_state(self, saved: list, template: dict) -> tuple[dict, str]:
    return map_train_state(saved, len(self.data.train_docs), jax.process_index(), jax.process_count(),
                           template=template)

  def fresh_state(self) -> dict:
    """Over `init_params` (consumed, unless an adapter trains on them) or a random init."""
    params = None
    if self.adapter is None:
      params, self.init_params = self.init_params, None
    state = self.steps.init(params)
    if self.init_opt_state is not None:
      state = {**state, "opt_state": self.init_opt_state(state["opt_state"])}
    return state

  def begin(self, state, progress: loop.Progress) -> None:
    """The header line, and the validation point at the start (or one a kill lost)."""
    t, start = self.cfg.train, progress.start
    if start and self.adapter is None:  # full fine-tuning resumed: its base is not needed
      self.init_params = None
    budget = (f" (or {t.time_budget:g}s of training first)" if progress.budget.active else
              " at most (one epoch of the data)" if self.lr_by_progress is not None else "")
    self.log(f"model {self.num_params / 1e6:.2f}M params | {self.total_steps} steps{budget} of "
             f"{t.batch_tokens} tokens | mesh {dict(self.mesh.shape)} | {jax.device_count()} devices")
    if getattr(self.data, "description", ""):  # a weighted mixture of shard directories
      self.log(self.data.description)
    self.history = {"train_loss": [], "val": []}
    self._pending, self._window_start, self._window_steps = None, time.perf_counter(), 0
    self._budget, self._epoch_progress = progress.budget, (0, 0.0)
    if start == 0 or self._eval_missing(start):  # the val curve's start, or a point a kill lost
      self._log_eval(state["params"], start, progress.writer)

  def update(self, state, step: int, data):
    batch = device_batch(next(data), self.mesh)
    if self.lr_follows_budget:
      return self.steps.train_step(state, batch, np.float32(self._budget.lr_scale(self.cfg.optim, step)))
    if self.lr_by_progress is not None:  # the progress counted once this step's batch was handed out
      consumed = data.progress()
      self._epoch_progress = (step + 1, consumed)
      return self.steps.train_step(state, batch, np.float32(self.lr_by_progress(step, consumed)))
    return self.steps.train_step(state, batch)

  def after_step(self, step: int, step_metrics, progress: loop.Progress) -> None:
    """The previous step's metrics are read now (one step late, so the host never waits)."""
    if self._pending is not None:
      self._read(*self._pending, progress)
    self._pending = (step, step_metrics)

  def settle(self, progress: loop.Progress) -> None:
    if self._pending is not None:
      self._read(*self._pending, progress)
      self._pending = None

  def periodic(self, state, step: int, progress: loop.Progress) -> None:
    """Validation, CORE / HF6, a sample and the given evaluations on their cadences (and at the end)."""
    t, at_end = self.cfg.train, progress.ended
    validate = step % t.eval_every == 0 or at_end
    core = self.core is not None and self.core.due(step, at_end)
    sample = hasattr(self.data.tokenizer, "decode") and (at_end or (t.sample_every and step % t.sample_every == 0))
    due = [e for e in self.evaluations if e.due(step, at_end)]
    if validate or core or sample or due:
      with progress.budget.paused():  # not training time (train.time_budget)
        self._periodic(state, step, progress, validate, core, sample, due)

  def _periodic(self, state, step: int, progress: loop.Progress, validate: bool, core: bool, sample: bool,
                due: list) -> None:
    writer = progress.writer
    if validate:
      self.settle(progress)
      self._log_eval(state["params"], step, writer)
    if not (core or sample or due):
      return
    model = self.model(state["params"])  # every process runs these: their programs span the mesh
    if core:
      self.core.run(model, step, writer)
    if sample:  # in-memory token data has no text
      prompt, text = self.batches.sample_pair(model)
      writer.write(step, "sample", {"prompt": prompt, "text": text})
      self.log(f"step {step:>6}/{self.total_steps} | sample: {prompt + text!r}")
    for evaluation in due:
      evaluation.run(model, step, writer)

  def run_record(self, step: int, progress: loop.Progress) -> dict:
    """The report card's tokens and peak FLOP/s."""
    return {"tokens": (step - progress.start) * self.cfg.train.batch_tokens,
            "peak_flops": metrics_lib.peak_flops_total()}

  def summary(self, step: int, progress: loop.Progress) -> dict:
    return {"num_params": self.num_params, "total_steps": self.total_steps,
            "train_loss": self.history["train_loss"], "val": self.history["val"]}

  # -- metrics ----------------------------------------------------------------------------------

  def _read(self, done_step: int, device_metrics, progress: loop.Progress) -> None:
    """A step's metrics: divergence (or a skipped float16 step), the history, and every
    train.log_every steps a record and a log line."""
    t = self.cfg.train
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    if values.get("skipped"):  # float16: non-finite gradients, update skipped, scale halved
      self.log(f"step {done_step:>6}/{self.total_steps} | skipped: non-finite gradients at loss scale "
               f"{values['loss_scale']:g} (halved; {values['skipped_steps']:.0f} skipped so far)")
      if values["loss_scale"] <= 1.0:
        raise progress.diverged(f"non-finite gradients even at loss scale {values['loss_scale']:g}", done_step)
    elif not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
      raise progress.diverged(f"loss={values['loss']} grad_norm={values['grad_norm']}", done_step)
    self.history["train_loss"].append((done_step, values["loss"]))
    self._window_steps += 1
    if done_step % t.log_every == 0 or done_step == self.total_steps or progress.ended:
      self._log_train(done_step, values, progress)
      self._window_start, self._window_steps = time.perf_counter(), 0

  def _log_train(self, done_step: int, values: dict, progress: loop.Progress) -> None:
    t = self.cfg.train
    elapsed = time.perf_counter() - self._window_start
    tok_s = self._window_steps * t.batch_tokens / max(elapsed, 1e-9)
    mfu = metrics_lib.mfu(self.flops_per_token, tok_s)
    mfu_nanochat = metrics_lib.mfu(self.flops_per_token_nanochat, tok_s)
    eta = (self.total_steps - done_step) * elapsed / self._window_steps
    if progress.budget.active:  # train.time_budget: the training seconds left, when fewer
      eta = min(eta, progress.budget.seconds * (1 - progress.budget.progress(done_step)))
    if self._epoch_progress[1] > 0:  # one epoch: the steps left at this pace, from the share of it done
      steps, share = self._epoch_progress
      eta = min(eta, steps * (1 - share) / share * elapsed / self._window_steps)
    scaling = {k: values[k] for k in ("loss_scale", "skipped_steps") if k in values}
    progress.writer.write(done_step, "train", {"seconds": progress.seconds(), "segment": progress.start,
                                               "loss": values["loss"], "lr": values["lr"],
                                               "grad_norm": values["grad_norm"], "tokens_per_sec": tok_s,
                                               "mfu": mfu, "mfu_nanochat": mfu_nanochat, **scaling})
    mfu_text = (f" | MFU {100 * mfu:.2f}% causal-half, {100 * mfu_nanochat:.2f}% nanochat"
                if mfu is not None else "")
    if scaling:
      mfu_text += f" | scale {scaling['loss_scale']:g} | skipped {scaling['skipped_steps']:.0f}"
    self.log(f"step {done_step:>6}/{self.total_steps} | loss {values['loss']:.4f} | lr {values['lr']:.2e} | "
             f"gnorm {values['grad_norm']:.3f} | {tok_s:,.0f} tok/s{mfu_text} | "
             f"ETA {duration(eta, clock=True)}")

  def _eval_missing(self, step: int) -> bool:
    """A resumed run at an eval step whose val record a kill (during that eval) prevented."""
    t = self.cfg.train
    if step % t.eval_every and step != self.total_steps:
      return False
    return bool(main_only(lambda: not any(r.get("split") == "val" and r.get("step") == step
                                          for r in metrics_lib.read_metrics(self.workdir)), self.main))

  def _log_eval(self, params, step: int, writer) -> None:
    val = self.evaluate(params)
    if val is not None:
      self.history["val"].append((step, val["loss"], val["bpb"]))
      writer.write(step, "val", val)
      self.log(f"step {step:>6}/{self.total_steps} | val loss {val['loss']:.4f} | val bpb {val['bpb']:.4f}")

