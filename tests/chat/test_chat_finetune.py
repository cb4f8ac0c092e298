"""SFT on the one trainer: starts from the base run's weights, learns the conversations, resumes
exactly; the sft / lora CLIs: full and LoRA runs, merge, generate on the results, bad input."""
import json
import os
import re

import jax
import numpy as np
import pytest

from chat_fixtures import conversations, make_base_run, make_tokenizer, write_jsonl
from lmtiny import lora as lora_cli, sft as sft_cli
from lmtiny.chat import finetune as ft
from lmtiny.errors import ConfigError
from lmtiny.parallel import sharding
from lmtiny.runs.config_file import read_run_config
from lmtiny.runs.directory import load_run, load_weights
from readonly import ReadOnly

STEPS = 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  root = tmp_path_factory.mktemp("chat")
  tok = make_tokenizer()
  path = make_base_run(str(root), tok)
  convs = write_jsonl(str(root / "c.jsonl"), conversations(200))
  return root, path, convs


def _cfg(path, convs, **sft):
  cfg = read_run_config(path)
  cfg.sft.update(sources=convs, steps=STEPS, warmup_steps=1, lr=3e-3, **sft)
  cfg.train.update(eval_every=STEPS, checkpoint_every=2, eval_batches=2)
  return ft.sft_config(cfg, path, None)


def _quiet(_):
  pass


@pytest.mark.slow(seconds=14)
def test_starts_from_the_base_and_resumes_exactly(base):
  root, path, convs = base
  cfg = _cfg(path, convs)
  assert cfg.sft.init == os.path.abspath(path) and cfg.sft.init_step == 2
  trainer, full = ft.finetune(cfg, str(root / "full"), log=_quiet)
  # Step 0 evaluates the base run's own weights on the held-out conversations.
  with jax.set_mesh(trainer.mesh):
    base_val = trainer.evaluate(ft.restore_base_params(cfg, trainer.mesh))["loss"]
  assert full["val"][0][1] == pytest.approx(base_val, rel=1e-6)
  assert full["val"][-1][1] < full["val"][0][1] - 0.3
  _, first = ft.finetune(cfg, str(root / "split"), log=_quiet, stop_after=2)
  _, second = ft.finetune(cfg, str(root / "split"), log=_quiet)
  losses = lambda s: [loss for _, loss in s["train_loss"]]
  assert losses(first) + losses(second) == losses(full)
  saved = json.load(open(root / "full" / "config.json"))
  assert saved["sft"]["init"] == os.path.abspath(path) and saved["lora"]["rank"] == 0
  run = load_run(str(root / "full"))  # a normal run directory
  assert run.step == STEPS and run.tokenizer.vocab_size == 512


@pytest.mark.slow(seconds=10)
def test_cli_lora_then_merge_gives_the_adapter_models_logits(base, capsys):
  root, path, convs = base
  work, merged = str(root / "lora"), str(root / "merged")
  argv = ["sft", f"--init={path}", f"--workdir={work}", f"--config.sft.sources={convs}",
          f"--config.sft.steps={STEPS}", "--config.lora.rank=4", "--config.sft.lr=1e-2",
          "--config.train.eval_every=4", "--config.train.eval_batches=1"]
  assert sft_cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "LoRA rank 4" in out and f"done: {STEPS} steps" in out
  sample = next(l for l in out.splitlines() if "| sample: " in l)  # a reply to a held-out question
  from lmtiny.chat.turn_ending import held_out_questions
  assert sample.split("| sample: ")[1].startswith(repr(held_out_questions()[0] + "\n")[:-1])
  trainable = int(out.split("trainable ")[1].split(" of")[0].replace(",", ""))
  total = int(out.split(" of ")[1].split(" params")[0].replace(",", ""))
  assert trainable < total / 5
  assert lora_cli.main(["merge", f"--workdir={work}", f"--out={merged}"]) == 0
  assert lora_cli.main(["merge", f"--workdir={work}", f"--out={merged}"]) == 2  # never overwrites
  assert "already holds a run" in capsys.readouterr().err
  tokens = np.arange(1, 17, dtype=np.int32)[None]

  def logits(workdir):
    run, params = load_weights(workdir)
    return jax.jit(lambda p: run.model(p)(tokens))(params)
  merged_logits = logits(merged)
  np.testing.assert_allclose(merged_logits, logits(work), rtol=1e-5, atol=1e-5)
  assert not np.allclose(merged_logits, logits(path), atol=1e-3)  # the adapters did something
  # Fine-tuning on from the LoRA run (sft --init RUN/lora) starts from its merged weights.
  cfg = ft.sft_config(read_run_config(work), work, None)
  with jax.set_mesh(mesh := sharding.make_mesh(cfg.mesh)):
    start = ft.restore_base_params(cfg, mesh)
  for got, want in zip(jax.tree.leaves(start), jax.tree.leaves(load_weights(merged)[1])):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  # Only the adapters are in the LoRA run's checkpoint.
  state = os.listdir(os.path.join(work, "checkpoints", str(STEPS), "state"))
  assert state and json.load(open(os.path.join(work, "config.json")))["lora"]["rank"] == 4


