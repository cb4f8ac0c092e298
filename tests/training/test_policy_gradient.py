"""RL: exact resume (same rewards and losses after a SIGTERM and restart; a corrupt checkpoint moved
aside), one run per directory, the init run's mesh (FSDP + tensor
parallel matches data parallel; overrides; fallback), the batch layout, the rl config section and bad flags."""
import dataclasses
import glob
import json
import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest

from lmtiny import rl as rl_cli
from lmtiny.errors import ConfigError
from lmtiny.runs.lock import RunLock, WorkdirBusy
from lmtiny.tasks import gsm8k
from lmtiny.tasks.gsm8k import ToolGeneration
from lmtiny.tasks.toy import toy_rows
from lmtiny.training import policy_gradient
from lmtiny.training.loop import TrainingDiverged
from lmtiny.training.policy_gradient import build_batch, Reinforce, rl_mesh, rl_settings, RLError, step_questions

SETTINGS = dict(steps=2, questions=2, samples=4, max_new_tokens=10, lr=3e-3, eval_every=0, eval_questions=0,
                checkpoint_every=10)


def _quiet(_):
  pass


def _length_reward(reply, ref):
  # A random model never writes "#### N"; a reward that depends on the reply's length makes the
  # advantages nonzero, so the updates (and so later samples) are real.
  return float(len(reply) % 3 == 0)


TRAIN, HELD_OUT = toy_rows(50, seed=1), toy_rows(4, seed=2)


@pytest.fixture(scope="module")
def data_parallel_run(chat_run, tmp_path_factory):
  """The reference RL run: 2 steps on 2 devices, 2-way data parallel (chat_run's data=-1 mesh)."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(gsm8k, "reward", _length_reward)
    rl = Reinforce(rl_settings(chat_run, **SETTINGS), str(tmp_path_factory.mktemp("rl_dp")), TRAIN, HELD_OUT,
                   log=_quiet, devices=jax.devices()[:2])
    assert dict(rl.mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1}
    summary = rl.run()
    return dict(summary, params=jax.device_get(rl.state["params"]))


def _init_run_with_mesh(chat_run, path, **mesh) -> str:
  """chat_run's checkpoint under a config.json whose mesh is `mesh` (a checkpoint restores onto any mesh)."""
  shutil.copytree(chat_run, path)
  cfg = json.loads((path / "config.json").read_text())
  cfg["mesh"] = mesh
  (path / "config.json").write_text(json.dumps(cfg))
  return str(path)


