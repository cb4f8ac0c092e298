"""Supervised fine-tuning and midtraining on conversations: the next-token stage
(lmtiny.training.trainer) fed chat batches, with the chat suite as one more evaluation.

  cfg = sft_config(cfg, init, init_step)   # the base run's model, sft.* as train / optim settings
  trainer, summary = finetune(cfg, workdir)

The base run's checkpoint gives the starting weights (`lmtiny.runs.directory.load_weights`, onto this
run's mesh; a LoRA base run's adapters folded into its own base); batches come from
lmtiny.chat.data (packed conversations with the render's loss mask, mixed with pretraining
documents if the mixture names `pretrain`); with lora.rank > 0 the base stays frozen and only
the adapters train (their optimizer state is all there is). The run directory is a normal run
directory: config.json (which records the base run's path and step in sft.init / sft.init_step),
tokenizer.model, checkpoints, metrics. Re-running resumes.

With sft.chat_eval_every > 0 the chat suite (lmtiny.tasks.chat_suite: ARC, MMLU, GSM8K, HumanEval,
spelling; sft.chat_eval_tasks) scores the model every that many steps and at the end, as
train.core_every does CORE in pretraining: logged, and kept in metrics.jsonl as split "chat" (each
task's accuracy, ChatCORE when all six ran, seconds). Its data is read before training starts.

sft.steps=0 trains one epoch of the `nanochat` source's mixture, as nanochat's SFT does by default
(lmtiny.training.epoch): the run ends when its best-fit rows have placed every conversation once,
and the LR follows that progress (optim.warmup_steps in steps, then optim.schedule over the epoch,
x sft.init_lr_frac). train.steps becomes the most steps an epoch can take, for the logs.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable

import jax
import ml_collections
from etils import epath

from lmtiny.chat.conversations import parse_mixture
from lmtiny.chat.data import ChatData, load_chat_data, make_chat_eval_iterator, make_chat_train_iterator
from lmtiny.chat.turn_ending import assistant_end_report, held_out_questions
from lmtiny.chat import nanochat_sft
from lmtiny.chat.warm_start import BaseOptimizerState, check_base_optimizer, epoch_lr_scale, scaled_schedule
from lmtiny.data.dataset import load_data as load_pretrain
from lmtiny.errors import ConfigError
from lmtiny.model.adapters import from_config
from lmtiny.parallel import sharding
from lmtiny.runs import kind as runkind
from lmtiny.runs.config_file import MOVE_ASIDE, read_run_config, read_saved_config
from lmtiny.runs.directory import load_run, load_weights
from lmtiny.tasks import chat_suite
from lmtiny.tokenizer import Tokenizer
from lmtiny.training import epoch
from lmtiny.training.resolved import resolve_run, ResolvedRun
from lmtiny.training.resume import state_bytes
from lmtiny.training.trainer import Trainer

# Model fields that decide the parameters' shapes: a --config must agree with the base run.
SHAPE_FIELDS = ("vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "num_kv_heads", "mlp_ratio",
                "mlp_dim", "activation", "tie_embeddings", "qk_norm", "norm_scale", "scan_layers")
INIT_FLAGS = ("--init", "--init-step")  # how messages about the base run name it


class ChatBatches:
  """SFT's rows: rendered conversations (and pretraining documents, if the mixture names
  `pretrain`) packed with the render's loss mask (lmtiny.chat.data)."""

  def __init__(self, cfg, data: ChatData, epoch_micro_rows: int = 0):
    """`epoch_micro_rows` > 0: one epoch (sft.steps=0), whose end nanochat counts after the first
    micro-batch of a step: that many of this process's rows."""
    self.cfg, self.data, self.epoch_micro_rows = cfg, data, epoch_micro_rows

  def train_iterator(self, batch_size: int):
    rows = make_chat_train_iterator(self.data, seq_len=self.cfg.train.seq_len, batch_size=batch_size,
                                    seed=self.cfg.data.shuffle_seed, process_index=jax.process_index(),
                                    process_count=jax.process_count(), max_per_row=self.cfg.data.max_docs_per_row,
                                    document_mask=self.cfg.data.document_mask)
    if not self.epoch_micro_rows:
      return rows
    return epoch.OneEpoch(rows, len(self.data.train[0][0]), self.epoch_micro_rows, jax.process_index(),
                          jax.process_count())

  def eval_iterator(self, batch_size: int, num_batches: int):
    t = self.cfg.train
    return make_chat_eval_iterator(self.data.val_docs, seq_len=t.seq_len, num_batches=num_batches,
                                   batch_size=batch_size, process_index=jax.process_index(),
                                   process_count=jax.process_count(), max_per_row=self.cfg.data.max_docs_per_row,
                                   data=self.data, document_mask=self.cfg.data.document_mask)

  def sample_pair(self, model) -> tuple[str, str]:
    """A reply to the first held-out question, as the chat template renders it (a pretraining
    prompt's continuation says nothing about a chat model)."""
    t = self.cfg.train
    report = assistant_end_report(model, self.data.tokenizer, held_out_questions()[:1],
                                  max_new_tokens=t.sample_tokens, seed=t.seed)
    question, reply = report.example
    return f"{question}\n", reply