@pytest.mark.parametrize("extra, message", [
    (["--init=/nonexistent/run"], "--init=/nonexistent/run: no such directory"),
    (["--config.sft.sources=missing.jsonl"], "missing.jsonl: no files match"),
    (["--config.sft.sources=embedded_chat:0"], "config.sft.sources="),
    (["--init-step=7"], "--init-step=7: no such checkpoint"),
    (["--config=configs/tiny.py"], "config.model.vocab_size=4096: the base run"),
    (["--config.lora.rank=2", "--config.lora.targets=q,x"], "config.lora.targets='q,x'"),
    (["--config.sft.steps=-1"], "config.sft.steps=-1: must be an integer >= 0"),  # not train.steps
    (["--config.sft.steps=0"], "config.sft.steps=0: one epoch is counted on the nanochat source"),
    (["--config.sft.lr=-1"], "config.sft.lr=-1.0: must be > 0"),
])
def test_cli_bad_input_exits_2_with_one_line(base, capsys, extra, message):
  root, path, _ = base
  argv = ["sft", f"--workdir={root / 'bad'}"] + (extra if extra[0].startswith("--init=") else [f"--init={path}"] + extra)
  assert sft_cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_merge_of_a_full_run_exits_2(base, capsys):
  root, path, _ = base
  assert lora_cli.main(["merge", f"--workdir={path}", f"--out={root / 'm2'}"]) == 2
  assert "not a LoRA run" in capsys.readouterr().err


