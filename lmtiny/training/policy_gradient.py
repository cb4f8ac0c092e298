"""On-policy RL on GSM8K-shaped problems, as nanochat's chat_rl: REINFORCE with a group baseline.

Settings: the config's rl section (lmtiny.config; `--config.rl.<field>=...` on lmtiny.rl), which
names the init run in rl.init. Each step takes `questions` problems (a fixed, seeded order over
the training rows, epoch by epoch) and samples `samples` replies to each with the KV-cache sampler
and the calculator tool (`lmtiny.tasks.gsm8k.generate_with_tools`). Reward: 1 if the reply's `####`
answer is right. Advantage: reward minus the mean reward of the question's group. The update is
the sharded train step with the policy-gradient objective (lmtiny.training.objectives) on rows
[prompt + reply] whose `advantages` hold each sampled token's advantage (0 on the prompt, on forced
tool output and on padding), so the loss is
    sum_t adv_t * CE_t / #(adv_t != 0)
and its gradient is token-level REINFORCE. A step where every group's rewards are equal carries no
signal and makes no update (Adam's momentum would otherwise repeat the last one). Optional KL to
the initial model (`kl`), folded into the per-token weight as a reward penalty:
adv_t - kl * (log pi(a_t) - log pi_init(a_t)).

`Reinforce` is a stage of the one run loop (lmtiny.training.loop: lock, run files, restore,
metrics, preemption, checkpoint cadence, closing).

Mesh: the init run's (data / fsdp / tensor, as lmtiny.sft inherits its base run's), so a model
that needed FSDP or tensor parallelism to fit is RL-trained sharded the same way; the sampler and
the train step both run on it. `mesh=` overrides axes (the CLI's `--config.mesh.<axis>=N`), and
an inherited mesh that does not fit this machine's devices falls back (`rl_mesh`).

Exact resume: the checkpoint holds params, optimizer state and step; the questions and the
sampling seed of step s are functions of (seed, s), so a resumed run repeats the same rewards
and losses as an uninterrupted one.
"""
from __future__ import annotations

import math
import os
import random
from typing import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from lmtiny import config as config_lib
from lmtiny.config import MESH_AXES
from lmtiny.errors import ConfigError
from lmtiny.model.sampling import Sampler, SamplingParams
from lmtiny.parallel import sharding, xla_options
from lmtiny.runs import kind as runkind
from lmtiny.runs.directory import load_run, load_weights
from lmtiny.tasks import gsm8k
from lmtiny.tasks.rows import local_file
from lmtiny.tokenizer import render_for_completion
from lmtiny.training import loop, resume
from lmtiny.training.objectives import POLICY_GRADIENT
from lmtiny.training.resolved import resolve_run
from lmtiny.training.steps import build_steps, device_batch, token_losses

INIT_FLAGS = ("--init", "--init-step")  # how messages about the init run name it
# The train fields an RL run may set apart from its init run's (`--config.train.<field>=` on lmtiny.rl)
TRAIN_FIELDS = ("trackers", "tracker_group", "wandb_project", "wandb_mode", "profile_steps", "profile_skip")


class RLError(ConfigError):
  """A bad RL setting or init run."""


def rl_settings(init: str, **fields) -> ml_collections.ConfigDict:
  """The base config's rl section with `fields` set, starting from the run in `init` (scripts,
  notebooks and tests; lmtiny.rl parses it from `--config.rl.*`)."""
  rl = config_lib.base_config().rl
  rl.update(init=init, **fields)
  return rl


def check_rows(cfg, mesh) -> None:
  """A step's rows (questions x samples) split evenly over the data-parallel devices (a check
  `resolve_run` runs once the config's own have passed)."""
  rl, dp = cfg.rl, sharding.data_parallel_size(mesh)
  if (rl.questions * rl.samples) % dp:
    raise RLError(f"config.rl.questions={rl.questions} x config.rl.samples={rl.samples} = "
                  f"{rl.questions * rl.samples} rows per step do not divide over the data-parallel size {dp}")


def check_not_the_init_run(workdir: str, init_dir: str) -> None:
  """RL in its init run's directory would take its checkpoints for its own state, rewrite its
  config and prune its checkpoints."""
  same = (workdir.rstrip("/") == init_dir.rstrip("/") if "://" in workdir + init_dir
          else os.path.realpath(workdir) == os.path.realpath(init_dir))
  if same:
    raise RLError(f"--workdir={workdir}: is the init run (--init); the RL run needs a directory of its own "
                  "(e.g. RUN/rl next to RUN/sft)")


def check_rl_workdir(workdir: str, init_dir: str) -> None:
  """The RL run directory is not the init run, and holds no run of another kind (lmtiny.runs.kind)."""
  check_not_the_init_run(workdir, init_dir)
  runkind.check_kind(workdir, "rl")


