"""config.data's layout and feeding options through the train step and the run loop: no document
mask (one causal sequence per row, no segment ids to the model), a cap on documents per row, and
the prefetch thread, whose checkpointed data position is exact."""
import jax
import numpy as np
import pytest

from lm_fixtures import memory_data, one_device, tiny_config
from lmtiny.data import pipeline
from lmtiny.parallel import sharding
from lmtiny.training.benchmark import synthetic_batch
from lmtiny.training.trainer import Trainer
from lmtiny.training.steps import build_steps, device_batch


def _losses_of(cfg, batch):
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  steps = build_steps(cfg, mesh, total_steps=2)
  with jax.set_mesh(mesh):
    state = steps.init()
    _, metrics = steps.train_step(state, device_batch(batch, mesh))
    return float(metrics["loss"])


def _packed_batch(cfg, **options):
  docs = [np.arange(2 + i % 5, 9 + i % 7, dtype=np.int32) for i in range(40)]
  return next(pipeline.make_train_iterator(docs, seq_len=cfg.train.seq_len, batch_size=4, bos_id=0, seed=0,
                                           **options))


@pytest.mark.slow(seconds=7)
def test_the_step_without_the_document_mask_is_plain_causal_attention():
  masked, causal = tiny_config(steps=2), tiny_config(steps=2)
  causal.data.document_mask = False
  # One segment per row: the segment mask is the causal mask, so both settings agree.
  one_run = synthetic_batch(masked, 4)
  assert _losses_of(causal, one_run) == pytest.approx(_losses_of(masked, one_run), rel=1e-6)
  # Several documents per row: without the mask the step ignores the segment ids it is given.
  packed = _packed_batch(masked)
  assert packed["segment_ids"].max() > 1
  assert abs(_losses_of(causal, packed) - _losses_of(masked, packed)) > 1e-4
  merged = _packed_batch(masked, document_mask=False)
  assert np.isfinite(_losses_of(causal, merged))


def test_the_step_on_capped_rows():
  cfg = tiny_config(steps=2)
  batch = _packed_batch(cfg, max_docs_per_row=2)
  assert (batch["segment_ids"] == 0).any() and batch["segment_ids"].max() == 2
  assert np.isfinite(_losses_of(cfg, batch))


class _ConfiguredTrainer(Trainer):
  """The trainer with config.data's pipeline options passed to its iterators."""

  def train_iterator(self):
    t, d = self.cfg.train, self.cfg.data
    return pipeline.make_train_iterator(self.data.train_docs, seq_len=t.seq_len, batch_size=self.process_batch,
                                        bos_id=self.data.tokenizer.bos_id, seed=d.shuffle_seed,
                                        prefetch=d.prefetch, max_docs_per_row=d.max_docs_per_row,
                                        document_mask=d.document_mask)


@pytest.mark.slow(seconds=10)
def test_prefetch_and_cap_resume_exactly(tmp_path):
  cfg = tiny_config(steps=6, checkpoint_every=3, log_every=1)
  cfg.data.update(prefetch=3, max_docs_per_row=2)
  quiet, run = lambda _: None, one_device(cfg)
  full = _ConfiguredTrainer(run, str(tmp_path / "full"), memory_data(), log=quiet).run()
  first = _ConfiguredTrainer(run, str(tmp_path / "split"), memory_data(), log=quiet).run(stop_after=2)
  second = _ConfiguredTrainer(run, str(tmp_path / "split"), memory_data(), log=quiet).run()
  assert first["step"] == 2 and first["preempted"] and len(full["train_loss"]) == 6
  assert first["train_loss"] + second["train_loss"] == full["train_loss"]  # bit for bit
