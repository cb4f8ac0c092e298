"""The one weight loader: falls back past a corrupt newest checkpoint (not past an asked-for step),
onto one device or a mesh alike; a LoRA run whose base is missing names the field; `lora merge`
writes its run directory whole or not at all."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from lmtiny.evals.loading import load_model
from lmtiny import lora as lora_cli
from lmtiny.rundir import RunError, load_weights, merge_lora_run


def test_corrupt_newest_checkpoint_falls_back_and_an_asked_step_does_not(chat_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(chat_run, workdir)
  shutil.copytree(f"{workdir}/checkpoints/1", f"{workdir}/checkpoints/2")
  os.remove(f"{workdir}/checkpoints/2/state/manifest.ocdbt")
  lines = []
  run, params = load_weights(workdir, log=lines.append)
  assert run.step == 1 and len(lines) == 1
  assert lines[0].startswith(f"warning: {workdir}: checkpoint at step 2 is unusable (")
  _, want = load_weights(chat_run)
  for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  assert load_model(workdir).step == 1  # eval (sharded over its mesh) falls back the same way
  assert os.path.isdir(f"{workdir}/checkpoints/2")  # nothing moved: a run may be using the directory
  with pytest.raises(RunError, match=rf"^--workdir={workdir}: no usable checkpoint \(step 2: "):
    load_weights(workdir, 2, log=lines.append)
  assert len(lines) == 1


def test_lora_run_with_a_missing_base_names_the_config_field(lora_run, tmp_path):
  workdir = str(tmp_path / "lora")
  shutil.copytree(lora_run[0], workdir)
  cfg = json.load(open(f"{workdir}/config.json"))
  cfg["sft"]["init"] = str(tmp_path / "gone")
  json.dump(cfg, open(f"{workdir}/config.json", "w"))
  with pytest.raises(RunError, match=rf"^{workdir}/config.json: sft.init={tmp_path / 'gone'}: no such directory$"):
    load_weights(workdir)


def test_interrupted_lora_merge_leaves_nothing_and_can_be_rerun(lora_run, tmp_path, monkeypatch, capsys):
  lora, merged = lora_run
  out = str(tmp_path / "merged")

  def interrupted(*args):
    raise KeyboardInterrupt
  monkeypatch.setattr("lmtiny.files.atomic_write", interrupted)  # config.json, after the checkpoint
  with pytest.raises(KeyboardInterrupt):
    merge_lora_run(lora, out)
  assert os.listdir(tmp_path) == []  # no half-written run, no temporary sibling
  monkeypatch.undo()
  assert lora_cli.main(["merge", "--workdir", lora, "--out", out]) == 0
  assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "tokenizer.model"]
  run, params = load_weights(out)
  assert run.cfg.lora.rank == 0 and run.cfg.sft.merged_from.startswith(lora)
  _, want = load_weights(merged)
  for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-6)
  capsys.readouterr()
  assert lora_cli.main(["merge", "--workdir", lora, "--out", out]) == 2
  err = capsys.readouterr().err
  assert err == f"error: --out={out}: already holds a run (remove it or pick another directory)\n"
