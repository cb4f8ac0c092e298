"""A small chat-capable run directory for eval / RL / report tests: a 512-token tokenizer that
knows the toy arithmetic problems, a ~0.2M-parameter model, and one checkpoint."""
from __future__ import annotations

import os

import jax

from lm_fixtures import tiny_config
from lmtiny import sharding
from lmtiny.checkpoint import Checkpointer
from lmtiny.data.embedded import iter_embedded_documents
from lmtiny.evals.toy import toy_texts
from lmtiny.tokenizer import train_tokenizer
from lmtiny.trainer import _write_run_files, build_steps

VOCAB = 512


def make_tokenizer(directory: str):
  docs = toy_texts(400) + list(iter_embedded_documents(60_000))
  return train_tokenizer(docs, VOCAB, directory)


def run_config(**model):
  cfg = tiny_config()
  cfg.model.update(vocab_size=VOCAB, max_seq_len=128, **model)
  cfg.train.update(seq_len=64, batch_tokens=64 * 8)
  return cfg


def make_run(workdir: str, tokenizer, cfg=None, step: int = 1):
  """A run directory with config.json, tokenizer.model and a randomly initialised checkpoint."""
  cfg = cfg or run_config()
  mesh = sharding.make_mesh(cfg.mesh)
  steps = build_steps(cfg, mesh, 1)
  with jax.set_mesh(mesh):
    state = steps.init()
  os.makedirs(workdir, exist_ok=True)
  _write_run_files(__import__("etils").epath.Path(workdir), cfg, tokenizer)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  ckpt.save(step, state)
  ckpt.close()
  return cfg
