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
import shutil
import tempfile
from typing import Any, Sequence

import numpy as np

from lmtiny.corpus.embedded import embedded_fingerprint, iter_embedded_documents
from lmtiny.corpus.sources import open_source
from lmtiny.data import mixture, shard_writer, shards as shards_lib
from lmtiny.data.shards import DataError
from lmtiny.tokenizer import Tokenizer, TokenizerError, train_tokenizer

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
  path = os.path.expanduser(configured) if configured else os.path.join(directory, shards_lib.TOKENIZER_DIR)
  try:
    return Tokenizer.load(path)
  except TokenizerError as e:
    field = f"config.data.tokenizer={configured!r}" if configured else f"config.data.shards={directory!r}"
    raise DataError(f"{field}: {e}") from None


# ---------------------------------------------------------------------------------------------
# The cached tokenizer + shards the trainer uses when no data is configured.

EMBEDDED_VAL_FRACTION = 0.05


def ensure_embedded_dataset(cache_dir: str, vocab_size: int, max_chars: int = 0) -> str:
  """Builds (once) and returns a shard directory of the embedded corpus with its own tokenizer.

  The directory is `<cache_dir>/embedded-<fingerprint>-v<vocab_size>`, keyed by content, so a
  new Python (new corpus) or vocab size gets a new build. The build happens in a temporary
  directory renamed into place at the end: two runs racing both succeed and one copy survives.
  """
  key = f"embedded-{embedded_fingerprint(max_chars)}-v{vocab_size}"
  final = os.path.join(cache_dir, key)
  if os.path.isfile(os.path.join(final, shards_lib.MANIFEST_FILE)):
    return final
  os.makedirs(cache_dir, exist_ok=True)
  work = tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir)
  try:
    tok_dir, data_dir = os.path.join(work, "tokenizer"), os.path.join(work, "data")
    tokenizer = train_tokenizer(iter_embedded_documents(max_chars), vocab_size, tok_dir, seed=0)
    shard_writer.prepare_dataset(open_source(f"embedded?max_chars={max_chars}"), tokenizer, data_dir,
                                 val_fraction=EMBEDDED_VAL_FRACTION, workers=0)
    # Keep the tokenizer's full directory (vocab listing, report) next to the shards_lib.
    shutil.rmtree(os.path.join(data_dir, shards_lib.TOKENIZER_DIR))
    os.replace(tok_dir, os.path.join(data_dir, shards_lib.TOKENIZER_DIR))
    try:
      os.rename(data_dir, final)
    except OSError:
      if not os.path.isfile(os.path.join(final, shards_lib.MANIFEST_FILE)):  # not a finished racer
        raise
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return final
