"""Fault injection: corrupt checkpoints, a full disk, two runs in one directory, changed configs,
kills and SIGTERMs at awkward moments. Each case asserts the loss sequence (against one
uninterrupted reference run), the files left behind, the exit status and the one-line message."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import pytest
import tensorstore as ts

from lm_fixtures import ROOT, memory_data, one_device, prefetch_threads, tiny_config
from lmtiny.errors import ConfigError
from lmtiny.fs import outputs
from lmtiny.runs.checkpoint import (abstract_with_shardings, CheckpointCorrupt, Checkpointer,
                                    CheckpointError, CheckpointSaveError, FingerprintMismatch, restore_params)
from lmtiny.runs.lock import RunLock, WorkdirBusy
from lmtiny.training.trainer import Trainer


def _cfg(**train):
  return tiny_config(**{"steps": 8, "checkpoint_every": 4, "eval_every": 4, **train})


def _run(**train):
  return one_device(_cfg(**train))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run (checkpoints at 4 and 8); tests copy its directory."""
  workdir = str(tmp_path_factory.mktemp("faults") / "ref")
  summary = Trainer(_run(), workdir, memory_data(), log=lambda _: None).run()
  return workdir, summary


def _copy(reference, tmp_path, name="run"):
  dst = str(tmp_path / name)
  shutil.copytree(reference[0], dst)
  return dst


def _losses(summary):
  return [loss for _, loss in summary["train_loss"]]


# ---------------------------------------------------------------------------------------------
# Corrupt checkpoints.


def _truncate(step_dir):
  for f in glob.glob(f"{step_dir}/state/ocdbt.process_0/d/*"):
    os.truncate(f, os.path.getsize(f) // 2)


def _garbage(step_dir):
  """Flipped bytes inside the largest data file: depending on where the async save put each array,
  they land in a chunk's zstd frame (a read error) or in its payload (a fingerprint mismatch)."""
  (big,) = sorted(glob.glob(f"{step_dir}/state/ocdbt.process_0/d/*"), key=os.path.getsize)[-1:]
  data = bytearray(open(big, "rb").read())
  for i in range(len(data) // 3, len(data) // 3 + 64):
    data[i] ^= 0x5A
  open(big, "wb").write(bytes(data))


def _empty(step_dir):
  for name in os.listdir(step_dir):
    path = os.path.join(step_dir, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


CORRUPTIONS = {
    "truncated": _truncate,
    "garbage": _garbage,
    "no_metadata": lambda d: os.remove(f"{d}/state/_METADATA"),
    "no_manifest": lambda d: os.remove(f"{d}/state/manifest.ocdbt"),
    "bad_iterator_json": lambda d: open(f"{d}/data_iter/process_0-of-1.json", "w").write("{not json"),
    "spoiled_iterator": lambda d: open(f"{d}/data_iter/process_0-of-1.json", "w").write('{"spoiled": true}'),
    "no_iterator": lambda d: shutil.rmtree(f"{d}/data_iter"),
    "no_fingerprint": lambda d: shutil.rmtree(f"{d}/fingerprint"),  # saved with one: not trusted without it
    "malformed_fingerprint": lambda d: open(f"{d}/fingerprint/metadata", "w").write("[1, 2]"),
    "emptied": _empty,
}


@pytest.mark.slow(seconds=14)
@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back(reference, tmp_path, kind):
  workdir = _copy(reference, tmp_path)
  CORRUPTIONS[kind](f"{workdir}/checkpoints/8")
  trainer = Trainer(_run(), workdir, memory_data(), log=lambda _: None)
  target = abstract_with_shardings(trainer.steps.abstract_state, trainer.steps.state_shardings)
  ckpt, lines = Checkpointer(f"{workdir}/checkpoints"), []
  with jax.set_mesh(trainer.mesh):
    step, state = ckpt.restore_newest(lambda s: ckpt.restore(s, target, trainer.train_iterator()), lines.append)
  ckpt.close()
  assert step == 4 and int(state["step"]) == 4
  assert len(lines) == 1 and lines[0].startswith("warning: checkpoint at step 8 is unusable (")
  (moved,) = glob.glob(f"{workdir}/checkpoints/corrupt-8-*")
  assert moved in lines[0] and not os.path.exists(f"{workdir}/checkpoints/8")  # moved aside, kept


def _restore_state(reference, workdir, step):
  trainer = Trainer(_run(), workdir, memory_data(), log=lambda _: None)
  target = abstract_with_shardings(trainer.steps.abstract_state, trainer.steps.state_shardings)
  ckpt = Checkpointer(f"{workdir}/checkpoints")
  try:
    with jax.set_mesh(trainer.mesh):
      return ckpt.restore(step, target, trainer.train_iterator()), target["params"]
  finally:
    ckpt.close()


def _rewrite_array(step_dir, key):
  """New values written through tensorstore itself: the storage stays valid, so only the fingerprint
  can notice. (Flipping bytes in the files cannot promise this: chunks are zstd frames, and where a
  flip lands in a frame's header the read fails first.)"""
  array = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{step_dir}/state/",
                                                 "path": f"{key}/"}}).result()
  array.write(array.read().result() + 1).result()


