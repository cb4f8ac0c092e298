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

from lmtiny.data import mixture, shards as shards_lib
from lmtiny.data.shards import DataError

DEFAULT_CACHE_DIR = "~/.cache/lmtiny"


@dataclasses.dataclass
class Data:
  train_docs: Sequence[np.ndarray]   # random-access token arrays (shards_lib.TokenDocs, or MixedDocs)
  val_docs: Sequence[np.ndarray]     # may be empty (prepared with --val-fraction 0)
  tokenizer: Any                     # lmtiny.tokenizer.Tokenizer
  token_bytes: np.ndarray            # int32[vocab]: UTF-8 bytes per id, for bits per byte
  manifest: dict[str, Any]           # the (first) shard directory's
  directory: str                     # the shard directory, or the mixture as configured
  description: str = ""              # a mixture's sources, shares and passes per epoch


def load_data(data_cfg, *, vocab_size: int, seq_len: int) -> Data:
  """Opens and checks the shards the config names (or builds the embedded ones): one directory,
  or a weighted mixture "dir:weight,dir:weight" of directories made with one tokenizer
  (lmtiny.data.mixture).

  Raises DataError (a lmtiny.config.ConfigError) naming the config field for anything a user can
  fix: missing or corrupt shards, a tokenizer or vocab size that does not match the shards.
  """
  if data_cfg.shards:
    field = f"config.data.shards={data_cfg.shards!r}"
    sources = [(os.path.expanduser(d), w) for d, w in mixture.parse_weighted(data_cfg.shards, "config.data.shards")]
  else:
    from lmtiny.data.embedded import ensure_embedded_dataset  # pylint: disable=g-import-not-at-top
    cache_dir = os.path.expanduser(data_cfg.cache_dir or DEFAULT_CACHE_DIR)
    sources = [(ensure_embedded_dataset(cache_dir, vocab_size, data_cfg.embedded_max_chars), 1.0)]
    field = f"config.data.cache_dir={cache_dir!r}"
  directories = [d for d, _ in sources]
  manifests = [_checked_manifest(d, field, vocab_size) for d in directories]
  for directory, manifest in zip(directories[1:], manifests[1:]):
    if manifest["tokenizer_hash"] != manifests[0]["tokenizer_hash"]:
      raise DataError(f"{field}: {directory} was made with tokenizer {manifest['tokenizer_hash'][:12]}, "
                      f"{directories[0]} with {manifests[0]['tokenizer_hash'][:12]}; a mixture needs one tokenizer")
  tokenizer = _load_tokenizer(data_cfg.tokenizer, directories[0])
  if tokenizer.hash != manifests[0]["tokenizer_hash"]:
    raise DataError(f"config.data.tokenizer={data_cfg.tokenizer!r}: tokenizer {tokenizer.hash[:12]} is not "
                    f"the one the shards in {directories[0]} were made with ({manifests[0]['tokenizer_hash'][:12]}); "
                    "use the shards' own (leave data.tokenizer empty) or re-run lmtiny.data.prepare")
  train = [m["splits"]["train"] for m in manifests]
  empty = [d for d, split in zip(directories, train) if not split["documents"]]
  if len(sources) > 1 and empty:
    raise DataError(f"{field}: {empty[0]} has no train documents to give its share")
  if sum(t["tokens"] + t["documents"] for t in train) < seq_len + 1:
    raise DataError(f"{field}: the train split has {sum(t['tokens'] for t in train)} tokens, fewer than one row "
                    f"of config.train.seq_len={seq_len} + 1")
  splits = {split: [shards_lib.open_split(d, m, split) for d, m in zip(directories, manifests)]
            for split in shards_lib.SPLITS}
  common = dict(tokenizer=tokenizer, token_bytes=np.asarray(tokenizer.token_bytes), manifest=manifests[0])
  if len(sources) == 1:
    return Data(train_docs=splits["train"][0], val_docs=splits["val"][0], directory=directories[0], **common)
  weights = [w for _, w in sources]
  counts = {}
  for split, count in (("train", mixture.train_counts), ("val", mixture.val_counts)):
    entries = [m["splits"][split] for m in manifests]
    counts[split] = count(weights, [e["documents"] for e in entries], [e["tokens"] for e in entries])
  return Data(train_docs=mixture.MixedDocs(splits["train"], counts["train"]),
              val_docs=mixture.MixedDocs(splits["val"], counts["val"], interleave=True),
              directory=data_cfg.shards,
              description=mixture.describe_mixture(directories, weights, [t["documents"] for t in train],
                                                   [t["tokens"] for t in train], counts["train"]),
              **common)


def _checked_manifest(directory: str, field: str, vocab_size: int) -> dict[str, Any]:
  try:
    manifest = shards_lib.load_manifest(directory)
    shards_lib.check_shards(directory, manifest)
  except DataError as e:
    raise DataError(f"{field}: {e}") from None
  if manifest["vocab_size"] != vocab_size:
    raise DataError(f"config.model.vocab_size={vocab_size}: the shards in {directory} (config.data.shards) "
                    f"were made with a {manifest['vocab_size']}-token vocab; set model.vocab_size="
                    f"{manifest['vocab_size']} or prepare shards with a matching tokenizer")
  return manifest


def _load_tokenizer(configured: str, directory: str):
  from lmtiny.tokenizer import Tokenizer, TokenizerError  # pylint: disable=g-import-not-at-top
  path = os.path.expanduser(configured) if configured else os.path.join(directory, shards_lib.TOKENIZER_DIR)
  try:
    return Tokenizer.load(path)
  except TokenizerError as e:
    field = f"config.data.tokenizer={configured!r}" if configured else f"config.data.shards={directory!r}"
    raise DataError(f"{field}: {e}") from None
