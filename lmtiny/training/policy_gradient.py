"""On-policy RL on GSM8K-shaped problems, as nanochat's chat_rl: REINFORCE with a group baseline.

Each step takes `questions` problems (a fixed, seeded order over the training rows, epoch by
epoch) and samples `samples` replies to each with the KV-cache sampler and the calculator tool
(`lmtiny.tasks.gsm8k.generate_with_tools`). Reward: 1 if the reply's `####` answer is right.
Advantage: reward minus the mean reward of the question's group. The update is the trainer's
own sharded train step on rows [prompt + reply], whose float `loss_mask` holds each sampled
token's advantage (0 on the prompt and on forced tool output), so the loss is
    sum_t adv_t * CE_t / #(adv_t != 0)
and its gradient is token-level REINFORCE. A step where every group's rewards are equal carries no
signal and makes no update (Adam's momentum would otherwise repeat the last one). Optional KL to the initial model (`kl`), folded into
the per-token weight as a reward penalty: adv_t - kl * (log pi(a_t) - log pi_init(a_t)).

Mesh: the init run's (data / fsdp / tensor, as lmtiny.sft inherits its base run's), so a model
that needed FSDP or tensor parallelism to fit is RL-trained sharded the same way; the sampler and
the train step both run on it. `mesh=` overrides axes (the CLI's `--config.mesh.<axis>=N`), and
an inherited mesh that does not fit this machine's devices falls back (`rl_mesh`).

Exact resume: the checkpoint holds params, optimizer state and step; the questions and the
sampling seed of step s are functions of (seed, s), so a resumed run repeats the same rewards
and losses as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from etils import epath

from lmtiny.config import MESH_AXES
from lmtiny.errors import ConfigError, UserError
from lmtiny.fs import outputs
from lmtiny.model.sampling import Sampler, SamplingParams
from lmtiny.parallel import sharding
from lmtiny.runs import kind as runkind, metrics as metrics_lib
from lmtiny.runs.checkpoint import abstract_with_shardings, Checkpointer
from lmtiny.runs.directory import load_run, load_weights
from lmtiny.runs.lock import RunLock
from lmtiny.runs.preemption import Preemption
from lmtiny.tasks import gsm8k
from lmtiny.tokenizer import render_for_completion
from lmtiny.training import resume
from lmtiny.training.loop import _write_run_files, closing_run, TrainingDiverged
from lmtiny.training.steps import build_steps, token_losses


class RLError(UserError):
  """A bad RL flag or init run."""


@dataclasses.dataclass
class RLSettings:
  steps: int = 100
  questions: int = 8          # problems per step
  samples: int = 8            # replies per problem (k)
  max_new_tokens: int = 128
  temperature: float = 1.0
  top_k: int = 50
  lr: float = 1e-4
  warmup_steps: int = 0       # linear LR warmup (a fresh Adam state's first updates are ~sign(g) * lr)
  kl: float = 0.0
  log_every: int = 1
  eval_every: int = 20        # 0: only at the end
  eval_questions: int = 32   # 0: no held-out evaluation
  checkpoint_every: int = 20
  seed: int = 0


def check_values(s: RLSettings) -> None:
  """Each setting on its own: counts in range, every float finite and in range (RLError naming
  the flag; the CLI checks these as it parses, before anything is read or written)."""
  for name in ("steps", "questions", "samples", "max_new_tokens", "log_every", "checkpoint_every"):
    if getattr(s, name) < 1:
      raise RLError(f"--{name.replace('_', '-')}={getattr(s, name)}: must be >= 1")
  # 0: only at the end / no evaluation / no top-k / no warmup
  for name in ("eval_every", "eval_questions", "top_k", "warmup_steps"):
    if getattr(s, name) < 0:
      raise RLError(f"--{name.replace('_', '-')}={getattr(s, name)}: must be >= 0")
  for name, zero_ok in (("temperature", False), ("lr", False), ("kl", True)):
    value = getattr(s, name)  # NaN fails every comparison: `value <= 0` alone would pass it
    if not (math.isfinite(value) and (value >= 0 if zero_ok else value > 0)):
      raise RLError(f"--{name}={value}: must be a finite number {'>=' if zero_ok else '>'} 0")


def check_settings(s: RLSettings, dp: int) -> None:
  check_values(s)
  if (s.questions * s.samples) % dp:
    raise RLError(f"--questions={s.questions} x --samples={s.samples} = {s.questions * s.samples} rows per step "
                  f"do not divide over the data-parallel size {dp}")


def check_workdir(workdir: str, init_dir: str) -> None:
  """The RL run directory is not the init run, and holds no run of another kind (lmtiny.runs.kind):
  RL would take its checkpoints for its own state, rewrite its config and prune its checkpoints."""
  same = (workdir.rstrip("/") == init_dir.rstrip("/") if "://" in workdir + init_dir
          else os.path.realpath(workdir) == os.path.realpath(init_dir))
  if same:
    raise RLError(f"--workdir={workdir}: is the init run (--init); the RL run needs a directory of its own "
                  "(e.g. RUN/rl next to RUN/sft)")
  runkind.check_kind(workdir, "rl")


def mesh_overrides(values: dict) -> dict[str, int]:
  """{axis: size} from {axis: flag value or None} (`--config.mesh.<axis>=N`); RLError for a value
  that is not -1 or a positive integer, or an axis that is not a mesh axis."""
  out = {}
  for axis, value in values.items():
    if value is None:
      continue
    if axis not in MESH_AXES:
      raise RLError(f"--config.mesh.{axis}: no such mesh axis (have {', '.join(MESH_AXES)})")
    try:
      size = int(value) if not isinstance(value, (bool, float)) else None
    except ValueError:
      size = None
    if size is None or not (size == -1 or size > 0):
      raise RLError(f"--config.mesh.{axis}={value}: must be -1 or a positive integer")
    out[axis] = size
  return out


def _fallback_mesh(init: dict, num_devices: int) -> dict[str, int]:
  """A mesh for `num_devices` with the init run's layout: its tensor axis where that divides the
  devices, every other device on fsdp if the init run sharded over fsdp (its parameters and Adam
  state may not fit replicated), else on data."""
  tensor = init["tensor"] if init["tensor"] > 0 and num_devices % init["tensor"] == 0 else 1
  if init["fsdp"] == -1 or init["fsdp"] > 1:
    return dict(data=1, fsdp=-1, tensor=tensor)
  return dict(data=-1, fsdp=1, tensor=tensor)


def rl_mesh(init_mesh, overrides: dict[str, int], num_devices: int) -> tuple[dict[str, int], str | None]:
  """(the RL run's mesh config, a line to log or None). The base is the init run's mesh or, when
  that does not fit `num_devices` (a mesh fixed for another machine, e.g. data=8 on one device),
  `_fallback_mesh` of it, with a line saying so. `overrides` (mesh_overrides) are laid over the
  base field by field, as `--config.mesh.*` overrides a config (an axis set to -1 takes the
  devices of the base's -1 axis, which becomes 1); the result must fit (else ConfigError)."""
  init = {a: int(init_mesh[a]) if init_mesh and a in init_mesh else d
          for a, d in zip(MESH_AXES, (-1, 1, 1))}  # a config without a mesh: data parallel
  base, note = init, None
  try:
    sharding.mesh_shape(init, num_devices)
  except ConfigError as e:
    base = _fallback_mesh(init, num_devices)
    note = (f"mesh: the init run's {init} does not fit this machine ({e}); falling back to {base}"
            + ("" if overrides else " (--config.mesh.<axis>=N chooses another)"))
  mesh = {**base, **overrides}
  if -1 in overrides.values():  # `--config.mesh.fsdp=-1` alone: fsdp takes the devices the base's -1 had
    mesh = {a: 1 if size == -1 and a not in overrides else size for a, size in mesh.items()}
  if sum(size == -1 for size in mesh.values()) > 1:
    raise RLError(f"--config.mesh: {mesh}: at most one axis may be -1")
  sharding.mesh_shape(mesh, num_devices)
  return mesh, note


def rl_config(init_cfg, s: RLSettings, mesh: dict[str, int] | None = None):
  """The init run's config with the RL batch (one row per sample, the model's context long) and LR,
  on `mesh` (rl_mesh; default: the init run's mesh); not a LoRA run even when the init run is one."""
  cfg = init_cfg.copy_and_resolve_references()
  seq_len = cfg.model.max_seq_len
  cfg.train.update(seq_len=seq_len, batch_tokens=seq_len * s.questions * s.samples, micro_batch_size=0,
                   steps=s.steps, tokens_per_param=0.0, seed=s.seed)
  cfg.optim.update(lr=s.lr, embed_lr=0.0, unembed_lr=0.0, warmup_steps=s.warmup_steps, min_lr_ratio=0.0, weight_decay=0.0)
  if mesh is not None or "mesh" not in cfg:
    cfg.mesh = ml_collections.ConfigDict(mesh or dict(data=-1, fsdp=1, tensor=1))
  if "lora" in cfg:
    cfg.lora.rank = 0  # RL trains every weight of the (merged) init model: its checkpoints are full runs'
  cfg.rl = dataclasses.asdict(s)
  return cfg


def step_questions(num_rows: int, step: int, count: int, seed: int) -> list[int]:
  """The problems of `step`: consecutive slices of a per-epoch seeded permutation."""
  out = []
  for k in range(step * count, (step + 1) * count):
    epoch, at = divmod(k, num_rows)
    out.append(random.Random(seed * 1_000_003 + epoch).sample(range(num_rows), num_rows)[at])
  return out


def build_batch(prompts, gens, seq_len: int) -> dict[str, np.ndarray]:
  """Rows [prompt + reply] cut to seq_len + 1; loss_mask 1 on the tokens the model sampled (the
  caller turns it into per-token weights), 0 on prompts, forced tool output and padding."""
  b = len(prompts)
  out = {k: np.zeros((b, seq_len), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
  out["loss_mask"] = np.zeros((b, seq_len), np.float32)
  for r, (prompt, gen) in enumerate(zip(prompts, gens)):
    ids = (list(prompt) + gen.ids)[:seq_len + 1]
    n = len(ids) - 1
    out["inputs"][r, :n], out["targets"][r, :n] = ids[:-1], ids[1:]
    out["segment_ids"][r, :n], out["positions"][r, :n] = 1, np.arange(n)
    for j, sampled in enumerate(gen.sampled):
      t = len(prompt) - 1 + j
      if sampled and t < n:
        out["loss_mask"][r, t] = 1.0
  return out


class Reinforce:
  """An RL run in `workdir`, starting from the run in `init_dir` (its newest checkpoint), on the
  init run's mesh over `devices` (default: all), with `mesh` ({axis: size}) overriding axes."""

  def __init__(self, init_dir: str, workdir: str, settings: RLSettings, train_rows, eval_rows, *,
               log: Callable[[str], None] = print, devices=None, mesh: dict | None = None):
    check_workdir(workdir, init_dir)
    self.init = load_run(init_dir, flags=("--init", "--init-step"))
    self.s, self.workdir, self.log = settings, workdir, log
    self.train_rows, self.eval_rows = train_rows, eval_rows
    devices = jax.devices() if devices is None else devices
    mesh_cfg, note = rl_mesh(self.init.cfg.get("mesh"), mesh_overrides(mesh or {}), len(devices))
    if note:
      log(note)
    self.cfg = rl_config(self.init.cfg, settings, mesh_cfg)
    self.tokenizer = self.init.tokenizer
    self.mesh = sharding.make_mesh(self.cfg.mesh, devices)
    check_settings(settings, sharding.data_parallel_size(self.mesh))
    resume.config_changes(workdir, self.cfg)  # a change of shapes: one line now (again under the lock)
    self.steps = build_steps(self.cfg, self.mesh, settings.steps)
    self._losses = jax.jit(token_losses, static_argnums=0)
    self._prompt = lambda row: render_for_completion(self.tokenizer, [{"role": "user", "content": row["question"]}])

  def _init_params(self):
    """The init run's parameters on this mesh (a LoRA run's merged; its newest usable checkpoint)."""
    self.init, params = load_weights(self.init, mesh=self.mesh, log=self.log, flags=("--init", "--init-step"))
    return params

  def _initial_state(self):
    """A fresh state (Adam's zeros, step 0) over the init run's parameters, which it takes over."""
    return self.steps.init(self._init_params())

  def _sampler(self, params):
    from flax import nnx
    return Sampler(nnx.merge(self.steps.graphdef, params))

  def rollout(self, params, step: int):
    """Prompts, generations and rewards [questions, samples] of `step`."""
    s = self.s
    picks = step_questions(len(self.train_rows), step, s.questions, s.seed)
    rows = [self.train_rows[q] for q in picks for _ in range(s.samples)]
    prompts = [self._prompt(r) for r in rows]
    gens = gsm8k.generate_with_tools(self._sampler(params), self.tokenizer, prompts, max_new_tokens=s.max_new_tokens,
                                     sampling=SamplingParams(s.temperature, s.top_k, 1.0),
                                     seed=s.seed * 1_000_003 + step)
    rewards = np.array([gsm8k.reward(g.text, r["answer"]) for g, r in zip(gens, rows)]).reshape(s.questions, s.samples)
    return rows, prompts, gens, rewards

  def _token_weights(self, batch, params, ref_params, adv_B):
    """Each sampled token's weight: its reply's advantage, minus the KL penalty when kl > 0."""
    sampled = batch["loss_mask"]
    weights = sampled * adv_B[:, None]
    if self.s.kl:
      device = sharding.global_batch_from_local(batch, self.mesh)
      ce = np.asarray(jax.device_get(self._losses(self.steps.graphdef, params, device)))
      ce_ref = np.asarray(jax.device_get(self._losses(self.steps.graphdef, ref_params, device)))
      weights = weights - sampled * self.s.kl * (ce_ref - ce)  # log pi - log pi_init = ce_ref - ce
    return weights.astype(np.float32)

  def evaluate(self, params, step: int, writer) -> dict:
    result = gsm8k.evaluate(self._sampler(params), self.tokenizer, self.eval_rows[:self.s.eval_questions],
                            max_new_tokens=self.s.max_new_tokens, sampling=SamplingParams(0.0, 0, 1.0))
    writer.write(step, "rl_eval", {"accuracy": result["accuracy"], "items": result["items"]})
    self.log(f"step {step:>5}/{self.s.steps} | eval accuracy {result['accuracy']:.3f} on {result['items']} problems")
    return result

  def run(self, stop_after: int | None = None) -> dict:
    """RL to `steps`, or (as a SIGTERM would) checkpoint and return after `stop_after` steps. Holds
    the run directory's lock; resumes from the newest checkpoint that restores (corrupt ones moved aside)."""
    s, workdir = self.s, epath.Path(self.workdir)
    with RunLock(self.workdir, log=self.log):
      check_workdir(self.workdir, self.init.workdir)  # before any write
      changes = resume.config_changes(self.workdir, self.cfg)
      workdir.mkdir(parents=True, exist_ok=True)
      _write_run_files(workdir, self.cfg, self.tokenizer, "rl")
      keep = 2
      outputs.check_disk_space(self.workdir, resume.state_bytes(self.steps.abstract_state), keep, self.log)
      ckpt = Checkpointer(str(workdir / "checkpoints"), keep=keep, async_save=False)
      with jax.set_mesh(self.mesh):
        try:
          target = abstract_with_shardings(self.steps.abstract_state, self.steps.state_shardings)
          found = ckpt.restore_newest(lambda step: ckpt.restore(step, target), self.log)
        except BaseException:
          ckpt.close()
          raise
        if found is not None:
          self.log(f"resumed from checkpoint at step {found[0]}")
        start, state = found if found is not None else (0, self._initial_state())
        resume.record_config_changes(self.workdir, changes, start, self.log)
        writer = metrics_lib.MetricsWriter(self.workdir, resume_step=start)  # 0: a killed first attempt's records go
        with closing_run(ckpt, writer):
          summary = self._loop(state, start, ckpt, writer, stop_after)
    return summary

  def _loop(self, state, start: int, ckpt: Checkpointer, writer, stop_after) -> dict:
    s = self.s
    self.log(f"rl from {self.init.workdir} step {self.init.step} | mesh {dict(self.mesh.shape)} | "
             f"{self.mesh.size} devices")
    ref_params = self._init_params() if s.kl else None  # the KL reference: weights only, no optimizer state
    history, step, sampled_tokens, stop, t0 = [], start, 0, False, time.perf_counter()
    last_saved = start
    with Preemption() as preemption:
      preemption.inherit()
      while step < s.steps:
        if step == start and (stop := preemption.decided(step)):
          self.log(f"stopped (SIGTERM) before step {step + 1}: nothing new to save")
          break
        rows, prompts, gens, rewards = self.rollout(state["params"], step)
        adv = (rewards - rewards.mean(axis=1, keepdims=True)).reshape(-1)
        sampled_tokens += sum(sum(g.sampled) for g in gens)
        batch = build_batch(prompts, gens, self.cfg.train.seq_len)
        batch["loss_mask"] = self._token_weights(batch, state["params"], ref_params, adv)
        if np.any(batch["loss_mask"]):
          state, m = self.steps.train_step(state, sharding.global_batch_from_local(batch, self.mesh))
        else:  # every group all right or all wrong: no signal, and Adam's momentum must not replay
          m = {"loss": 0.0, "tokens": 0.0}
        step += 1
        if not math.isfinite(float(m["loss"])):  # never checkpoint (or keep sampling from) a broken policy
          kept = f"the last good checkpoint is step {last_saved}" if last_saved else "no checkpoint was saved"
          raise TrainingDiverged(f"loss={float(m['loss'])} at step {step}: RL stopped; {kept}")
        record = {"reward": float(rewards.mean()), f"pass@{s.samples}": float(rewards.max(axis=1).mean()),
                  "loss": float(m["loss"]), "tokens": float(m["tokens"]),
                  "reply_tokens": float(np.mean([len(g.ids) for g in gens])), "seconds": time.perf_counter() - t0,
                  "segment": start}
        history.append((step, record["reward"], record["loss"]))
        if step % s.log_every == 0 or step == s.steps:
          writer.write(step, "rl", record)
          self.log(f"step {step:>5}/{s.steps} | reward {record['reward']:.3f} | pass@{s.samples} "
                   f"{record[f'pass@{s.samples}']:.3f} | loss {record['loss']:+.4f} | {record['tokens']:.0f} tokens")
        preemption.requested |= step == stop_after
        stop = preemption.decided(step)
        if step % s.checkpoint_every == 0 or step == s.steps or stop:
          ckpt.save(step, state)
          last_saved = step
        if s.eval_questions and ((s.eval_every and step % s.eval_every == 0) or step == s.steps):
          self.evaluate(state["params"], step, writer)
          writer.write(step, "sample", {"prompt": rows[0]["question"], "text": gens[0].text})
        if stop:
          self.log(f"stopped early (SIGTERM or stop_after): saved checkpoint at step {step}")
          break
    writer.write(step, "run", {"seconds": time.perf_counter() - t0, "segment": start, "steps": step - start,
                               "sampled_tokens": sampled_tokens, "chip": metrics_lib.chip_name(),
                               "chips": 1 if metrics_lib.chip_name() == "cpu" else jax.device_count()})
    self.state = state
    return {"step": step, "history": history, "preempted": stop, "seconds": time.perf_counter() - t0}
