"""A small chat-capable run directory for eval / RL / report tests: a 512-token tokenizer that
knows the toy arithmetic problems, a ~0.2M-parameter model, and one checkpoint."""
from __future__ import annotations

import os

import jax
from etils import epath

from lm_fixtures import tiny_config
from lmtiny.corpus.embedded import iter_embedded_documents
from lmtiny.parallel import sharding
from lmtiny.runs.checkpoint import Checkpointer
from lmtiny.tasks.toy import toy_texts
from lmtiny.tokenizer import train_tokenizer
from lmtiny.training.loop import write_run_files
from lmtiny.training.steps import build_steps

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
  write_run_files(epath.Path(workdir), cfg, tokenizer)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  ckpt.save(step, state)
  ckpt.close()
  return cfg



def make_lora_run(workdir: str, base_dir: str, merged_dir: str, step: int = 3, rank: int = 2):
  """A LoRA run over `base_dir`'s newest checkpoint as lmtiny.sft writes one (config lora.rank and
  sft.init / init_step; a checkpoint of the adapters only), with random adapters (a trained B is
  not zero); and `merged_dir`, the same model as a full run, merged here with LoRA.merge."""
  from lmtiny.model.adapters import from_config
  from lmtiny.runs.directory import load_weights
  base, params = load_weights(base_dir)
  cfg = base.cfg.copy_and_resolve_references()
  cfg.lora.update(rank=rank, alpha=2.0 * rank)
  cfg.sft.update(init=base_dir, init_step=base.step)
  lora = from_config(cfg.model, cfg.lora)
  leaves, treedef = jax.tree.flatten(lora.init(jax.random.key(1)))
  keys = jax.random.split(jax.random.key(2), len(leaves))
  adapters = jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  merged_cfg = cfg.copy_and_resolve_references()
  merged_cfg.lora.rank = 0
  for path, c, p in ((workdir, cfg, adapters), (merged_dir, merged_cfg, jax.jit(lora.merge)(params, adapters))):
    os.makedirs(path, exist_ok=True)
    write_run_files(epath.Path(path), c, base.tokenizer)
    ckpt = Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
    ckpt.save(step, {"params": p})
    ckpt.close()
