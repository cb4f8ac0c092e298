"""Bits per byte on a shard set's val split: the trainer's own measure (`Trainer.evaluate`)."""
from __future__ import annotations

import jax
from flax import nnx

from lmtiny.data.dataset import load_data
from lmtiny.errors import UserError
from lmtiny.training.trainer import Trainer


def evaluate_bpb(loaded, shards: str | None = None, eval_batches: int = 0) -> dict:
  """Loss and bpb of `loaded` (lmtiny.tasks.model_loading.LoadedModel) on `shards`' val split (default:
  the data the run trained on), over the run's eval batches (or `eval_batches`)."""
  cfg = loaded.cfg.copy_and_resolve_references()
  if shards:
    cfg.data.update(shards=shards, tokenizer="")
  if eval_batches:
    cfg.train.eval_batches = eval_batches
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  data = load_data(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=cfg.train.seq_len)
  if data.tokenizer.hash != loaded.tokenizer.hash:
    raise UserError(f"--shards={shards or cfg.data.shards}: made with another tokenizer than the run's")
  if not len(data.val_docs):
    raise UserError(f"--shards={shards or data.directory}: the val split is empty")
  trainer = Trainer(cfg, "", data, log=lambda _: None)
  with jax.set_mesh(trainer.mesh):
    result = trainer.evaluate(nnx.state(loaded.model, nnx.Param))
  return {"loss": result["loss"], "bpb": result["bpb"], "tokens": result["tokens"], "shards": data.directory}
