"""The one run loop: a run directory under its lock, restore or fresh start, the data iterator, the
train step, metrics read one step late, evaluation, checkpoints on a cadence, preemption, divergence
and closing. Pretraining uses `Trainer` as it is; SFT (lmtiny.chat.finetune) and RL
(lmtiny.training.policy_gradient) subclass it and replace its hooks.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import optax
from etils import epath
from flax import nnx

from lmtiny import config as config_lib
from lmtiny.data.pipeline import make_eval_iterator, make_train_iterator, map_train_state, worker_count
from lmtiny.errors import ConfigError, RunFailed
from lmtiny.fs import outputs
from lmtiny.fs.atomic import atomic_write
from lmtiny.model.sampling import sample_text
from lmtiny.parallel import sharding
from lmtiny.plan import arch, recipe
from lmtiny.plan.units import duration
from lmtiny.runs import kind as runkind, metrics as metrics_lib
from lmtiny.runs.checkpoint import abstract_with_shardings, Checkpointer
from lmtiny.runs.lock import main_only, RunLock
from lmtiny.runs.preemption import Preemption as _Preemption
from lmtiny.tasks import core, dclm
from lmtiny.tasks.scoring import Scorer
from lmtiny.training import resume
from lmtiny.training.steps import build_steps, check_batch_divisibility, device_batch


class TrainingDiverged(RunFailed):
  """Loss or gradient norm became NaN/Inf; the last good checkpoint was left intact."""


def check_training_config(cfg, mesh) -> None:
  """The config's own checks, then those that need the mesh or the evaluation tasks: before any
  data is built or anything is written."""
  config_lib.validate(cfg)
  cfg = recipe.resolve(cfg)  # nanochat's batch-size rules may set the batch: check the one that will run
  check_batch_divisibility(cfg, mesh)
  t = cfg.train
  if t.get("core_every", 0):
    core.task_names(t.core_tasks, f"config.train.core_tasks={t.core_tasks!r}", also=(dclm.CORE,))


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


def write_run_files(workdir: epath.Path, cfg, tokenizer, kind: str | None = None) -> None:
  """config.json, the tokenizer so that sampling needs nothing but the run
  directory, and the run's kind (lmtiny.runs.kind; default: the one its config implies) when the
  directory is new."""
  text = cfg.to_json_best_effort(indent=2)
  atomic_write(workdir / "config.json", text.encode())
  runkind.record_kind(str(workdir), kind or runkind.infer_kind(json.loads(text)))
  if hasattr(tokenizer, "model_proto") and not (workdir / "tokenizer.model").exists():
    atomic_write(workdir / "tokenizer.model", tokenizer.model_proto)



class Trainer:
  """One training run in `workdir`; `data` has train_docs, val_docs, token_bytes and tokenizer
  (lmtiny.data.dataset.Data; tests pass in-memory documents with the same attributes).

  Fine-tuning hooks: `init_params` (sharded model parameters, e.g. another run's checkpoint via
  lmtiny.runs.directory.load_weights) start a fresh run instead of a random init, and are consumed by it
  (their buffers become the state's; on a resume they are dropped); with an `adapter` (LoRA) they
  stay frozen and only the adapter's parameters train. Subclasses may replace
  `train_iterator` / `eval_iterator` with other packed batches (lmtiny.chat.data), and set `kind`
  (lmtiny.runs.kind): a run directory holding another kind of run is refused before any write.

  The run itself (`run`: lock, run files, disk check, restore, metrics, preemption, checkpoint
  cadence, divergence, closing) is every stage's; a stage that is not fed batches from documents
  (RL) sets the attributes `run` reads (cfg, workdir, log, main, mesh, steps, total_steps,
  tokenizer, adapter) and replaces the loop's hooks: `train_iterator` (None: no data position to
  checkpoint), `fresh_state`, `_check_workdir`, `_begin`, `_update`, `_after_step`, `_settle`,
  `_periodic`, `_run_record` and `_summary`."""

  kind = "train"
  stage = "training"  # divergence: "... at step N: training stopped; ..."

  def __init__(self, cfg, workdir: str, data, *, log: Callable[[str], None] = print,
               schedule: optax.Schedule | None = None, init_params=None, adapter=None):
    cfg = recipe.resolve(cfg)  # nanochat's batch-size rules, when the config asks for them
    self.cfg, self.workdir, self.data, self.log = cfg, workdir, data, log
    self.init_params, self.adapter = init_params, adapter
    self.tokenizer = data.tokenizer
    t = cfg.train
    self.mesh = sharding.make_mesh(cfg.mesh)
    check_training_config(cfg, self.mesh)
    if int(data.tokenizer.vocab_size) != cfg.model.vocab_size:
      raise ConfigError(f"config.model.vocab_size={cfg.model.vocab_size}: the data's tokenizer has "
                        f"{data.tokenizer.vocab_size} tokens")
    self.num_params = arch.count_params(cfg.model)
    self.total_steps = config_lib.total_steps(cfg, recipe.horizon_params(cfg.model, t))
    self.flops_per_token = arch.train_flops_per_token(cfg.model, t.seq_len)
    self.flops_per_token_nanochat = arch.train_flops_per_token(cfg.model, t.seq_len, "nanochat")
    self.main = jax.process_index() == 0
    self.steps = build_steps(cfg, self.mesh, self.total_steps, schedule, adapter=adapter,
                             frozen_params=init_params if adapter is not None else None)
    self.process_batch = config_lib.global_batch_size(t) // jax.process_count()
    self.core_items = self._load_core_items() if t.get("core_every", 0) else None

  # -- data ----------------------------------------------------------------------------------

  def _row_layout(self) -> dict:
    """How the packer lays out rows (data.max_docs_per_row, data.document_mask; get: older runs
    lack the fields)."""
    d = self.cfg.data
    return dict(max_docs_per_row=d.get("max_docs_per_row", 0), document_mask=d.get("document_mask", True))

  def train_iterator(self):
    t, d = self.cfg.train, self.cfg.data
    return make_train_iterator(self.data.train_docs, seq_len=t.seq_len, batch_size=self.process_batch,
                               bos_id=self.data.tokenizer.bos_id, seed=d.shuffle_seed,
                               process_index=jax.process_index(), process_count=jax.process_count(),
                               num_workers=d.num_workers, prefetch=d.get("prefetch", 0), **self._row_layout())

  def eval_iterator(self):
    t = config_lib.resolve_batch(self.cfg, sharding.data_parallel_size(self.mesh)).train
    return make_eval_iterator(self.data.val_docs, seq_len=t.seq_len,
                              batch_size=config_lib.micro_batch_size(t) // jax.process_count(),
                              bos_id=self.data.tokenizer.bos_id, num_batches=t.eval_batches,
                              process_index=jax.process_index(), process_count=jax.process_count(),
                              **self._row_layout())

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
    """train.core_tasks' items, read before training starts (a missing file or no network fails now):
    {"core": the DCLM bundle's Suite} and/or {"hf6": {task: items}}."""
    t = self.cfg.train
    names = core.task_names(t.core_tasks, f"config.train.core_tasks={t.core_tasks!r}", also=(dclm.CORE,))
    data_dir, flag = t.core_data_dir or None, "config.train.core_data_dir"
    out = {}
    if dclm.CORE in names:
      out[dclm.CORE] = dclm.load_suite(data_dir, t.core_items, flag=flag)
    hf6 = [name for name in names if name != dclm.CORE]
    if hf6:
      out[core.HF6] = {name: core.load_items(name, data_dir, t.core_items, flag=flag) for name in hf6}
    return out

  def log_core(self, params, step: int, writer) -> None:
    """DCLM CORE (lmtiny.tasks.dclm) and/or the HF6 tasks' mean (lmtiny.tasks.core), the eval CLI's
    scoring, of the current parameters: logged, and kept in metrics.jsonl as splits "core" (CORE and
    each task's centered accuracy as core:<label>) and "hf6" (all processes score, since the
    programs span the mesh)."""
    model = nnx.merge(self.steps.graphdef, self.steps.model_params(params))
    scorer = Scorer(model, self.mesh, rows_per_batch=4 * sharding.data_parallel_size(self.mesh))
    for suite, items in self.core_items.items():
      t0 = time.perf_counter()
      if suite == dclm.CORE:
        out = dclm.evaluate_core(scorer, self.data.tokenizer, items)
        label = f"CORE (DCLM, {len(out['results'])} tasks)"
      else:
        out = core.evaluate_hf6(scorer, self.data.tokenizer, items)
        label = "HF6 mean" if len(items) == len(core.TASKS) else f"HF6 mean ({len(items)}/{len(core.TASKS)})"
      seconds = time.perf_counter() - t0
      writer.write(step, suite, {suite: out[suite], "seconds": seconds,
                                 **{name: r["centered"] for name, r in out["results"].items()}})
      tasks = " ".join(f"{name.removeprefix(dclm.KEY_PREFIX)} {r['accuracy']:.3f}"
                       for name, r in out["results"].items())
      self.log(f"step {step:>6}/{self.total_steps} | {label} {out[suite]:.4f} | accuracy: {tasks} | {seconds:.0f}s")

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
    t = self.cfg.train
    (text,) = sample_text(model, self.data.tokenizer, [t.sample_prompt], max_new_tokens=t.sample_tokens, seed=t.seed)
    return t.sample_prompt, text

  # -- state -----------------------------------------------------------------------------------

  def _start(self, ckpt: Checkpointer, train_iter):
    """The newest checkpoint that restores cleanly (corrupt ones are moved aside), else a fresh state."""
    found = ckpt.restore_newest(lambda step: self._restore(ckpt, step, train_iter), self.log)
    if found is None:
      return self.fresh_state(), 0
    if self.adapter is None:  # full fine-tuning: the base is dropped on a resume
      self.init_params = None
    self.log(f"resumed from checkpoint at step {found[0]}")  # here, not in _restore: another process may yet reject that step
    return found[::-1]

  def fresh_state(self):
    """The state of a run with no checkpoint: over `init_params` (consumed by it, unless an adapter
    trains on them) or a random init."""
    params = None
    if self.adapter is None:
      params, self.init_params = self.init_params, None
    return self.steps.init(params)

  def _restore(self, ckpt: Checkpointer, step: int, train_iter):
    target = abstract_with_shardings(self.steps.abstract_state, self.steps.state_shardings)
    if train_iter is None:  # no data position to restore (RL draws its problems from the step)
      return ckpt.restore(step, target)
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

  # -- the run -----------------------------------------------------------------------------------

  def run(self, stop_after: int | None = None) -> dict:
    """Train to the end, or (as a preemption would) checkpoint and return after `stop_after`."""
    cfg, t = self.cfg, self.cfg.train
    workdir = epath.Path(self.workdir)
    with RunLock(self.workdir, log=self.log, enabled=self.main):
      changes = main_only(lambda: self._check_workdir(cfg), self.main)  # before any write
      if self.main:
        workdir.mkdir(parents=True, exist_ok=True)
        write_run_files(workdir, cfg, self.tokenizer, self.kind)
        outputs.check_disk_space(self.workdir, resume.state_bytes(self.steps.abstract_state),
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
          resume.record_config_changes(self.workdir, changes or {}, start, self.log)
        writer = metrics_lib.MetricsWriter(self.workdir, enabled=self.main, resume_step=start)
        with closing_run(ckpt, writer):
          summary = self._loop(state, start, ckpt, train_iter, writer, stop_after)
    if self.main and t.plot:
      metrics_lib.plot_loss_curve(self.workdir)
    return summary

  def _check_workdir(self, cfg) -> dict:
    """The run directory holds no run or one of this kind, whose config changes no shape (else a
    one-line error); returns the config's changes (resume.config_changes)."""
    runkind.check_kind(self.workdir, self.kind)
    return resume.config_changes(self.workdir, cfg)

  def _loop(self, state, start: int, ckpt: Checkpointer, train_iter, writer, stop_after) -> dict:
    t = self.cfg.train
    self._last_saved, self._segment, self._t0 = start, start, time.perf_counter()
    self._begin(state, start, writer)
    step, stop = start, False
    with _Preemption() as preemption:
      preemption.inherit()
      while step < self.total_steps:
        if step == start and (stop := preemption.decided(step)):
          self.log(f"stopped (SIGTERM) before step {step + 1}: nothing new to save")
          break
        ckpt.check_errors()  # a failed async save surfaces here, one step later
        state, step_metrics = self._update(state, step, train_iter)
        step += 1
        self._after_step(step, step_metrics, writer)
        # stop_after stops every process at once; a SIGTERM is agreed one step late (never a host sync)
        stop = preemption.decided(step, now=step == stop_after)
        if step % t.checkpoint_every == 0 or step == self.total_steps or stop:
          self._settle(writer)  # never checkpoint a state whose loss we have not seen to be finite
          ckpt.save(step, state, train_iter)
          self._last_saved = step
        self._periodic(state, step, writer)
        if stop:
          self.log(f"stopped early (SIGTERM or stop_after): saved checkpoint at step {step}")
          break
      self._settle(writer)
    writer.write(step, "run", self._run_record(step, start))
    self.state = state
    return self._summary(step, stop)

  def _seconds(self) -> float:
    """Since this segment of the run (this process's part of it) started its loop."""
    return time.perf_counter() - self._t0

  def _diverged(self, what: str, step: int) -> TrainingDiverged:
    """The error that stops a run whose step `step` went non-finite (its checkpoint is never saved)."""
    kept = (f"the last good checkpoint is step {self._last_saved}" if self._last_saved
            else "no checkpoint was saved")
    return TrainingDiverged(f"{what} at step {step}: {self.stage} stopped; {kept}")

  # -- the loop's hooks (pretraining and SFT: documents in, metrics read one step late) -----------

  def _begin(self, state, start: int, writer) -> None:
    """After the restore: the header line, and the validation point at the start (or one a kill lost)."""
    t = self.cfg.train
    self.log(f"model {self.num_params / 1e6:.2f}M params | {self.total_steps} steps of "
             f"{t.batch_tokens} tokens | mesh {dict(self.mesh.shape)} | {jax.device_count()} devices")
    if getattr(self.data, "description", ""):  # a weighted mixture of shard directories
      self.log(self.data.description)
    self._history = {"train_loss": [], "val": []}
    self._pending, self._window_start, self._window_steps = None, time.perf_counter(), 0
    if start == 0 or self._eval_missing(start):  # the val curve's start, or a point a kill lost
      self._log_eval(state["params"], start, self._history, writer)

  def _update(self, state, step: int, train_iter):
    """One optimizer step on the next batch: (state, the step's metrics, still on the device)."""
    return self.steps.train_step(state, device_batch(next(train_iter), self.mesh))

  def _after_step(self, step: int, step_metrics, writer) -> None:
    """The previous step's metrics are read now (one step late, so the host never waits on the device)."""
    if self._pending is not None:
      self._flush(self._pending, writer)
    self._pending = (step, step_metrics)

  def _settle(self, writer) -> None:
    """Reads the metrics not read yet (before a checkpoint or an evaluation, and at the end)."""
    if self._pending is not None:
      self._flush(self._pending, writer)
      self._pending = None

  def _flush(self, pending, writer) -> None:
    """A step's metrics: divergence (or a skipped float16 step), the history, and every
    train.log_every steps a record and a log line."""
    t = self.cfg.train
    done_step, device_metrics = pending
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    if values.get("skipped"):  # float16: non-finite gradients, update skipped, scale halved
      self.log(f"step {done_step:>6}/{self.total_steps} | skipped: non-finite gradients at loss scale "
               f"{values['loss_scale']:g} (halved; {values['skipped_steps']:.0f} skipped so far)")
      if values["loss_scale"] <= 1.0:
        raise self._diverged(f"non-finite gradients even at loss scale {values['loss_scale']:g}", done_step)
    elif not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
      raise self._diverged(f"loss={values['loss']} grad_norm={values['grad_norm']}", done_step)
    self._history["train_loss"].append((done_step, values["loss"]))
    self._window_steps += 1
    if done_step % t.log_every == 0 or done_step == self.total_steps:
      elapsed = time.perf_counter() - self._window_start
      tok_s = self._window_steps * t.batch_tokens / max(elapsed, 1e-9)
      mfu = metrics_lib.mfu(self.flops_per_token, tok_s)
      mfu_nanochat = metrics_lib.mfu(self.flops_per_token_nanochat, tok_s)
      eta = (self.total_steps - done_step) * elapsed / self._window_steps
      scaling = {k: values[k] for k in ("loss_scale", "skipped_steps") if k in values}
      writer.write(done_step, "train", {"seconds": self._seconds(), "segment": self._segment,
                                        "loss": values["loss"], "lr": values["lr"],
                                        "grad_norm": values["grad_norm"], "tokens_per_sec": tok_s, "mfu": mfu,
                                        "mfu_nanochat": mfu_nanochat, **scaling})
      mfu_text = (f" | MFU {100 * mfu:.2f}% causal-half, {100 * mfu_nanochat:.2f}% nanochat"
                  if mfu is not None else "")
      if scaling:
        mfu_text += f" | scale {scaling['loss_scale']:g} | skipped {scaling['skipped_steps']:.0f}"
      self.log(f"step {done_step:>6}/{self.total_steps} | loss {values['loss']:.4f} | lr {values['lr']:.2e} | "
               f"gnorm {values['grad_norm']:.3f} | {tok_s:,.0f} tok/s{mfu_text} | "
               f"ETA {duration(eta, clock=True)}")
      self._window_start, self._window_steps = time.perf_counter(), 0

  def _periodic(self, state, step: int, writer) -> None:
    """Validation, CORE / HF6 and samples on their cadences (and at the end)."""
    t, at_end = self.cfg.train, step == self.total_steps
    if step % t.eval_every == 0 or at_end:
      self._settle(writer)
      self._log_eval(state["params"], step, self._history, writer)
    if self.core_items is not None and (at_end or step % t.core_every == 0):
      self.log_core(state["params"], step, writer)
    if at_end or (t.sample_every and step % t.sample_every == 0):
      self.sample(state["params"], step, writer)

  def _segment_record(self, step: int, start: int) -> dict:
    """What every stage's "run" record holds: this segment's wall time, steps and chips."""
    return {"seconds": self._seconds(), "segment": start, "steps": step - start,
            "chips": metrics_lib.chip_count(), "chip": metrics_lib.chip_name()}

  def _run_record(self, step: int, start: int) -> dict:
    """The "run" record closing this segment (the report card's wall time, tokens and chips)."""
    return {**self._segment_record(step, start), "tokens": (step - start) * self.cfg.train.batch_tokens,
            "peak_flops": metrics_lib.peak_flops_total()}

  def _summary(self, step: int, stop: bool) -> dict:
    return {"step": step, "num_params": self.num_params, "total_steps": self.total_steps,
            "train_loss": self._history["train_loss"], "val": self._history["val"], "preempted": stop,
            "seconds": self._seconds()}

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