def test_altered_array_data_is_a_fingerprint_mismatch(reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  _rewrite_array(f"{workdir}/checkpoints/8", "params.lm_head.value")
  with pytest.raises(FingerprintMismatch, match=r"^array data does not match the fingerprint saved with it"):
    _restore_state(reference, workdir, 8)


def test_an_error_that_is_not_damage_is_raised_and_moves_nothing(reference, tmp_path):
  """restore_newest falls back on CheckpointCorrupt only: a bug (here a TypeError) in restoring is
  not taken for a damaged checkpoint, so no good checkpoint is moved aside for it."""
  workdir = _copy(reference, tmp_path)
  ckpt, lines = Checkpointer(f"{workdir}/checkpoints"), []

  def restore(step):
    raise TypeError("a bug")
  with pytest.raises(TypeError, match="a bug"):
    ckpt.restore_newest(restore, lines.append)
  ckpt.close()
  assert lines == [] and sorted(os.listdir(f"{workdir}/checkpoints")) == ["4", "8"]


def _ocdbt_values(step_dir, prefix):
  """(file, offset, length) of every array chunk stored in its own byte range whose key starts
  with `prefix`, from the OCDBT index of the checkpoint's state (tensorstore's own listing)."""
  base = ts.KvStore.open(f"file://{step_dir}/state/").result()
  (version,) = ts.ocdbt.dump(base).result()["versions"]
  assert version["root_height"] == 0  # one index node: a small checkpoint
  found = []
  for entry in ts.ocdbt.dump(base, version["root"]["location"]).result()["entries"]:
    if bytes(entry["key"]).decode().startswith(prefix) and "indirect_value" in entry:
      _, subdir, name, offset, length = entry["indirect_value"].split(":")
      found.append((f"{step_dir}/state/{subdir}{name}", int(offset), int(length)))
  return found


def _flip(values):
  for path, offset, length in values:
    data = bytearray(open(path, "rb").read())
    data[offset:offset + length] = bytes(b ^ 0xFF for b in data[offset:offset + length])
    open(path, "wb").write(bytes(data))


def test_damage_outside_the_parameters_leaves_the_weights_usable(reference, tmp_path):
  """Why a checkpoint that training refuses can still be sampled from: the weight loaders
  (restore_params, under lmtiny.runs.directory.load_weights) read only the parameters and check them against
  their own fingerprint. (This made the catalogue's every-checkpoint-truncated test flaky: an async
  save writes the arrays in no fixed order, and when every parameter landed in the first half of its
  file, cutting the files in half left them whole, and generate rightly loaded them.)"""
  workdir = _copy(reference, tmp_path)
  step_dir = f"{workdir}/checkpoints/8"
  _, params_target = _restore_state(reference, workdir, 8)
  want = restore_params(f"{workdir}/checkpoints", 8, params_target)
  _flip(_ocdbt_values(step_dir, "opt_state."))
  got = restore_params(f"{workdir}/checkpoints", 8, params_target)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert (a == b).all()
  with pytest.raises(CheckpointCorrupt, match=r'^(DATA_LOSS|FAILED_PRECONDITION): Error reading "opt_state'):
    _restore_state(reference, workdir, 8)
  _flip(_ocdbt_values(step_dir, "params.embed"))
  with pytest.raises(CheckpointCorrupt, match=r'^(DATA_LOSS|FAILED_PRECONDITION): Error reading "params.embed'):
    restore_params(f"{workdir}/checkpoints", 8, params_target)


def test_resume_after_corrupt_checkpoint_repeats_the_lost_steps_exactly(reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  _truncate(f"{workdir}/checkpoints/8")
  lines, before = [], prefetch_threads()
  summary = Trainer(_run(), workdir, memory_data(), log=lines.append).run()
  # The failed restore's traceback holds the data iterator; the run closed it, stopping its thread
  assert not prefetch_threads() - before
  assert _losses(summary) == _losses(reference[1])[4:]  # steps 5..8 again, bit for bit
  assert any(l.startswith("warning: checkpoint at step 8 is unusable") for l in lines)
  assert sorted(os.listdir(f"{workdir}/checkpoints"))[:2] == ["4", "8"]  # a fresh, good step 8
  steps = [(r["step"], r["split"]) for r in map(json.loads, open(f"{workdir}/metrics.jsonl"))]
  assert len(steps) == len(set(steps))  # no duplicated records


def test_no_usable_checkpoint_is_one_error_and_moves_nothing(reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  for step in (4, 8):
    _truncate(f"{workdir}/checkpoints/{step}")
  with pytest.raises(CheckpointError, match=r"no checkpoint restores cleanly \(step 8: .*; step 4: "):
    Trainer(_run(), workdir, memory_data(), log=lambda _: None).run()
  assert sorted(os.listdir(f"{workdir}/checkpoints")) == ["4", "8"]


# ---------------------------------------------------------------------------------------------
# Disk full, run directory guards.


def test_disk_full_during_an_async_save_is_one_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  """A 2.5 MB tmpfs holds one checkpoint of this model (about 1.2 MB) and not two: the async save
  of step 4 fails. Where mounting is not allowed, a write hook raises ENOSPC at that save."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(disk)],
                           capture_output=True).returncode == 0
  if not mounted:
    original = Checkpointer.save

    def save(self, step, state, data_iter=None):
      if step == 4:
        raise self._save_error(step, OSError(28, "No space left on device"))
      return original(self, step, state, data_iter)
    monkeypatch.setattr(Checkpointer, "save", save)
  lines = []
  try:
    with pytest.raises(CheckpointSaveError) as e:
      Trainer(_run(checkpoint_every=2, async_checkpointing=True, keep_checkpoints=1), str(disk / "run"),
              memory_data(), log=lines.append).run()
    assert str(e.value).startswith("checkpoint at step 4 failed to save (disk full: No space left on device) in ")
    assert str(e.value).endswith("; the last good checkpoint is step 2") and "\n" not in str(e.value)
    assert [d for d in os.listdir(disk / "run" / "checkpoints") if d.isdigit()] == ["2"]
    assert not mounted or lines[0].startswith(f"warning: {disk / 'run'} has 2 MB free; 1 kept checkpoint(s) plus")
    resumed = Trainer(_run(), str(disk / "run"), memory_data(), log=lines.append)  # the intact one restores
    with jax.set_mesh(resumed.mesh):
      ckpt = Checkpointer(str(disk / "run" / "checkpoints"))
      assert ckpt.restore_newest(lambda s: s, lines.append)[0] == 2
      ckpt.close()
  finally:
    if mounted:
      subprocess.run(["umount", "-l", str(disk)], check=True)  # -l: a lingering writer thread cannot keep it


def test_disk_space_warning():
  lines = []
  outputs.check_disk_space("/", 1 << 60, 3, lines.append)
  assert len(lines) == 1 and lines[0].startswith("warning: / has ") and "need about 4096 PB" not in lines[0]
  outputs.check_disk_space("/", 1, 3, lines.append)
  assert len(lines) == 1


def test_second_run_in_the_same_directory_is_refused(tmp_path):
  with RunLock(str(tmp_path)):
    with pytest.raises(WorkdirBusy, match=rf"^{tmp_path}: another training run is using this directory \(pid {os.getpid()}"):
      with RunLock(str(tmp_path)):
        pass
  with RunLock(str(tmp_path)):  # released on exit
    pass


def test_changed_model_shape_is_refused_before_anything_is_written(reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  before = {f: os.path.getmtime(f) for f in glob.glob(f"{workdir}/*") if os.path.isfile(f)}
  cfg = _cfg()
  cfg.model.d_model, cfg.train.log_every = 32, 1
  with pytest.raises(ConfigError, match=r"other shapes \(model.d_model 64 -> 32\); keep those"):
    Trainer(one_device(cfg), workdir, memory_data(), log=lambda _: None).run()
  assert {f: os.path.getmtime(f) for f in before} == before and not os.path.exists(f"{workdir}/config_history.jsonl")


@pytest.mark.slow(seconds=4)
def test_schedule_edits_are_allowed_and_recorded(reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  cfg = _cfg(steps=10)
  cfg.model.dtype, cfg.optim.lr = "float32", 5e-3  # lr: the schedule, not the state's shapes
  lines = []
  summary = Trainer(one_device(cfg), workdir, memory_data(), log=lines.append).run()
  assert summary["step"] == 10
  (record,) = map(json.loads, open(f"{workdir}/config_history.jsonl"))
  assert record["step"] == 8 and record["changes"] == {"optim.lr": {"old": 0.01, "new": 0.005},
                                                       "train.steps": {"old": 8, "new": 10}}
  assert any(l.startswith("config changed since the last run (from step 8): optim.lr 0.01 -> 0.005") for l in lines)


# ---------------------------------------------------------------------------------------------
# prepare, killed at any moment.

_KILL_PREPARE = """
import os, signal, sys
from lmtiny.data import shard_writer
from lmtiny.corpus.sources import open_source
from lmtiny.tokenizer import Tokenizer
spec, tok_dir, out, after = sys.argv[1:]
add, seen = shard_writer._Writer.add, [0]
def add_then_die(self, tokens, num_bytes):
  if seen[0] == int(after):
    os.kill(os.getpid(), signal.SIGKILL)
  seen[0] += 1
  add(self, tokens, num_bytes)
shard_writer._Writer.add = add_then_die
shard_writer._TASK_DOCS = 2
shard_writer.prepare_dataset(open_source(spec), Tokenizer.load(tok_dir), out, val_fraction=0.2, workers=1, docs_per_shard=4)
"""


@pytest.fixture(scope="module")
def prepare_inputs(tmp_path_factory):
  from lmtiny.corpus.embedded import iter_embedded_documents
  from lmtiny.data.shard_writer import prepare_dataset
  from lmtiny.corpus.sources import open_source
  from lmtiny.tokenizer import Tokenizer, train_tokenizer
  root = tmp_path_factory.mktemp("prepare")
  train_tokenizer(iter_embedded_documents(100_000), 512, str(root / "tok"), seed=0)
  (root / "txt").mkdir()
  for i in range(11):
    (root / "txt" / f"{i:02d}.txt").write_text(f"document {i}: " + "lorem ipsum dolor " * (i + 1))
  spec = f"txt:{root}/txt/*.txt"
  reference = prepare_dataset(open_source(spec), Tokenizer.load(str(root / "tok")), str(root / "ref"),
                              val_fraction=0.2, workers=1, docs_per_shard=4)
  return root, spec, reference


@pytest.mark.parametrize("after", [0, 1, 3, 4, 9])  # before any document, inside the first shard, at a
def test_prepare_killed_at_any_moment_resumes_to_the_same_shards(prepare_inputs, tmp_path, after):  # boundary, late
  from lmtiny.data import shard_writer, shards
  from lmtiny.corpus.sources import open_source
  from lmtiny.tokenizer import Tokenizer
  root, spec, reference = prepare_inputs
  out = str(tmp_path / "out")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  killed = subprocess.run([sys.executable, "-c", _KILL_PREPARE, spec, str(root / "tok"), out, str(after)],
                          env=env, capture_output=True, text=True, timeout=120)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert not os.path.exists(f"{out}/manifest.json") and os.path.exists(f"{out}/progress.json")
  resumed = shard_writer.prepare_dataset(open_source(spec), Tokenizer.load(str(root / "tok")), out,
                                    val_fraction=0.2, workers=1, docs_per_shard=4)
  assert resumed == reference
  for split in shards.SPLITS:
    for a, b in zip(shards.open_split(out, resumed, split), shards.open_split(str(root / "ref"), reference, split)):
      assert a.tolist() == b.tolist()
  assert sorted(os.listdir(out)) == sorted(os.listdir(root / "ref"))  # no progress.json or .tmp left


# ---------------------------------------------------------------------------------------------
# metrics.jsonl across kills and restarts.


def test_a_val_point_a_kill_cut_off_is_evaluated_on_resume(reference, tmp_path):
  """Killed during the eval that follows the step-4 checkpoint: no val record at 4."""
  from lmtiny.fs.atomic import atomic_write
  from lmtiny.runs.metrics import read_metrics
  workdir = _copy(reference, tmp_path)
  shutil.rmtree(f"{workdir}/checkpoints/8")
  kept = [r for r in read_metrics(workdir) if r["step"] < 4 or (r["step"] == 4 and r["split"] == "train")]
  atomic_write(f"{workdir}/metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept).encode())
  summary = Trainer(_run(), workdir, memory_data(), log=lambda _: None).run()
  assert summary["val"] == reference[1]["val"][1:]  # steps 4 and 8, the uninterrupted values
  assert [r["step"] for r in read_metrics(workdir) if r["split"] == "val"] == [0, 4, 8]


def test_starting_over_from_step_0_drops_the_old_records(tmp_path):
  from lmtiny.runs.metrics import MetricsWriter, read_metrics
  old = MetricsWriter(str(tmp_path))
  for step in (0, 2, 4):
    old.write(step, "train", {"loss": 1.0})
  old.close()
  MetricsWriter(str(tmp_path), resume_step=2).close()  # resumed at 2: step 4 goes
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 2]
  MetricsWriter(str(tmp_path), resume_step=0).close()  # no checkpoint survived: all of it goes
  assert read_metrics(str(tmp_path)) == []
