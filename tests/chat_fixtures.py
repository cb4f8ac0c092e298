"""Shared by the chat tests: a small real tokenizer, a 2-step base run directory made with it,
and a jsonl file of conversations."""
from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import tempfile
import threading

import jax
import numpy as np
from flax import nnx

from lm_fixtures import memory_data, tiny_config
from lmtiny.chat.server import make_server
from lmtiny.model.sampling import Sampler
from lmtiny.model.transformer import Transformer

TOKENIZER_CHARS = 60_000
TOKENIZER_VOCAB = 512


@functools.lru_cache(maxsize=1)
def make_tokenizer():
  """One tokenizer per test process, shared by the chat test modules."""
  from lmtiny.corpus.embedded import iter_embedded_documents
  from lmtiny.tokenizer import train_tokenizer
  directory = tempfile.mkdtemp(prefix="lmtiny-chat-tok-")
  atexit.register(shutil.rmtree, directory, True)  # this process made it: gone when the process is
  return train_tokenizer(iter_embedded_documents(TOKENIZER_CHARS), TOKENIZER_VOCAB, directory)


def chat_config(tok, **train):
  cfg = tiny_config(**train)
  cfg.model.update(vocab_size=tok.vocab_size, max_seq_len=64)
  return cfg


def random_sampler(tok, context: int) -> Sampler:
  """A random-weight chat model of `context` tokens that decodes 4 tokens per call, as lmtiny.serve streams."""
  cfg = chat_config(tok)
  cfg.model.max_seq_len = context
  return Sampler(Transformer(cfg.model, nnx.Rngs(0)), chunk=4)


def serve_in_thread(service, **server_kw):
  """lmtiny.chat.server on a free port, answering from a daemon thread (shut down by the caller)."""
  server = make_server(service, port=0, **server_kw)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server


@contextlib.contextmanager
def counting_lowerings():
  """A list that gets an entry for every program lowered (to be compiled) while the block runs."""
  lowered = []

  def listener(event, duration_secs, **kwargs):
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      lowered.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield lowered
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def make_base_run(root: str, tok, steps: int = 2) -> str:
  """A base run directory (config.json, tokenizer.model, checkpoint)."""
  from lmtiny.training.trainer import Trainer
  cfg = chat_config(tok, steps=steps, checkpoint_every=steps, eval_batches=0)
  data = memory_data(vocab=tok.vocab_size)
  data.tokenizer = tok
  path = os.path.join(root, "base")
  Trainer(cfg, path, data, log=lambda _: None).run()
  return path


QUESTIONS = [("What is {n} plus {m}?", "{n} plus {m} is {s}."),
             ("Add {n} and {m}.", "The sum of {n} and {m} is {s}.")]


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
  """Short arithmetic chats (one or two exchanges)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    turns = []
    for _ in range(1 + i % 2):
      a, b = (int(x) for x in rng.integers(0, 50, 2))
      q, r = QUESTIONS[int(rng.integers(2))]
      turns += [{"role": "user", "content": q.format(n=a, m=b)},
                {"role": "assistant", "content": r.format(n=a, m=b, s=a + b)}]
    out.append(turns)
  return out


def write_jsonl(path: str, convs) -> str:
  with open(path, "w") as f:
    for c in convs:
      f.write(json.dumps({"messages": c}) + "\n")
  return path