@pytest.mark.slow(seconds=14)
def test_resume_repeats_the_uninterrupted_rewards_and_losses(data_parallel_run, chat_run, tmp_path, monkeypatch):
  # A SIGTERM during step 1 saves step 1 and returns; the re-run repeats the uninterrupted step 2.
  # Then, with step 2's checkpoint corrupt, a third run moves it aside and redoes step 2 from step 1.
  monkeypatch.setattr(gsm8k, "reward", _length_reward)
  s = rl_settings(chat_run, **SETTINGS)

  def rl(log=_quiet):
    return Reinforce(s, str(tmp_path / "b"), TRAIN, HELD_OUT, log=log, devices=jax.devices()[:2])

  def sigterm_at_step_1(line):
    if line.startswith("step     1/"):
      os.kill(os.getpid(), signal.SIGTERM)

  full = data_parallel_run
  first = rl(sigterm_at_step_1).run()
  assert first["preempted"] and first["step"] == 1
  resumed = rl()
  second = resumed.run()
  assert [h[0] for h in full["history"]] == [1, 2]
  assert first["history"] + second["history"] == full["history"]  # exact on CPU
  for got, want in zip(jax.tree.leaves(jax.device_get(resumed.state["params"])), jax.tree.leaves(full["params"])):
    np.testing.assert_array_equal(got, want)  # the same state as the uninterrupted run's
  assert any(loss != 0 for _, _, loss in full["history"])
  rewards = [r for _, r, _ in full["history"]]
  assert 0 < np.mean(rewards) < 1
  records = [line for line in open(tmp_path / "b" / "metrics.jsonl") if '"rl"' in line]
  assert len(records) == 2

  for f in glob.glob(str(tmp_path / "b" / "checkpoints" / "2" / "state" / "ocdbt.process_0" / "d" / "*")):
    os.truncate(f, os.path.getsize(f) // 2)
  lines = []
  third = rl(lines.append).run()
  assert third["history"] == full["history"][1:]
  assert any(l.startswith("warning: checkpoint at step 2 is unusable") for l in lines)
  assert "resumed from checkpoint at step 1" in lines
  assert glob.glob(str(tmp_path / "b" / "checkpoints" / "corrupt-2-*"))


@pytest.mark.slow(seconds=8)
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(chat_run, tmp_path, monkeypatch):
  monkeypatch.setattr(gsm8k, "reward", _length_reward)
  rl = Reinforce(rl_settings(chat_run, **{**SETTINGS, "steps": 3, "checkpoint_every": 1}), str(tmp_path / "rl"),
                 TRAIN, HELD_OUT, log=_quiet, devices=jax.devices()[:2])
  real, calls = rl.steps.train_step, []

  def second_update_diverges(state, batch):
    calls.append(1)
    state, m = real(state, batch)
    return state, {**m, "loss": m["loss"] + (np.nan if len(calls) == 2 else 0)}
  rl.steps = dataclasses.replace(rl.steps, train_step=second_update_diverges)
  (tmp_path / "rl").mkdir()  # records of an attempt killed before its first checkpoint: dropped at the start
  (tmp_path / "rl" / "run_kind.json").write_text('{"kind": "rl"}')  # (an attempt records its kind first)
  (tmp_path / "rl" / "metrics.jsonl").write_text('{"step": 1, "split": "rl", "stale": 1}\n')
  with pytest.raises(TrainingDiverged, match=r"^loss=nan at step (\d): RL stopped; the last good checkpoint is step") as e:
    rl.run()
  diverged = int(re.search(r"at step (\d)", str(e.value)).group(1))
  saved = sorted(int(d) for d in os.listdir(tmp_path / "rl" / "checkpoints") if d.isdigit())
  assert saved == list(range(1, diverged)) and str(e.value).endswith(f"step {diverged - 1}")
  assert not any("stale" in line for line in open(tmp_path / "rl" / "metrics.jsonl"))


def test_a_second_run_in_the_same_directory_is_refused(chat_run, tmp_path):
  rl = Reinforce(rl_settings(chat_run, **SETTINGS), str(tmp_path / "rl"), TRAIN, HELD_OUT, log=_quiet,
                 devices=jax.devices()[:2])
  with RunLock(str(tmp_path / "rl")), pytest.raises(WorkdirBusy, match="another training run"):
    rl.run()
  assert not (tmp_path / "rl" / "checkpoints").exists()


@pytest.mark.slow(seconds=12)
def test_keeps_an_fsdp_and_tensor_parallel_init_mesh_and_matches_data_parallel(
    data_parallel_run, chat_run, tmp_path, monkeypatch):
  # An init run that needed FSDP / tensor parallelism is RL-trained on its own mesh: the sampler
  # (KV cache over sharded params) and the train step run there, and rewards and losses are the
  # 2-way data-parallel run's (same batch split: data x fsdp = 2).
  monkeypatch.setattr(gsm8k, "reward", _length_reward)
  init = _init_run_with_mesh(chat_run, tmp_path / "init", data=1, fsdp=2, tensor=2)
  rl = Reinforce(rl_settings(init, **SETTINGS), str(tmp_path / "rl"), TRAIN, HELD_OUT, log=_quiet,
                 devices=jax.devices()[:4])
  assert dict(rl.mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}
  got = rl.run()
  specs = {tuple(x.sharding.spec) for x in jax.tree.leaves(rl.state["params"])}
  assert any("fsdp" in spec and "tensor" in spec for spec in specs)  # really sharded both ways
  recorded = json.loads((tmp_path / "rl" / "config.json").read_text())
  assert recorded["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
  assert recorded["rl"]["init"] == init and recorded["rl"]["steps"] == 2  # the settings, as config fields
  assert json.loads((tmp_path / "rl" / "run_kind.json").read_text())["kind"] == "rl"
  want = data_parallel_run["history"]
  assert [h[:2] for h in got["history"]] == [h[:2] for h in want]  # same samples, so same rewards
  np.testing.assert_allclose([h[2] for h in got["history"]], [h[2] for h in want], rtol=1e-4, atol=1e-6)
  assert any(h[2] != 0 for h in want)


def test_mesh_overrides_and_fallback(chat_run, tmp_path):
  dp = {"data": -1, "fsdp": 1, "tensor": 1}
  assert rl_mesh(dp, {}, 8) == (dp, None)
  assert rl_mesh(dp, {"fsdp": -1}, 8) == ({"data": 1, "fsdp": -1, "tensor": 1}, None)  # fsdp takes data's -1
  assert rl_mesh(dp, {"tensor": 2}, 8) == ({"data": -1, "fsdp": 1, "tensor": 2}, None)
  # An inherited mesh fixed for more devices falls back with the same layout, and says so ...
  mesh, note = rl_mesh({"data": 1, "fsdp": 16, "tensor": 2}, {}, 4)
  assert mesh == {"data": 1, "fsdp": -1, "tensor": 2} and "does not fit" in note
  assert rl_mesh({"data": 8, "fsdp": 1, "tensor": 1}, {}, 1)[0] == dp
  # ... and overrides apply over the fallback; but a mesh the user asked for must fit.
  assert rl_mesh({"data": 8, "fsdp": 1, "tensor": 1}, {"fsdp": -1}, 2)[0] == {"data": 1, "fsdp": -1, "tensor": 1}
  with pytest.raises(ConfigError, match="product 3 != 8 devices"):
    rl_mesh(dp, {"data": 1, "fsdp": 3}, 8)
  with pytest.raises(RLError, match="at most one axis may be -1"):
    rl_mesh(dp, {"fsdp": -1, "tensor": -1}, 8)
  lines = []
  init = _init_run_with_mesh(chat_run, tmp_path / "init", data=8, fsdp=1, tensor=1)
  rl = Reinforce(rl_settings(init, **SETTINGS), str(tmp_path / "rl"), [], [], log=lines.append, devices=jax.devices()[:2])
  assert dict(rl.mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1}
  assert len(lines) == 1 and "does not fit" in lines[0]


@pytest.mark.parametrize("flag, message", [
    ("--config.mesh.fsdp=x", "error: flag --config.mesh.fsdp=x: invalid literal for int() with base 10: 'x'"),
    ("--config.mesh.fsdp=0", "error: --config.mesh.fsdp=0: must be -1 or a positive integer"),
    ("--config.mesh.fsdp=3", "error: config.mesh={'data': -1, 'fsdp': 3, 'tensor': 1}: fixed axes (3) do not divide 8"),
    ("--config.mesh.fsdp", "error: Missing value for flag --config.mesh.fsdp"),  # absl's own, one line too
])
def test_a_bad_mesh_override_is_one_line(chat_run, tmp_path, capsys, flag, message):
  from lmtiny import rl
  assert rl.main(["--init", chat_run, "--workdir", str(tmp_path / "rl"), "--config.rl.data=toy", flag]) == 2
  err = capsys.readouterr().err
  assert err.startswith(message) and err.count("\n") == 1
  assert not (tmp_path / "rl").exists()


@pytest.mark.slow(seconds=8)
def test_starts_from_a_lora_run_with_its_adapters_merged(lora_run, tmp_path):
  from lmtiny.runs.directory import load_weights
  lora_dir, merged_dir = lora_run
  s = rl_settings(lora_dir, **{**SETTINGS, "steps": 1})
  rl = Reinforce(s, str(tmp_path / "rl"), toy_rows(8, seed=1), [], log=_quiet, devices=jax.devices()[:2])
  with jax.set_mesh(rl.mesh):
    params = rl.fresh_state()["params"]
  _, merged = load_weights(merged_dir)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(merged)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  assert rl.run()["step"] == 1
  run, _ = load_weights(str(tmp_path / "rl"))  # the RL run is a full run (all weights), not a LoRA run
  assert run.step == 1 and run.cfg.lora.rank == 0


def test_batch_weights_only_sampled_reply_tokens():
  prompts = [[1, 5, 6], [1, 7]]
  gens = [ToolGeneration([10, 11, 12, 13], [True, False, False, True], ""), ToolGeneration([20], [True], "")]
  b = build_batch(prompts, gens, seq_len=6)
  assert b["inputs"][0].tolist() == [1, 5, 6, 10, 11, 12] and b["targets"][0].tolist() == [5, 6, 10, 11, 12, 13]
  assert b["loss_mask"][0].tolist() == [0, 0, 1, 0, 0, 1]  # forced tool output is not trained on
  assert b["targets"][1].tolist()[:2] == [7, 20] and b["loss_mask"][1].tolist() == [0, 1, 0, 0, 0, 0]
  assert b["segment_ids"][1].tolist() == [1, 1, 0, 0, 0, 0]


def test_questions_cover_each_epoch_once():
  picks = [q for step in range(5) for q in step_questions(10, step, 4, seed=3)]
  assert sorted(picks[:10]) == list(range(10)) and sorted(picks[10:20]) == list(range(10))
  assert picks == [q for step in range(5) for q in step_questions(10, step, 4, seed=3)]


def test_rows_must_divide_over_devices(chat_run, tmp_path):
  with pytest.raises(RLError, match=r"^config.rl.questions=3 x config.rl.samples=3 = 9 rows per step do not divide"):
    Reinforce(rl_settings(chat_run, **{**SETTINGS, "questions": 3, "samples": 3}), str(tmp_path / "rl"), [], [],
              devices=jax.devices()[:2])


def test_init_without_a_checkpoint_names_the_flag(tmp_path, capsys):
  from lmtiny import rl
  assert rl.main(["--init", str(tmp_path), "--workdir", str(tmp_path / "rl"), "--config.rl.data=toy"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: --init={tmp_path}: not a run directory") and err.count("\n") == 1


@pytest.mark.slow(seconds=4)
def test_train_step_weights_exactly_the_tokens_the_sampler_drew(chat_run, tmp_path):
  # REINFORCE is only unbiased if the rows the train step differentiates are the sampled rows:
  # at temperature 1 without top-k, each weighted target must be the draw the sampler's key
  # (fold_in(fold_in(key(seed), row), position)) makes from the train-step logits at the position
  # before it, and its weight's log-prob must be that logit's log-softmax (no off-by-one).
  from flax import nnx
  from lmtiny.parallel import sharding
  s = rl_settings(chat_run, **{**SETTINGS, "temperature": 1.0, "top_k": 0, "max_new_tokens": 12})
  rl = Reinforce(s, str(tmp_path / "rl"), toy_rows(8, seed=1), [], log=_quiet, devices=jax.devices()[:2])
  with jax.set_mesh(rl.mesh):
    params = rl.fresh_state()["params"]
    _, prompts, gens, _ = rl.rollout(params, step=0)
    batch = build_batch(prompts, gens, rl.cfg.train.seq_len)
    device_batch = sharding.global_batch_from_local(batch, rl.mesh)
    ce = np.asarray(rl._losses(rl.steps.graphdef, params, device_batch))
    forward = jax.jit(lambda p: nnx.merge(rl.steps.graphdef, p)(
        device_batch["inputs"], device_batch["positions"], device_batch["segment_ids"]))
    logits = np.asarray(forward(params), np.float64)
  seed = s.seed * 1_000_003 + 0
  rows, cols = np.nonzero(batch["loss_mask"])
  assert len(rows) == sum(sum(g.sampled) for g in gens) > 20
  keys = jax.vmap(lambda r, p: jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), r), p))(
      rows.astype(np.int32), (cols + 1).astype(np.int32))  # target at t sits at position t + 1
  draws = np.asarray(jax.vmap(jax.random.categorical)(keys, logits[rows, cols].astype(np.float32)))
  np.testing.assert_array_equal(draws, batch["targets"][rows, cols])
  log_softmax = logits[rows, cols] - np.log(np.exp(logits[rows, cols]).sum(-1, keepdims=True))
  np.testing.assert_allclose(-ce[rows, cols], log_softmax[np.arange(len(rows)), batch["targets"][rows, cols]],
                             rtol=1e-4, atol=1e-4)
  # rl.kl: each sampled token's weight drops by kl * (log pi - log pi_ref), computed here from the
  # log-softmax of two models' logits (pi: these params scaled, pi_ref: the init run's).
  rl.s.kl = 0.5
  with jax.set_mesh(rl.mesh):
    ref = rl._init_params()  # the KL reference: the init run's weights alone
    moved = jax.tree.map(lambda x: x * 1.1, params)
    adv = np.linspace(-1, 1, len(batch["inputs"])).astype(np.float32)
    weights = rl._token_weights(batch, moved, ref, adv)
    logits_moved = np.asarray(forward(moved), np.float64)
  logp = lambda lg: (lg[rows, cols] - np.log(np.exp(lg[rows, cols]).sum(-1, keepdims=True)))[
      np.arange(len(rows)), batch["targets"][rows, cols]]
  want = adv[rows] - 0.5 * (logp(logits_moved) - logp(logits))
  np.testing.assert_allclose(weights[rows, cols], want, rtol=1e-3, atol=1e-3)
  assert not np.any(weights[batch["loss_mask"] == 0])


def test_warmup_steps_ramp_the_rl_learning_rate_from_zero():
  # From a fresh Adam state every early update is about sign(g) * lr on every weight: with a noisy
  # policy gradient a full-LR first step hurt the toy model (reward 0.50 -> 0.28 at lr 1e-3).
  from eval_fixtures import run_config
  from lmtiny.training.optim import lr_schedule
  from lmtiny.config import validate_rl
  from lmtiny.training.policy_gradient import rl_config
  cfg = rl_config(run_config(), rl_settings("", steps=40, lr=5e-4, warmup_steps=10))
  schedule = lr_schedule(cfg.optim, 40)
  assert cfg.optim.warmup_steps == 10 and cfg.optim.weight_decay == 0.0
  assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(2.5e-4) and float(schedule(10)) == pytest.approx(5e-4)
  with pytest.raises(ConfigError, match=r"^config.rl.warmup_steps=-1: must be an integer >= 0$"):
    validate_rl(rl_settings("", warmup_steps=-1))


@pytest.mark.parametrize("field", ["eval_every", "eval_questions", "top_k"])
def test_a_negative_count_is_refused(field):
  # Before: --eval-every -1 evaluated every step and --eval-questions -1 all but one problem.
  from lmtiny.config import validate_rl
  with pytest.raises(ConfigError, match=f"^config.rl.{field}=-1: must be an integer >= 0$"):
    validate_rl(rl_settings("", **{field: -1}))


def test_the_toy_sets_held_out_problems_share_no_operands_with_training():
  # 56% of the old eval rows were training questions verbatim; now no operand pair is shared.
  from lmtiny.tasks.toy import is_held_out_problem
  from lmtiny.chat.conversations import iter_conversations
  operands = lambda rows: {tuple(map(int, re.findall(r"\d+", r["question"])[:2])) for r in rows}
  train, held = operands(toy_rows(3000, seed=1)), operands(toy_rows(500, seed=2, held_out=True))
  assert held and not train & held and all(is_held_out_problem(*p) for p in held)
  assert len(held) == 10 and len(train) == 71  # every pair of 1..9 on exactly one side
  sft = [c[0]["content"] for c in iter_conversations("toy_arithmetic?n=500&seed=0")]  # SFT's toy source
  assert not operands({"question": q} for q in sft) & held


def _files(directory) -> dict:
  """{relative path: bytes} of every file under `directory` (the run lock's file aside)."""
  return {os.path.relpath(os.path.join(d, n), directory): open(os.path.join(d, n), "rb").read()
          for d, _, names in os.walk(directory) for n in names if n != ".lock"}


def test_the_init_run_and_runs_of_other_kinds_are_refused_untouched(chat_run, tmp_path, capsys):
  # Before: --workdir == --init (or another finished run) took that run's checkpoint as the RL state,
  # rewrote its config.json and, keeping 2, deleted its checkpoints; with --steps 1 it exited 0.
  from lmtiny import rl
  run = tmp_path / "run"
  shutil.copytree(chat_run, run)
  (run / "run_kind.json").unlink(missing_ok=True)  # a run made before the kind was recorded: inferred from config.json
  before = _files(run)
  small = ["--config.rl.data=toy", "--config.rl.steps=1", "--config.rl.questions=2", "--config.rl.samples=4",
           "--config.rl.max_new_tokens=4", "--config.rl.eval_questions=0"]
  for init, message in ((run, f"--workdir={run}: is the init run (--init)"),
                        (chat_run, f"--workdir={run}: holds a train run (lmtiny.train) (inferred from "
                                   f"{run / 'config.json'}), not an rl run (lmtiny.rl); choose another --workdir")):
    assert rl.main(["--init", str(init), "--workdir", str(run), *small]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert _files(run) == before


def test_a_run_of_other_shapes_is_refused_before_and_under_the_lock(chat_run, tmp_path):
  # Before: rl never compared its config with the run directory's, so another model's RL run there
  # was "resumed" (its checkpoints failed to restore and were moved aside as corrupt).
  from lmtiny.runs.directory import load_run
  from lmtiny.training.policy_gradient import rl_config
  s = rl_settings(chat_run, **SETTINGS)
  other = rl_config(load_run(chat_run).cfg, s)
  other.model.num_layers += 1
  workdir = tmp_path / "rl"
  rl = Reinforce(s, str(workdir), TRAIN, HELD_OUT, log=_quiet, devices=jax.devices()[:2])
  workdir.mkdir()  # another RL run appears after the checks at start-up: the run's own check refuses it
  (workdir / "config.json").write_text(other.to_json_best_effort())
  (workdir / "run_kind.json").write_text('{"kind": "rl"}')
  before = _files(workdir)
  message = rf"^{workdir} holds a run whose model or optimizer state has other shapes \(model.num_layers 3 -> 2"
  with pytest.raises(ConfigError, match=message):
    rl.run()
  with pytest.raises(ConfigError, match=message):
    Reinforce(s, str(workdir), TRAIN, HELD_OUT, log=_quiet, devices=jax.devices()[:2])
  assert _files(workdir) == before


@pytest.mark.parametrize("flag, value, message", [
    ("lr", "nan", "config.rl.lr=nan: must be a finite number > 0"),
    ("lr", "inf", "config.rl.lr=inf: must be a finite number > 0"),
    ("lr", "0", "config.rl.lr=0.0: must be a finite number > 0"),
    ("temperature", "nan", "config.rl.temperature=nan: must be a finite number > 0"),
    ("temperature", "-1", "config.rl.temperature=-1.0: must be a finite number > 0"),
    ("kl", "nan", "config.rl.kl=nan: must be a finite number >= 0"),
    ("kl", "-inf", "config.rl.kl=-inf: must be a finite number >= 0"),
    ("warmup_steps", "-1", "config.rl.warmup_steps=-1: must be an integer >= 0"),
    ("steps", "0", "config.rl.steps=0: must be an integer >= 1"),
    ("data", "squad", "config.rl.data='squad': must be one of gsm8k, toy"),
    ("steps", "1.5", "flag --config.rl.steps=1.5: invalid literal for int() with base 10: '1.5'"),
    ("stepz", "1", "--config override: 'stepz' Did you mean \"steps\" instead of \"stepz\"?"),
])
def test_every_rl_field_is_checked_as_the_flags_are_parsed(chat_run, tmp_path, capsys, flag, value, message):
  # Before: --lr nan passed (`lr <= 0` is false for NaN) and --temperature nan failed only after the
  # workdir was written. Now each is one line naming the config field, before the init run's
  # weights are read or anything is written.
  from lmtiny import rl
  argv = ["--init", chat_run, "--workdir", str(tmp_path / "rl"), "--config.rl.data=toy", f"--config.rl.{flag}={value}"]
  assert rl.main(argv) == 2
  assert capsys.readouterr().err == f"error: {message}\n"
  assert os.listdir(tmp_path) == []


GOOD_ROW = {"question": "Ann has 2 pens and gets 3 more. How many pens?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}


@pytest.mark.parametrize("bad_row, message", [
    ({"answer": "#### 5"}, "row 1 has no text field question"),
    ({"question": "q", "answer": 5}, "row 1 has no text field answer"),
    ({"question": "q", "answer": "five"}, "row 1: the answer has no '#### <number>' line, so no reply could score "
     "(1 of 3 rows lack one)"),
])
def test_problems_without_a_question_or_a_numbered_answer_are_refused_before_the_run(
    chat_run, tmp_path, capsys, monkeypatch, bad_row, message):
  # Before: a KeyError / TypeError mid-run, or (no ####) training at reward 0 throughout, silently.
  monkeypatch.setattr(policy_gradient, "load_weights", lambda *a, **k: pytest.fail("read the init run's weights"))
  data = tmp_path / "data"
  data.mkdir()
  (data / "gsm8k_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (GOOD_ROW, bad_row, GOOD_ROW)))
  (data / "gsm8k.jsonl").write_text(json.dumps(GOOD_ROW) + "\n")
  argv = ["--init", chat_run, "--workdir", str(tmp_path / "rl"), f"--config.rl.data_dir={data}"]
  assert rl_cli.main(argv) == 2
  assert capsys.readouterr().err == f"error: {data / 'gsm8k_train.jsonl'}: {message}\n"
  assert sorted(os.listdir(tmp_path)) == ["data"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "2"], "--steps: RL's settings are config fields: --config.rl.steps=VALUE"),
    (["--data-dir=x"], "--data-dir: RL's settings are config fields: --config.rl.data_dir=VALUE"),
    (["--config.model.num_layers=8"],
     "--config.model.num_layers: lmtiny.rl sets only --config.rl.*, --config.mesh.* and --config.train.trackers"),
    (["--config.train.steps=8"], "--config.train.steps: lmtiny.rl sets only"),
    (["--config.rl.init=x"], "--config.rl.init: lmtiny.rl sets only"),
    (["--config", "configs/tiny.py"], "--config: RL's config is the init run's (--init)"),
    ([], "--workdir is required"),
])
def test_what_rl_does_not_take_is_one_line(chat_run, tmp_path, capsys, argv, message):
  from lmtiny import rl
  workdir = [] if not argv else ["--workdir", str(tmp_path / "rl")]
  assert rl.main(["--init", chat_run, *workdir, *argv]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
  assert os.listdir(tmp_path) == []


def test_the_command_line_sets_the_rl_section_and_only_the_mesh_axes_it_names(chat_run, tmp_path):
  # The settings start from the init run's config (an RL run's own rl section, when RL continues
  # one); --config.mesh.* names the axes laid over the init run's mesh (rl_mesh), no others.
  from lmtiny import rl
  workdir, settings, mesh, train = rl.parse(["lmtiny.rl", "--init", chat_run, "--workdir", str(tmp_path / "rl"),
                                             "--config.rl.data=toy", "--config.rl.steps", "3", "--config.mesh.fsdp=-1",
                                             "--config.train.tracker_group=rl-sweep", "--config.train.profile_steps=2"])
  assert workdir == str(tmp_path / "rl") and mesh == {"fsdp": -1}
  assert train == {"tracker_group": "rl-sweep", "profile_steps": 2}  # trackers and profile: the RL run's own
  assert (settings.init, settings.data, settings.steps, settings.samples) == (chat_run, "toy", 3, 8)
  from lmtiny.training.policy_gradient import rl_config
  from lmtiny.runs.directory import load_run
  cfg = rl_config(load_run(chat_run).cfg, settings, train=train)
  assert cfg.rl.init == os.path.abspath(chat_run) and cfg.train.steps == 3 and cfg.train.keep_checkpoints == 2
  assert (cfg.train.tracker_group, cfg.train.profile_steps, cfg.train.trackers) == ("rl-sweep", 2, "tensorboard")