class ChatSuiteEvaluation:
  """The chat suite (lmtiny.tasks.chat_suite: ARC, MMLU, GSM8K, HumanEval, spelling;
  sft.chat_eval_tasks) every sft.chat_eval_every steps and at the end: logged, and kept in
  metrics.jsonl as split "chat" (each task's accuracy, ChatCORE when all six ran, seconds). Its
  rows are read when it is made, before training starts."""

  def __init__(self, cfg, tokenizer, mesh, total_steps: int, log: Callable[[str], None]):
    s = cfg.sft
    self.every, self.max_new_tokens = s.chat_eval_every, s.chat_eval_max_new_tokens
    self.tokenizer, self.mesh, self.total_steps, self.log = tokenizer, mesh, total_steps, log
    self.rows = chat_suite.load_chat_rows(chat_eval_tasks(s), s.chat_eval_data_dir or None, s.chat_eval_items,
                                          flag="config.sft.chat_eval_data_dir")

  def due(self, step: int, at_end: bool) -> bool:
    return at_end or step % self.every == 0

  def run(self, model, step: int, writer) -> None:
    """Every process runs it (the programs span the mesh); the main one writes."""
    t0 = time.perf_counter()
    results = chat_suite.evaluate_chat_model(model, self.mesh, self.tokenizer, self.rows,
                                             batch=4 * sharding.data_parallel_size(self.mesh),
                                             max_new_tokens=self.max_new_tokens)
    seconds = time.perf_counter() - t0
    record = {name: r["accuracy"] for name, r in results.items()}
    score = chat_suite.chat_core(results)
    if score is not None:
      record["chatcore"] = score
    writer.write(step, "chat", {**record, "seconds": seconds})
    tasks = " ".join(f"{name} {r['accuracy']:.3f}" for name, r in results.items())
    summary = f" | ChatCORE {score:.4f}" if score is not None else ""
    self.log(f"step {step:>6}/{self.total_steps} | chat: {tasks}{summary} | {seconds:.0f}s")


