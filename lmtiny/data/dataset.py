"""The trainer's entry to data: the config's `data` section -> checked shards and tokenizer.

  data = load_data(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=cfg.train.seq_len)
  it = make_train_iterator(data.train_docs, seq_len=..., batch_size=..., bos_id=data.tokenizer.bos_id,
                           seed=cfg.data.shuffle_seed, num_workers=cfg.data.num_workers)

With `data.shards == ""` the embedded standard-library corpus is used: a tokenizer of the model's
vocab size and its shards are built once and cached (see `ensure_embedded_dataset`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from lmtiny.data import shards as shards_lib
from lmtiny.data.shards import DataError

DEFAULT_CACHE_DIR = "~/.cache/lmtiny"


@dataclasses.dataclass
class Data:
  train_docs: Sequence[np.ndarray]   # random-access token arrays (shards_lib.TokenDocs)
  val_docs: Sequence[np.ndarray]     # may be empty (prepared with --val-fraction 0)
  tokenizer: Any                     # lmtiny.tokenizer.Tokenizer
  token_bytes: np.ndarray            # int32[vocab]: UTF-8 bytes per id, for bits per byte
  manifest: dict[str, Any]
  directory: str


def load_data(data_cfg, *, vocab_size: int, seq_len: int) -> Data:
  """Opens and checks the shards the config names (or builds the embedded ones).

  Raises DataError (a lmtiny.config.ConfigError) naming the config field for anything a user can
  fix: missing or corrupt shards, a tokenizer or vocab size that does not match the shards.
  """
  if data_cfg.shards:
    directory = os.path.expanduser(data_cfg.shards)
    field = f"config.data.shards={data_cfg.shards!r}"
  else:
    from lmtiny.data.embedded import ensure_embedded_dataset  # pylint: disable=g-import-not-at-top
    cache_dir = os.path.expanduser(data_cfg.cache_dir or DEFAULT_CACHE_DIR)
    directory = ensure_embedded_dataset(cache_dir, vocab_size, data_cfg.embedded_max_chars)
    field = f"config.data.cache_dir={cache_dir!r}"
  try:
    manifest = shards_lib.load_manifest(directory)
    shards_lib.check_shards(directory, manifest)
  except DataError as e:
    raise DataError(f"{field}: {e}") from None
  if manifest["vocab_size"] != vocab_size:
    raise DataError(f"config.model.vocab_size={vocab_size}: the shards in {directory} (config.data.shards) "
                    f"were made with a {manifest['vocab_size']}-token vocab; set model.vocab_size="
                    f"{manifest['vocab_size']} or prepare shards with a matching tokenizer")
  tokenizer = _load_tokenizer(data_cfg.tokenizer, directory)
  if tokenizer.hash != manifest["tokenizer_hash"]:
    raise DataError(f"config.data.tokenizer={data_cfg.tokenizer!r}: tokenizer {tokenizer.hash[:12]} is not "
                    f"the one the shards in {directory} were made with ({manifest['tokenizer_hash'][:12]}); "
                    "use the shards' own (leave data.tokenizer empty) or re-run lmtiny.data.prepare")
  train = manifest["splits"]["train"]
  if train["tokens"] + train["documents"] < seq_len + 1:
    raise DataError(f"{field}: the train split has {train['tokens']} tokens, fewer than one row of "
                    f"config.train.seq_len={seq_len} + 1")
  return Data(train_docs=shards_lib.open_split(directory, manifest, "train"),
              val_docs=shards_lib.open_split(directory, manifest, "val"),
              tokenizer=tokenizer, token_bytes=np.asarray(tokenizer.token_bytes), manifest=manifest,
              directory=directory)


def _load_tokenizer(configured: str, directory: str):
  from lmtiny.tokenizer import Tokenizer, TokenizerError  # pylint: disable=g-import-not-at-top
  path = os.path.expanduser(configured) if configured else os.path.join(directory, shards_lib.TOKENIZER_DIR)
  try:
    return Tokenizer.load(path)
  except TokenizerError as e:
    field = f"config.data.tokenizer={configured!r}" if configured else f"config.data.shards={directory!r}"
    raise DataError(f"{field}: {e}") from None