def problems_source(rl, split: str) -> str:
  """What an error about RL's `split` problems ("gsm8k_train" or "gsm8k", held out) names: the file
  in rl.data_dir, else the public source (lmtiny.rl reads them from there), or the toy set."""
  if rl.data == "toy":
    return f"the toy problems ({split})"
  if rl.data_dir:
    return local_file(rl.data_dir, split) or os.path.join(rl.data_dir, split)
  return gsm8k.TRAIN_SOURCE if split == "gsm8k_train" else gsm8k.SOURCE


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


def rl_config(init_cfg, rl, mesh: dict[str, int] | None = None, train: dict | None = None):
  """The init run's config with the rl section `rl` and the train / optim settings it gives: the
  RL batch (one row per sample, the model's context long), LR, cadences; on `mesh` (rl_mesh;
  default: the init run's mesh); not a LoRA run even when the init run is one. `train`: fields of
  TRAIN_FIELDS set for this run (its trackers and profile; the rest are the init run's)."""
  cfg = init_cfg.copy_and_resolve_references()
  rl = ml_collections.ConfigDict(dict(rl))
  if rl.init and "://" not in rl.init:
    rl.init = os.path.abspath(rl.init)  # the init run, as sft.init records its base
  seq_len = cfg.model.max_seq_len
  cfg.train.update(seq_len=seq_len, batch_tokens=seq_len * rl.questions * rl.samples, micro_batch_size=0,
                   steps=rl.steps, tokens_per_param=0.0, seed=rl.seed, checkpoint_every=rl.checkpoint_every,
                   keep_checkpoints=2, async_checkpointing=False)
  cfg.train.update(**(train or {}))
  cfg.optim.update(lr=rl.lr, embed_lr=0.0, unembed_lr=0.0, warmup_steps=rl.warmup_steps, min_lr_ratio=0.0, weight_decay=0.0)
  if mesh is not None or "mesh" not in cfg:
    cfg.mesh = ml_collections.ConfigDict(mesh or dict(data=-1, fsdp=1, tensor=1))
  if "lora" in cfg:
    cfg.lora.rank = 0  # RL trains every weight of the (merged) init model: its checkpoints are full runs'
  cfg.rl = rl
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
  caller weights them with their advantages), 0 on prompts, forced tool output and padding."""
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
  """An RL run in `workdir` with the settings `rl` (the config's rl section: rl_settings, or what
  lmtiny.rl parses), starting from the run in rl.init (its newest checkpoint), on the init run's
  mesh over `devices` (default: all), with `mesh` ({axis: size}) overriding axes and `train`
  ({field of TRAIN_FIELDS: value}) setting trackers and profiles: a stage of the run loop
  (lmtiny.training.loop), which `run` drives."""

  kind = "rl"
  name = "RL"

  def __init__(self, rl, workdir: str, train_rows, eval_rows, *,
               log: Callable[[str], None] = print, devices=None, mesh: dict | None = None, train: dict | None = None):
    check_rl_workdir(workdir, rl.init)
    self.init = load_run(rl.init, flags=INIT_FLAGS)
    self.workdir, self.log = workdir, log
    self.train_rows, self.eval_rows = train_rows, eval_rows
    devices = jax.devices() if devices is None else devices
    mesh_cfg, note = rl_mesh(self.init.cfg.mesh, mesh_overrides(mesh or {}), len(devices))
    if note:
      log(note)
    run = resolve_run(rl_config(self.init.cfg, rl, mesh_cfg, train), devices=devices, checks=(check_rows,))
    self.cfg, self.mesh, self.total_steps = run.cfg, run.mesh, run.total_steps
    self.s, self.tokenizer = self.cfg.rl, self.init.tokenizer
    self.main = jax.process_index() == 0
    resume.config_changes(workdir, self.cfg)  # a change of shapes: one line now (again under the lock)
    self.steps = build_steps(self.cfg, self.mesh, self.total_steps, objective=POLICY_GRADIENT)
    self._losses = xla_options.jit(token_losses, static_argnums=0)
    self._prompt = lambda row: render_for_completion(self.tokenizer, [{"role": "user", "content": row["question"]}])

  def run(self, stop_after: int | None = None) -> dict:
    """The run loop's run, once every problem has a question and a `####` answer: a bad row is one
    line naming its file, before the run directory is written or the init run's weights are read."""
    for split, rows in (("gsm8k_train", self.train_rows), ("gsm8k", self.eval_rows)):
      gsm8k.check_problems(rows, problems_source(self.s, split))
    self.state, summary = loop.run(self, stop_after)
    return summary

  def _init_params(self):
    """The init run's parameters on this mesh (a LoRA run's merged; its newest usable checkpoint)."""
    self.init, params = load_weights(self.init, mesh=self.mesh, log=self.log, flags=INIT_FLAGS)
    return params

  def _sampler(self, params):
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
    """Each sampled token's advantage: its reply's, minus the KL penalty when kl > 0."""
    sampled = batch["loss_mask"]
    weights = sampled * adv_B[:, None]
    if self.s.kl:
      device = sharding.global_batch_from_local(batch, self.mesh)
      ce = np.asarray(jax.device_get(self._losses(self.steps.graphdef, params, device)))
      ce_ref = np.asarray(jax.device_get(self._losses(self.steps.graphdef, ref_params, device)))
      weights = weights - sampled * self.s.kl * (ce_ref - ce)  # log pi - log pi_init = ce_ref - ce
    return weights.astype(np.float32)

  def evaluate_held_out(self, params, step: int, writer) -> dict:
    """Greedy accuracy on the first eval_questions held-out problems (split "rl_eval")."""
    result = gsm8k.evaluate(self._sampler(params), self.tokenizer, self.eval_rows[:self.s.eval_questions],
                            max_new_tokens=self.s.max_new_tokens, sampling=SamplingParams(0.0, 0, 1.0))
    writer.write(step, "rl_eval", {"accuracy": result["accuracy"], "items": result["items"]})
    self.log(f"step {step:>5}/{self.s.steps} | eval accuracy {result['accuracy']:.3f} on {result['items']} problems")
    return result

  # -- the stage (lmtiny.training.loop.Stage) -------------------------------------------------

  def prepare(self) -> dict:
    check_rl_workdir(self.workdir, self.init.workdir)  # again, under the lock
    return resume.config_changes(self.workdir, self.cfg)

  def data_iterator(self):
    return None  # no data position: a step's problems are a function of (seed, step)

  def fresh_state(self):
    """A fresh state (Adam's zeros, step 0) over the init run's parameters, which it takes over."""
    return self.steps.init(self._init_params())

  def begin(self, state, progress: loop.Progress) -> None:
    self.log(f"rl from {self.init.workdir} step {self.init.step} | mesh {dict(self.mesh.shape)} | "
             f"{self.mesh.size} devices")
    self._ref_params = self._init_params() if self.s.kl else None  # the KL reference: weights only
    self.history, self._sampled_tokens, self._rollout = [], 0, None

  def update(self, state, step: int, data):
    """Samples the step's replies, weights their tokens and trains on them (no update without signal)."""
    rows, prompts, gens, rewards = self.rollout(state["params"], step)
    adv = (rewards - rewards.mean(axis=1, keepdims=True)).reshape(-1)
    self._sampled_tokens += sum(sum(g.sampled) for g in gens)
    self._rollout = rows, gens, rewards
    batch = build_batch(prompts, gens, self.cfg.train.seq_len)
    batch["advantages"] = self._token_weights(batch, state["params"], self._ref_params, adv)
    if np.any(batch["advantages"]):
      return self.steps.train_step(state, device_batch(batch, self.mesh, POLICY_GRADIENT.batch_keys))
    return state, {"loss": 0.0, "tokens": 0.0}  # every group all right or all wrong: Adam's momentum must not replay

  def after_step(self, step: int, step_metrics, progress: loop.Progress) -> None:
    """Read at once (the next rollout waits on the parameters anyway): never checkpoint (or keep
    sampling from) a broken policy."""
    s, (_, gens, rewards) = self.s, self._rollout
    loss = float(step_metrics["loss"])
    if not math.isfinite(loss):
      raise progress.diverged(f"loss={loss}", step)
    record = {"reward": float(rewards.mean()), f"pass@{s.samples}": float(rewards.max(axis=1).mean()),
              "loss": loss, "tokens": float(step_metrics["tokens"]),
              "reply_tokens": float(np.mean([len(g.ids) for g in gens])), "seconds": progress.seconds(),
              "segment": progress.start}
    self.history.append((step, record["reward"], record["loss"]))
    if step % s.log_every == 0 or step == s.steps:
      progress.writer.write(step, "rl", record)
      self.log(f"step {step:>5}/{s.steps} | reward {record['reward']:.3f} | pass@{s.samples} "
               f"{record[f'pass@{s.samples}']:.3f} | loss {record['loss']:+.4f} | {record['tokens']:.0f} tokens")

  def settle(self, progress: loop.Progress) -> None:
    pass  # every step's metrics are read in after_step

  def periodic(self, state, step: int, progress: loop.Progress) -> None:
    s = self.s
    if s.eval_questions and ((s.eval_every and step % s.eval_every == 0) or step == s.steps):
      self.evaluate_held_out(state["params"], step, progress.writer)
      rows, gens, _ = self._rollout
      progress.writer.write(step, "sample", {"prompt": rows[0]["question"], "text": gens[0].text})

  def run_record(self, step: int, progress: loop.Progress) -> dict:
    return {"sampled_tokens": self._sampled_tokens}

  def summary(self, step: int, progress: loop.Progress) -> dict:
    return {"history": self.history}