def sft_config(cfg, init: str, init_step: int | None) -> ml_collections.ConfigDict:
  """The fine-tuning config: the base run's model, sft.* turned into train / optim settings, and
  the base run's path and checkpoint step recorded in sft.init / sft.init_step. Checked with the
  rest of the config when it is resolved (lmtiny.training.resolved)."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  init = init or cfg.sft.init
  if not init:
    raise ConfigError("--init is required: the base run directory (e.g. --init runs/tiny)")
  step = init_step if init_step is not None and init_step >= 0 else None
  if step is None and cfg.sft.init and os.path.abspath(cfg.sft.init) == os.path.abspath(init):
    step = cfg.sft.init_step  # a config that names this base run may pin its step; a config read
    # from an earlier fine-tuning run (sft --init RUN/mid) names *that* run's base, not this one
  step = load_run(init, None if step is None or step < 0 else step, flags=INIT_FLAGS).step
  base = read_run_config(init)  # load_run checked that `init` is a run directory
  for field in SHAPE_FIELDS:
    if cfg.model[field] != base.model[field]:
      raise ConfigError(f"config.model.{field}={cfg.model[field]!r}: the base run {init} has "
                        f"{base.model[field]!r} (the config must describe the base model)")
  s = cfg.sft
  s.init, s.init_step = os.path.abspath(init) if "://" not in init else init, step
  cfg.model.max_seq_len = base.model.max_seq_len
  # An imported run's config keeps the defaults' 1024-token rows; rows cannot outgrow the model.
  cfg.train.seq_len = min(cfg.train.seq_len, cfg.model.max_seq_len)
  cfg.data = base.data  # the base run's data: its tokenizer, and its documents for `pretrain`
  if s.steps == 0 and not any(nanochat_sft.is_nanochat(spec) for spec, _ in parse_mixture(s.sources)):
    raise ConfigError(f"config.sft.steps=0: one epoch is counted on the {nanochat_sft.SPEC} source's best-fit rows, "
                      f"and config.sft.sources={s.sources} repeats without end; set config.sft.steps > 0")
  # sft.steps=0 (one epoch): finetune sets train.steps to the epoch's bound once the mixture is read
  cfg.train.update(steps=s.steps or 1, tokens_per_param=0.0)
  # sft.lr replaces the matrix LR only. Explicit embedding / unembedding LRs stay the config's: the
  # chat tokens' rows are untrained in a base model and must be learned here. Scaled down with
  # sft.lr (nanochat's SFT, which follows a midtraining at full LRs), tiny's demo ended 6/109
  # replies with <|assistant_end|> instead of 109/109.
  cfg.optim.update(lr=s.lr, warmup_steps=s.warmup_steps)
  return cfg


def chat_eval_tasks(s) -> list[str]:
  """sft.chat_eval_tasks as task names (lmtiny.tasks.chat_suite); a UserError names the field."""
  return chat_suite.chat_task_names(s.chat_eval_tasks, "config.sft.chat_eval_tasks")


def check_sft_workdir(workdir: str, init: str) -> None:
  """The fine-tuning run directory is not the base run, nor a run of another kind (lmtiny.runs.kind:
  an RL run's config also names a base in sft.init), nor another base's fine-tuning run: a re-run
  there would resume (or overwrite) a run that is not this one."""
  if os.path.abspath(workdir) == os.path.abspath(init):
    raise ConfigError(f"--workdir={workdir}: is the base run (--init); fine-tune into another "
                      "directory (default: <init>/sft)")
  runkind.check_kind(workdir, "sft")
  saved = read_saved_config(workdir, missing_ok=True, hint=MOVE_ASIDE)
  if saved is None:
    return
  recorded = saved["sft"].get("init") if isinstance(saved.get("sft"), dict) else None  # a JSON record
  if recorded != init:
    what = f"a fine-tuning run of {recorded}" if recorded else "a run that is not a fine-tuning run"
    raise ConfigError(f"--workdir={workdir}: holds {what}, not of --init={init}; choose another --workdir")


def restore_base_params(cfg, mesh):
  """The base run's parameters (sft.init at sft.init_step; a LoRA base run's adapters folded in),
  sharded on `mesh`."""
  return load_weights(cfg.sft.init, cfg.sft.init_step, mesh=mesh, flags=INIT_FLAGS)[1]


def load_sft_data(cfg) -> ChatData:
  """The tokenizer of the base run and the conversation mixture rendered with it."""
  tokenizer_path = epath.Path(cfg.sft.init) / "tokenizer.model"
  if not tokenizer_path.exists():
    raise ConfigError(f"--init={cfg.sft.init}: no tokenizer.model in the base run")
  tokenizer = Tokenizer(tokenizer_path.read_bytes())
  pretrain = None
  if "pretrain" in [spec for spec, _ in parse_mixture(cfg.sft.sources)]:
    pretrain = load_pretrain(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=cfg.train.seq_len).train_docs
  return load_chat_data(cfg.sft.sources, tokenizer, cfg.train.seq_len, pretrain)


def finetune(cfg, workdir: str, *, log: Callable[[str], None] = print, stop_after: int | None = None):
  """Fine-tunes (cfg from sft_config, or that config resolved); returns (trainer, summary)."""
  run = cfg if isinstance(cfg, ResolvedRun) else resolve_run(cfg)
  cfg = run.cfg
  check_base_optimizer(cfg)  # sft.load_optimizer: one line now if the base's state cannot be this run's
  data = load_sft_data(cfg)
  log(f"sft data: {data.describe()}")
  one_epoch = cfg.sft.steps == 0
  if one_epoch:
    cfg.train.steps = epoch.step_bound(len(data.train[0][0]), run.process_batch * jax.process_count())
    run = dataclasses.replace(run, total_steps=cfg.train.steps)
  adapter = from_config(cfg.model, cfg.lora)
  total = run.total_steps
  chat = [ChatSuiteEvaluation(cfg, data.tokenizer, run.mesh, total, log)] if cfg.sft.chat_eval_every else []
  # No reference kept here: a full fine-tune's state takes over the base's buffers.
  warm = BaseOptimizerState(cfg, log) if cfg.sft.load_optimizer else None
  batches = ChatBatches(cfg, data, run.micro_batch // jax.process_count() if one_epoch else 0)
  trainer = Trainer(run, workdir, data, log=log, init_params=restore_base_params(cfg, run.mesh), adapter=adapter,
                    kind="sft", name="SFT", batches=batches, evaluations=chat, init_opt_state=warm,
                    schedule=None if one_epoch else scaled_schedule(cfg, total),
                    lr_by_progress=epoch_lr_scale(cfg) if one_epoch else None)
  abstract = trainer.steps.abstract_state
  trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract["params"]))
  log(f"base {cfg.sft.init} step {cfg.sft.init_step} | "
      + (f"LoRA rank {cfg.lora.rank} on {len(adapter.specs)} weights" if adapter else "full fine-tuning")
      + (f" | LRs x{cfg.sft.init_lr_frac:g}" if cfg.sft.init_lr_frac != 1 else "")
      + (" | optimizer state from the base run" if warm else "")
      + f" | trainable {trainable:,} of {trainer.num_params:,} params | optimizer state "
        f"{state_bytes(abstract['opt_state']) / 2**20:.2f} MiB")
  summary = trainer.run(stop_after=stop_after)
  summary.update(trainable_params=trainable, optimizer_bytes=state_bytes(abstract["opt_state"]))
  return trainer, summary