def test_the_workdir_must_be_this_bases_fine_tuning_run(base, capsys):
  # Before: sft --workdir RUN "resumed" the base run itself (nothing trained, its config rewritten).
  root, path, _ = base
  other = root / "other_sft"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"sft": {"init": "/another/base"}}))
  for workdir, message in ((path, "is the base run (--init)"),
                           (other, "holds a fine-tuning run of /another/base, not of --init=")):
    before = open(os.path.join(path, "config.json")).read()
    assert sft_cli.main(["sft", f"--init={path}", f"--workdir={workdir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --workdir={workdir}: ") and message in err and err.count("\n") == 1
    assert open(os.path.join(path, "config.json")).read() == before


def test_an_rl_run_of_this_base_is_refused_untouched(base, capsys):
  # Before: an RL run's config.json names the base in sft.init too, so sft --workdir RUN/rl passed the
  # base check and took the RL run's checkpoints for its own (moved aside: no data-iterator state).
  root, path, _ = base
  rl_run = root / "rl_of_base"
  rl_run.mkdir()
  config = json.loads(open(os.path.join(path, "config.json")).read())
  config["sft"]["init"], config["rl"] = os.path.abspath(path), {"steps": 2}
  (rl_run / "config.json").write_text(json.dumps(config))  # a run from before run_kind.json: inferred
  before = (rl_run / "config.json").read_text()
  assert sft_cli.main(["sft", f"--init={path}", f"--workdir={rl_run}", "--config.sft.steps=1"]) == 2
  err = capsys.readouterr().err
  assert err == (f"error: --workdir={rl_run}: holds an rl run (lmtiny.rl) (inferred from {rl_run / 'config.json'}), "
                 "not an sft run (lmtiny.sft); choose another --workdir\n")
  assert os.listdir(rl_run) == ["config.json"] and (rl_run / "config.json").read_text() == before


def test_a_read_only_workdir_is_one_line_up_front(base, tmp_path, capsys):
  # Before: a traceback once the run began to write (the base weights and data loaded first).
  _, path, _ = base
  ro = ReadOnly(tmp_path)
  try:
    why = ro.freeze()
    assert sft_cli.main(["sft", f"--init={path}", f"--workdir={ro.root / 'sft'}"]) == 2
    assert os.listdir(ro.root) == []
  finally:
    ro.release()
  assert capsys.readouterr().err == f"error: --workdir={ro.root / 'sft'}: cannot write to {ro.root} ({why})\n"


def test_rows_fit_the_model_and_sft_lr_replaces_the_matrix_lr(base):
  root, path, convs = base
  cfg = read_run_config(path)
  cfg.optim.update(lr=0.02, embed_lr=0.2, unembed_lr=0.0)
  cfg.sft.update(sources=convs, lr=1e-3)
  cfg.train.update(seq_len=4 * cfg.model.max_seq_len, batch_tokens=16 * cfg.model.max_seq_len)  # an imported run's
  got = ft.sft_config(cfg, path, None)
  assert got.train.seq_len == cfg.model.max_seq_len  # it failed validation before
  # The chat tokens' embedding rows are new: they keep the config's embedding LR (see sft_config).
  assert (got.optim.lr, got.optim.embed_lr, got.optim.unembed_lr) == (1e-3, 0.2, 0.0)


def _warm_cfg(path, convs, **sft):
  cfg = read_run_config(path)
  cfg.sft.update(sources=convs, steps=1, warmup_steps=0, lr=3e-3, **sft)
  cfg.train.update(eval_every=1, eval_batches=0)
  return ft.sft_config(cfg, path, None)


@pytest.mark.slow(seconds=8)
def test_warm_start_is_one_more_base_step_at_the_sft_lr(base):
  """sft.load_optimizer + init_lr_frac: SFT's first step equals the base run's state (weights and
  optimizer state) continued by one step on SFT's first batch at LR sft.lr x init_lr_frac."""
  from lmtiny.runs.checkpoint import abstract_with_shardings, Checkpointer
  from lmtiny.training.resolved import resolve_run
  from lmtiny.training.steps import build_steps, device_batch
  root, path, convs = base
  cfg = _warm_cfg(path, convs, load_optimizer=True, init_lr_frac=0.5)
  lines = []
  trainer, _ = ft.finetune(cfg, str(root / "warm"), log=lines.append)
  assert any("optimizer state from the base run's step 2" in line for line in lines)
  assert any("LRs x0.5" in line for line in lines)
  run = resolve_run(cfg)
  steps = build_steps(cfg, run.mesh, 1, schedule=lambda _: 3e-3 * 0.5)
  target = abstract_with_shardings(steps.abstract_state, steps.state_shardings)
  ckpt = Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
  batch = next(ft.ChatBatches(cfg, trainer.data).train_iterator(run.process_batch))
  with jax.set_mesh(run.mesh):
    want = steps.train_step(ckpt.restore(2, target), device_batch(batch, run.mesh))[0]["params"]
    fresh = ckpt.restore(2, target)
    cold = steps.train_step({**fresh, "opt_state": steps.tx.init(fresh["params"])},
                            device_batch(batch, run.mesh))[0]["params"]
  ckpt.close()
  got = trainer.state["params"]
  for g, w, c in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(cold)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-7)
  assert max(float(np.abs(np.asarray(w) - np.asarray(c)).max()) for w, c in
             zip(jax.tree.leaves(want), jax.tree.leaves(cold))) > 1e-4  # the restored moments matter


def test_warm_start_refuses_another_optimizer_in_one_line(base):
  root, path, convs = base
  for override, words in (({"lora.rank": 4}, "a LoRA run (config.lora.rank=4)"),
                          ({"optim.name": "muon"}, "used optim.name='adamw', this run 'muon'")):
    cfg = _warm_cfg(path, convs, load_optimizer=True)
    for key, value in override.items():
      section, field = key.split(".")
      cfg[section][field] = value
    with pytest.raises(ConfigError, match="config.sft.load_optimizer=True: .*" + re.escape(words)):
      ft.finetune(cfg, str(root / "refused"), log=_quiet)
    assert not os.path.exists(root / "refused")
  with pytest.raises(ConfigError, match=r"^config.sft.init_lr_frac=0.0: must be > 0"):
    ft.finetune(_warm_cfg(path, convs, init_lr_frac=0.0), str(root / "refused"), log=_quiet)
