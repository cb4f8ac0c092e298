"""Conversations -> packed training batches with the render's loss mask.

Each conversation is rendered with `render_conversation` (ids, and a mask that is 1 only on what
the assistant writes) and cut at seq_len + 1 tokens. Pretraining documents in a mixture become
BOS + document with the mask on every predicted token. Examples are packed whole, first come
first served: an example that does not fit in the rest of a row starts the next row, and the
rest of the row is padding (segment 0, no loss), so no conversation is split and no attention
crosses conversations (each has its own segment id, positions restart at 0).

A batch has the pipeline's keys (lmtiny.data.pipeline): inputs, targets, segment_ids, positions
([B, T] int32) and loss_mask (float32: the mask of each *target* token, zero across segments).
Iterators are grain iterators with get_state()/set_state(), checkpointed with the model.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from lmtiny.chat import nanochat_sft
from lmtiny.chat.bestfit_pad import BestFitPadDataset
from lmtiny.chat.conversations import iter_conversations, parse_mixture, split_limit
from lmtiny.corpus.sources import SourceError
from lmtiny.data.pipeline import _READ_OPTIONS, _shuffle_seed
from lmtiny.tokenizer import render_conversation, TokenizerError

VAL_EVERY = 50  # conversation files hold out one conversation in 50 (if they have 100 or more)


class Examples(Sequence):
  """Tokenized (ids, mask) pairs, stored flat: random access without a Python object per token."""

  def __init__(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]):
    lengths = [len(ids) for ids, _ in pairs]
    self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    self.ids = np.fromiter(itertools.chain.from_iterable(i for i, _ in pairs), np.int32, int(self.offsets[-1]))
    self.mask = np.fromiter(itertools.chain.from_iterable(m for _, m in pairs), np.int8, int(self.offsets[-1]))

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i):
    a, b = self.offsets[i], self.offsets[i + 1]
    return self.ids[a:b], self.mask[a:b]


def render_examples(conversations, tokenizer, max_len: int, where: str) -> Examples:
  """Renders conversations, dropping any with nothing to train on within max_len tokens."""
  pairs = []
  for i, messages in enumerate(conversations):
    try:
      ids, mask = render_conversation(tokenizer, messages, max_len=max_len)
    except (TokenizerError, KeyError, TypeError, AttributeError) as e:
      raise SourceError(f"{where}: conversation {i}: {e}") from None
    if any(mask[1:]):
      pairs.append((ids, mask))
  return Examples(pairs)


class DocumentExample:
  """A pretraining document as an example: BOS + tokens (cut to max_len), loss on all but BOS."""

  def __init__(self, bos_id: int, max_len: int):
    self.bos_id, self.max_len = bos_id, max_len

  def __call__(self, doc):
    ids = np.concatenate([[self.bos_id], np.asarray(doc, np.int32)[:self.max_len - 1]]).astype(np.int32)
    mask = np.ones(ids.shape, np.int8)
    mask[0] = 0
    return ids, mask


@dataclasses.dataclass
class ChatData:
  """What the trainer reads (the attributes of lmtiny.data.dataset.Data), for conversations."""
  train: list[tuple[Any, float, str]]   # (examples or documents, weight, spec) per source
  val_docs: Examples                     # held-out conversations of all conversation sources
  tokenizer: Any
  token_bytes: np.ndarray
  max_len: int
  train_docs: Sequence = ()              # all training examples (its length is what resume reads)
  render: Any = None                     # the `nanochat` source: conversation -> (ids, mask), rendered as read

  def describe(self) -> str:
    if self.render is not None:
      (mixture, _, spec), = self.train
      counts = ", ".join(f"{name} {n:,}" for name, n in mixture.counts().items())
      return (f"{spec}: {len(mixture):,} conversations ({counts}), best-fit rows padded with BOS | held out: "
              f"{len(self.val_docs):,} conversations")
    parts = [f"{spec} x{weight:g} ({len(items):,} {'documents' if spec == 'pretrain' else 'conversations'})"
             for items, weight, spec in self.train]
    return "; ".join(parts) + f" | held out: {len(self.val_docs):,} conversations"


def load_chat_data(sources: str, tokenizer, seq_len: int, pretrain_docs: Sequence | None = None) -> ChatData:
  """Reads and renders every source of the mixture `sources` (config.sft.sources)."""
  max_len = seq_len + 1
  mixture = parse_mixture(sources)
  if any(nanochat_sft.is_nanochat(spec) for spec, _ in mixture):
    if len(mixture) > 1:
      raise SourceError(f"config.sft.sources={sources}: {nanochat_sft.SPEC} is a whole mixture of its own; "
                        "it cannot be mixed with other sources")
    return load_nanochat_data(mixture[0][0], tokenizer, seq_len)
  train, val = [], []
  for spec, weight in mixture:
    if spec == "pretrain":
      if pretrain_docs is None or not len(pretrain_docs):
        raise SourceError("config.sft.sources: 'pretrain' needs the base run's training data")
      train.append((pretrain_docs, weight, spec))
      continue
    spec, limit = split_limit(spec)
    conversations = iter_conversations(spec)
    conversations = list(itertools.islice(conversations, limit) if limit else conversations)
    if spec.partition("?")[0] == "embedded_chat":
      held = list(iter_conversations("embedded_chat?split=val"))
    elif len(conversations) >= 2 * VAL_EVERY:
      held, conversations = conversations[::VAL_EVERY], [c for i, c in enumerate(conversations) if i % VAL_EVERY]
    else:
      held = []
    examples = render_examples(conversations, tokenizer, max_len, spec)
    if not len(examples):
      raise SourceError(f"{spec}: no conversation with assistant text within {max_len} tokens")
    train.append((examples, weight, spec))
    val.extend(render_examples(held, tokenizer, max_len, spec))
  all_train = sum((len(items) for items, _, _ in train), 0)
  return ChatData(train=train, val_docs=Examples(val), tokenizer=tokenizer,
                  token_bytes=np.asarray(tokenizer.token_bytes), max_len=max_len, train_docs=range(all_train))


class NanochatRender:
  """nanochat's render of one conversation (cut at its 2,048 tokens, or at a row when rows are
  shorter); an error names the conversation."""

  def __init__(self, tokenizer, seq_len: int, where: str):
    self.tokenizer, self.max_len, self.where = tokenizer, min(nanochat_sft.MAX_TOKENS, seq_len + 1), where

  def __call__(self, messages):
    try:
      return render_conversation(self.tokenizer, messages, max_len=self.max_len)
    except (TokenizerError, KeyError, TypeError, AttributeError) as e:
      raise SourceError(f"{self.where}: {e}") from None


def load_nanochat_data(spec: str, tokenizer, seq_len: int) -> ChatData:
  """The `nanochat` source (lmtiny.chat.nanochat_sft): its training and held-out mixtures, every
  conversation rendered when the packer reads it (lmtiny.chat.bestfit_pad)."""
  train, val = nanochat_sft.load_mixtures(spec)
  return ChatData(train=[(train, 1.0, spec)], val_docs=val, tokenizer=tokenizer,
                  token_bytes=np.asarray(tokenizer.token_bytes), max_len=seq_len + 1, train_docs=range(len(train)),
                  render=NanochatRender(tokenizer, seq_len, spec))


# ---------------------------------------------------------------------------------------------
# Packing.


def pack_rows(examples: Sequence[tuple[np.ndarray, np.ndarray]], rows: Sequence[int], batch_size: int,
              row_len: int) -> dict[str, np.ndarray]:
  """Places example k in row rows[k], after the examples before it in that row."""
  tok, msk, seg, pos = (np.zeros((batch_size, row_len), np.int32) for _ in range(4))
  fill = np.zeros(batch_size, np.int64)
  for (ids, mask), r in zip(examples, rows):
    a, n = fill[r], len(ids)
    tok[r, a:a + n], msk[r, a:a + n] = ids, mask
    seg[r, a:a + n], pos[r, a:a + n] = seg[r].max() + 1, np.arange(n)
    fill[r] += n
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
  return {"inputs": tok[:, :-1].copy(), "targets": tok[:, 1:].copy(), "segment_ids": seg[:, :-1].copy(),
          "positions": pos[:, :-1].copy(), "loss_mask": (msk[:, 1:] * same).astype(np.float32)}


class PackedExamples(grain.IterDataset):
  """Packs an iterator of (ids, mask) examples into batches of whole examples, at most
  `max_per_row` to a row when it is > 0 (data.max_docs_per_row: the bound packed attention
  kernels size their per-run state by, lmtiny.training.steps.packed_runs)."""

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, batch_size: int, pad_final: bool = False,
               max_per_row: int = 0):
    super().__init__(parent)
    self._kw = dict(row_len=seq_len + 1, batch_size=batch_size, pad_final=pad_final, max_per_row=max_per_row)

  def __iter__(self):
    return _PackedExamplesIterator(self._parent.__iter__(), **self._kw)


class _PackedExamplesIterator(grain.DatasetIterator):
  """State = (parent state before the example held over for the next batch, 1 if one is held)."""

  def __init__(self, parent, *, row_len: int, batch_size: int, pad_final: bool, max_per_row: int = 0):
    super().__init__(parent)
    self._row_len, self._batch_size, self._pad_final = row_len, batch_size, pad_final
    self._max_per_row = max_per_row
    self._held, self._held_state, self._done = None, None, False

  def _next_example(self):
    state = self._parent.get_state()
    ids, mask = next(self._parent)
    return (np.asarray(ids)[:self._row_len], np.asarray(mask)[:self._row_len]), state

  def __next__(self):
    if self._done:
      raise StopIteration
    examples, rows, row, fill, in_row = [], [], 0, 0, 0
    while True:
      if self._held is not None:
        example, state = self._held, self._held_state
        self._held = None
      else:
        try:
          example, state = self._next_example()
        except StopIteration:
          if not self._pad_final or not examples:
            raise
          self._done = True
          break
      if fill + len(example[0]) > self._row_len or in_row == self._max_per_row > 0:
        row, fill, in_row = row + 1, 0, 0
      if row == self._batch_size:
        self._held, self._held_state = example, state
        break
      examples.append(example)
      rows.append(row)
      fill += len(example[0])
      in_row += 1
    return pack_rows(examples, rows, self._batch_size, self._row_len)

  def get_state(self):
    if self._held is None:
      return {"parent": self._parent.get_state(), "offset": 0}
    return {"parent": self._held_state, "offset": 1}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._held, self._held_state, self._done = None, None, False
    if int(state["offset"]):
      self._held, self._held_state = self._next_example()


def make_chat_train_iterator(data: ChatData, *, seq_len: int, batch_size: int, seed: int,
                             process_index: int = 0, process_count: int = 1,
                             max_per_row: int = 0, document_mask: bool = True) -> grain.DatasetIterator:
  """Infinite, shuffled (every epoch anew), weighted mixture of the sources, packed (at most
  `max_per_row` examples to a row, when > 0); the `nanochat` source: its own order, best-fit rows."""
  if data.render is not None:
    return iter(BestFitPadDataset(data.train[0][0], data.render, seq_len=seq_len, batch_size=batch_size,
                                  bos_id=data.tokenizer.bos_id, document_mask=document_mask,
                                  process_index=process_index, process_count=process_count))
  datasets, weights = [], []
  for i, (items, weight, spec) in enumerate(data.train):
    ds = grain.MapDataset.source(items)[process_index::process_count]
    if spec == "pretrain":
      ds = ds.map(DocumentExample(data.tokenizer.bos_id, data.max_len))
    datasets.append(ds.shuffle(seed=_shuffle_seed(seed + 1000 * i)).repeat(None))
    weights.append(weight)
  mixed = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
  return iter(PackedExamples(mixed.to_iter_dataset(_READ_OPTIONS), seq_len=seq_len, batch_size=batch_size,
                             max_per_row=max_per_row))


def make_chat_eval_iterator(examples: Examples, *, seq_len: int, batch_size: int, num_batches: int,
                            process_index: int = 0, process_count: int = 1, max_per_row: int = 0,
                            data: ChatData | None = None, document_mask: bool = True
                            ) -> Iterator[dict[str, np.ndarray]]:
  """The held-out conversations in order; exactly num_batches batches (padding after the end). The
  `nanochat` source (`data.render` set): its held-out mixture's best-fit rows from the start, as
  nanochat's validation loader (wrapping around)."""
  if data is not None and data.render is not None:
    rows = BestFitPadDataset(data.val_docs, data.render, seq_len=seq_len, batch_size=batch_size,
                             bos_id=data.tokenizer.bos_id, document_mask=document_mask,
                             process_index=process_index, process_count=process_count)
    return itertools.islice(iter(rows), max(num_batches, 1))
  ds = grain.MapDataset.source(examples)[process_index::process_count].to_iter_dataset(_READ_OPTIONS)
  batches = iter(PackedExamples(ds, seq_len=seq_len, batch_size=batch_size, pad_final=True, max_per_row=max_per_row))
  empty = pack_rows([], [], batch_size, seq_len + 1)
  padding = ({k: v.copy() for k, v in empty.items()} for _ in itertools.count())
  return itertools.islice(itertools.chain(batches, padding), max(num_batches, 1))
