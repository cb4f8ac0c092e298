"""The one weight loader: falls back past a corrupt newest checkpoint (not past an asked-for step),
onto one device or a mesh alike; a LoRA run whose base is missing names the field."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from lmtiny.evals.loading import load_model
from lmtiny.rundir import RunError, load_weights


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
