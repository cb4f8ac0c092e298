"""The one weight loader: falls back past a corrupt newest checkpoint (not past an asked-for step,
not for an error that is not damage), onto one device or a mesh alike, from relative paths too; a
LoRA run whose base is missing names the field; `lora merge` writes its run directory whole or not
at all; a directory that holds no run says so in one line."""
import glob
import json
import os
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lmtiny import lora as lora_cli
from lmtiny.errors import UserError
from lmtiny.parallel import sharding
from lmtiny.runs import checkpoint as checkpoint_lib
from lmtiny.runs.checkpoint import (abstract_with_shardings, Checkpointer,
                                    FingerprintMismatch)
from lmtiny.runs.directory import load_run, load_weights, merge_lora_run, RunError
from lmtiny.tasks.model_loading import load_model
from lmtiny.training.steps import build_steps
from readonly import ReadOnly


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
  monkeypatch.setattr("lmtiny.fs.atomic.atomic_write", interrupted)  # config.json, after the checkpoint
  with pytest.raises(KeyboardInterrupt):
    merge_lora_run(lora, out)
  assert os.listdir(tmp_path) == []  # no half-written run, no temporary sibling
  monkeypatch.undo()
  assert lora_cli.main(["merge", "--workdir", lora, "--out", out]) == 0
  assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "run_kind.json", "tokenizer.model"]
  run, params = load_weights(out)
  assert run.cfg.lora.rank == 0 and run.cfg.sft.merged_from.startswith(lora)
  _, want = load_weights(merged)
  for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-6)
  capsys.readouterr()
  assert lora_cli.main(["merge", "--workdir", lora, "--out", out]) == 2
  err = capsys.readouterr().err
  assert err == f"error: --out={out}: already holds a run (remove it or pick another directory)\n"


def _same_params(a, b):
  for got, ref in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_relative_paths_load_like_absolute_ones(chat_run, lora_run, tmp_path, monkeypatch):
  """orbax refuses relative paths; every loader (generate, serve, eval, export, rl --init, lora merge,
  a training run's resume) takes one as the user typed it, and messages keep that spelling."""
  shutil.copytree(chat_run, tmp_path / "run")
  shutil.copytree(lora_run[0], tmp_path / "lora")  # its base (sft.init) stays absolute, as sft writes it
  monkeypatch.chdir(tmp_path)
  lines = []
  run, params = load_weights("run", log=lines.append)
  assert run.workdir == "run" and run.step == 1 and lines == []
  _same_params(params, load_weights(chat_run)[1])
  assert load_model("run").step == 1  # eval, sharded over its mesh
  _, merged = load_weights("lora")
  _same_params(merged, load_weights(lora_run[1])[1])
  assert merge_lora_run("lora", "merged") == "merged" and load_weights("merged")[0].step == 3
  ckpt = Checkpointer("run/checkpoints")  # a training run's resume
  assert ckpt.restore_newest(lambda step: ckpt.restore(step, _abstract_state(run)), lines.append)[0] == 1
  ckpt.close()
  assert lines == []


def _abstract_state(run):
  steps = build_steps(run.cfg, sharding.make_mesh(run.cfg.mesh), 1)
  return abstract_with_shardings(steps.abstract_state, steps.state_shardings)


def test_an_error_that_is_not_damage_surfaces_as_itself(chat_run, tmp_path, monkeypatch):
  """Only CheckpointCorrupt means "try the previous checkpoint": a path error (orbax given a relative
  path, as before the loaders made paths absolute) or a programming error is raised as it is, not
  reported as every checkpoint being unusable."""
  workdir = str(tmp_path / "run")
  shutil.copytree(chat_run, workdir)
  shutil.copytree(f"{workdir}/checkpoints/1", f"{workdir}/checkpoints/2")
  monkeypatch.chdir(tmp_path)
  lines = []
  monkeypatch.setattr(checkpoint_lib, "_absolute", lambda directory: checkpoint_lib.epath.Path(directory))
  with pytest.raises(ValueError, match="Checkpoint path should be absolute"):
    load_weights("run", log=lines.append)
  monkeypatch.undo()

  def broken(*args, **kwargs):
    raise TypeError("a bug")
  monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", broken)
  with pytest.raises(TypeError, match="a bug"):
    load_weights(workdir, log=lines.append)
  assert lines == []


def test_fingerprints_are_checked_and_required_where_they_were_saved(chat_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(chat_run, workdir)
  (fingerprint,) = glob.glob(f"{workdir}/checkpoints/1/fingerprint/metadata")
  saved = json.load(open(fingerprint))
  saved["params"][0] += 1
  json.dump(saved, open(fingerprint, "w"))
  with pytest.raises(FingerprintMismatch, match="parameter data does not match the fingerprint"):
    checkpoint_lib.restore_params(f"{workdir}/checkpoints", 1, jax.tree.map(lambda x: x, _params_target(workdir)))
  shutil.rmtree(f"{workdir}/checkpoints/1/fingerprint")  # saved with one (its _CHECKPOINT_METADATA says so)
  with pytest.raises(RunError, match=r"\(step 1: fingerprint/ is missing \(the checkpoint was saved with one\)\)$"):
    load_weights(workdir)


def _params_target(workdir):
  from flax import nnx
  from lmtiny.model.transformer import abstract_model
  from lmtiny.runs.directory import _placed
  return _placed(nnx.state(abstract_model(load_run(workdir).cfg.model), nnx.Param), None)


def test_a_directory_that_holds_no_run_is_one_line(tmp_path):
  (tmp_path / "shards").mkdir()
  (tmp_path / "shards" / "manifest.json").write_text("{}")
  (tmp_path / "empty").mkdir()
  (tmp_path / "a_file").write_text("x")
  for path, message in [
      ("shards", "not a run directory (no config.json, no checkpoints/); it holds data shards (lmtiny.data.prepare)"),
      ("empty", "not a run directory (no config.json, no checkpoints/)"),
      ("a_file", "not a directory"), ("gone", "no such directory")]:
    with pytest.raises(RunError) as e:
      load_run(str(tmp_path / path), flags=("--init", "--init-step"))
    assert str(e.value) == f"--init={tmp_path / path}: {message}"


def test_lora_merge_onto_a_read_only_place_is_one_line_before_the_weights_load(lora_run, tmp_path, monkeypatch):
  from lmtiny.runs import directory as rundir
  monkeypatch.setattr(rundir, "load_weights", lambda *a, **k: pytest.fail("loaded the weights before the check"))
  ro = ReadOnly(tmp_path)
  try:
    why = ro.freeze()
    with pytest.raises(UserError, match=re.escape(f"--out={ro.root / 'merged'}: cannot write to {ro.root} ({why})")):
      merge_lora_run(lora_run[0], str(ro.root / "merged"))
    assert os.listdir(ro.root) == []
  finally:
    ro.release()
