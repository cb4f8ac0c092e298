"""The grain input pipeline: token documents -> packed, batched training rows.

documents (any random-access sequence of 1-D token arrays: an in-memory list, or the shards'
`TokenDocs`) -> this process's slice `[process_index::process_count]` -> seeded shuffle, a new
order every epoch -> a BOS in front of each document -> packing into rows of seq_len + 1 tokens
-> batches -> optionally grain worker processes that prefetch batches -> optionally a thread that
keeps a few batches ready (`prefetch`), so the host packs the next batch while the step runs.

Packing is concat-then-split, vectorised over a whole batch: documents follow each other with
no padding, and a document that does not fit is cut at the row end and continues at the start of
the next row (as a new segment whose positions restart at 0). Every token is used once; the only
pairs never trained are the ones straddling a row boundary (the last token of a row is not an
input, the first token of the next row is not a target). The finite evaluation iterator pads the
tail of its last batch instead.

`max_docs_per_row` > 0 caps the segments of a row (a continuation counts as one): once a row holds
that many, the rest of it is padding (segment 0, loss-masked) and the next document starts the
next row. It bounds the document runs per row that packed attention kernels must size for
(`max_runs_per_row`); 0 = no cap.

`document_mask=False` lets documents attend across their boundaries (nanochat's layout): every
non-padding token of a row has segment id 1 and positions run 0..T-1 along the row, so attention
is plain causal; the step from one document into the next is trained (its target is the BOS).

Each batch is a dict of [B, T] numpy arrays (T = seq_len):
  inputs, targets  int32   row[:-1], row[1:]
  segment_ids      int32   1..k for the documents of a row, 0 on padding (document_mask=False: 1)
  positions        int32   restart at 0 where a document (or its continuation) starts
                           (document_mask=False: 0..T-1)
  loss_mask        float32 1 where input and target belong to the same segment, 0 otherwise
                           (padding, and the step from one document into the next)

`packing="bestfit"` builds the rows another way (lmtiny.data.bestfit, nanochat's dataloader): every
row starts with a document's BOS, documents are placed whole, best fit first, and the one that
fills the rest of a row is cropped; nothing continues into the next row. Its batches carry the
same keys: each document of a row its own segment (positions from 0 at its BOS), or with
`document_mask=False` one causal sequence per row, every target trained (nanochat's layout).

Resuming from a state is exact with every option: a prefetching iterator's state is that of the
last batch handed out, not of the batches made ahead.
"""
from __future__ import annotations

import functools
import itertools
import json
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from lmtiny.config import PACKINGS
from lmtiny.data import bestfit
from lmtiny.errors import ConfigError

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def max_runs_per_row(max_docs_per_row: int, document_mask: bool = True) -> int:
  """A static bound on the runs of equal segment ids in a packed row, for attention kernels that
  size per-row state by it (cuDNN's packed layout); 0 = no bound the packer guarantees.

  A padding tail adds one run after the last document; a kernel that merges runs past its bound
  into the last one may merge it away (the padding then attends to that document, which never
  attends forward to it under the causal mask, and padding carries no loss), so the cap is the
  bound. Without the document mask a row is one causal sequence: 1.
  """
  if not document_mask:
    return 1
  return max(0, int(max_docs_per_row))


def pack_batch(tokens: np.ndarray, starts: np.ndarray, batch_size: int, row_len: int,
               document_mask: bool = True) -> dict[str, np.ndarray]:
  """Lays out consecutive segments as a batch of rows; see the module docstring for the keys.

  Args:
    tokens: 1-D int32, the concatenated segments, at most batch_size * row_len tokens (a shorter
      input is padded with zeros and segment id 0).
    starts: increasing start offsets of the segments in `tokens`, starts[0] == 0.
    batch_size: rows per batch.
    row_len: tokens per row, seq_len + 1.
    document_mask: False lays the rows out as one segment each (module docstring).
  """
  need = batch_size * row_len
  n = tokens.size
  starts = starts.astype(np.int32)
  doc = np.repeat(np.arange(starts.size, dtype=np.int32), np.diff(starts, append=n))
  index = np.arange(n, dtype=np.int32)
  row_start = np.repeat(np.arange(0, need, row_len, dtype=np.int32), row_len)[:n]
  # A segment starts at its document start, or at the row start for a continuation.
  positions = index - np.maximum(starts[doc], row_start)
  segments = doc - doc[row_start] + 1

  def rows(x):
    out = np.zeros((batch_size, row_len), np.int32)
    out.reshape(-1)[:n] = x
    return out

  return _layout(rows(tokens), rows(segments), rows(positions), document_mask)


def _layout(tok: np.ndarray, seg: np.ndarray, pos: np.ndarray, document_mask: bool) -> dict[str, np.ndarray]:
  """Full [B, seq_len + 1] rows of tokens, segment ids and positions -> the batch's [B, T] arrays."""
  if not document_mask:
    seg = (seg > 0).astype(np.int32)
    pos = np.broadcast_to(np.arange(seg.shape[1], dtype=np.int32), seg.shape)
  return {
      "inputs": tok[:, :-1].copy(),
      "targets": tok[:, 1:].copy(),
      "segment_ids": seg[:, :-1].copy(),
      "positions": pos[:, :-1].copy(),
      "loss_mask": ((seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)).astype(np.float32),
  }


class PackedBatchDataset(grain.IterDataset):
  """Packs an iterator of token documents into batches (concat-then-split, BOS per document)."""

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, batch_size: int, bos_id: int,
               pad_final: bool = False, max_docs_per_row: int = 0, document_mask: bool = True):
    super().__init__(parent)
    self._seq_len = seq_len
    self._batch_size = batch_size
    self._bos_id = bos_id
    self._pad_final = pad_final
    self._max_docs_per_row = max_docs_per_row
    self._document_mask = document_mask

  def __iter__(self) -> grain.DatasetIterator:
    return _PackedBatchIterator(self._parent.__iter__(), seq_len=self._seq_len, batch_size=self._batch_size,
                                bos_id=self._bos_id, pad_final=self._pad_final,
                                max_docs_per_row=self._max_docs_per_row, document_mask=self._document_mask)

  def __str__(self) -> str:
    return f"PackedBatchDataset(seq_len={self._seq_len}, batch_size={self._batch_size})"


class _PackedBatchIterator(grain.DatasetIterator):
  """State = (parent state before the partly used document, tokens of it already emitted).

  A batch stops pulling documents as soon as it is full, so at most one document is partly used.
  Every batch starts a new row, so the cap on documents per row needs no more state.
  """

  def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, batch_size: int, bos_id: int,
               pad_final: bool, max_docs_per_row: int = 0, document_mask: bool = True):
    super().__init__(parent)
    self._row_len = seq_len + 1
    self._batch_size = batch_size
    self._need = batch_size * self._row_len
    self._bos = np.array([bos_id], np.int32)
    self._pad_final = pad_final
    self._cap = max_docs_per_row
    self._document_mask = document_mask
    self._rest = None          # unused suffix of the partly used document (BOS included)
    self._rest_state = None    # parent state from before that document was read
    self._rest_offset = 0      # tokens of it (BOS included) already emitted
    self._done = False

  def __next__(self) -> dict[str, np.ndarray]:
    if self._done:
      raise StopIteration
    if self._cap:
      return self._next_capped()
    pieces, starts, total = [], [], 0
    if self._rest is not None:
      pieces.append(self._rest)
      starts.append(0)
      total = self._rest.size
    last_state, last_start = None, 0
    while total < self._need:
      state = self._parent.get_state()
      try:
        doc = next(self._parent)
      except StopIteration:
        if not self._pad_final or total == 0:
          raise
        self._done = True
        break
      doc = np.asarray(doc)
      last_state, last_start = state, total
      pieces.append(self._bos)
      pieces.append(doc)
      starts.append(total)
      total += 1 + doc.size
    tokens = np.concatenate(pieces, dtype=np.int32) if len(pieces) > 1 else pieces[0].astype(np.int32)
    if total > self._need:
      if last_state is None:  # the carried-over document still does not end in this batch
        self._rest_offset += self._need
      else:
        self._rest_state, self._rest_offset = last_state, self._need - last_start
      self._rest = tokens[self._need:].copy()
      tokens = tokens[:self._need]
    else:
      self._rest, self._rest_state, self._rest_offset = None, None, 0
    return pack_batch(tokens, np.asarray(starts, np.int64), self._batch_size, self._row_len, self._document_mask)

  def _next_capped(self) -> dict[str, np.ndarray]:
    """The next batch with at most `self._cap` segments per row, filled segment by segment."""
    shape = (self._batch_size, self._row_len)
    tok, seg, pos = np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    piece, used, carried, last_state = self._rest, 0, self._rest is not None, None
    row = col = docs = 0
    while row < self._batch_size:
      if piece is None:
        state = self._parent.get_state()
        try:
          doc = next(self._parent)
        except StopIteration:
          if not self._pad_final or (row == 0 and col == 0):
            raise
          self._done = True
          break
        piece, used, carried, last_state = np.concatenate([self._bos, np.asarray(doc)], dtype=np.int32), 0, False, state
      n = min(piece.size - used, self._row_len - col)
      docs += 1
      tok[row, col:col + n] = piece[used:used + n]
      seg[row, col:col + n] = docs
      pos[row, col:col + n] = np.arange(n, dtype=np.int32)
      used, col = used + n, col + n
      if used == piece.size:
        piece = None
      if col == self._row_len or (piece is None and docs == self._cap):
        row, col, docs = row + 1, 0, 0
    if piece is None:
      self._rest, self._rest_state, self._rest_offset = None, None, 0
    else:
      if carried:  # the carried-over document still does not end in this batch
        self._rest_offset += used
      else:
        self._rest_state, self._rest_offset = last_state, used
      self._rest = piece[used:].copy()
    return _layout(tok, seg, pos, self._document_mask)

  def get_state(self) -> dict[str, Any]:
    if self._rest is None:
      return {"parent": self._parent.get_state(), "offset": 0}
    return {"parent": self._rest_state, "offset": self._rest_offset}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._rest, self._rest_state, self._rest_offset, self._done = None, None, 0, False
    offset = int(state["offset"])
    if offset:
      doc = np.asarray(next(self._parent))
      self._rest = np.concatenate([self._bos, doc], dtype=np.int32)[offset:]
      self._rest_state, self._rest_offset = state["parent"], offset


def _process_slice(docs: Sequence, process_index: int, process_count: int) -> grain.MapDataset:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  return grain.MapDataset.source(docs)[process_index::process_count]


# Documents are read on the calling thread: reader threads only added GIL contention here, for
# in-memory documents and local shards alike (benchmarks/data_pipeline.py). Worker processes are
# the way to add parallelism.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _shuffle_seed(seed: int) -> int:
  # grain reshuffles epoch e with seed + e; spread user seeds so nearby seeds do not share orders.
  return int(np.random.SeedSequence(int(seed)).generate_state(1, np.uint32)[0])


def _ensure_absl_flags_parsed():
  # grain's worker processes read absl flags; a library caller (test, notebook) may not have parsed them.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _rows_to_batch(rows: dict[str, np.ndarray], document_mask: bool) -> dict[str, np.ndarray]:
  return _layout(rows["tokens"], rows["segments"], rows["positions"], document_mask)


def _packed(docs: grain.MapDataset, *, seq_len: int, batch_size: int, bos_id: int, packing: str,
            bestfit_buffer: int, max_docs_per_row: int, document_mask: bool, pad_final: bool) -> grain.IterDataset:
  """Batches of `docs` packed as `packing` says (module docstring)."""
  if packing == "concat":
    return PackedBatchDataset(docs.to_iter_dataset(_READ_OPTIONS), seq_len=seq_len, batch_size=batch_size,
                              bos_id=bos_id, pad_final=pad_final, max_docs_per_row=max_docs_per_row,
                              document_mask=document_mask)
  if packing != "bestfit":
    raise ValueError(f"packing={packing!r} must be one of {', '.join(PACKINGS)}")
  if max_docs_per_row:
    raise ValueError(f"max_docs_per_row={max_docs_per_row}: best-fit rows have no padding to cap documents with")
  rows = bestfit.BestFitRowsDataset(docs, seq_len=seq_len, batch_size=batch_size, bos_id=bos_id,
                                    buffer_size=bestfit_buffer)
  return rows.map(functools.partial(_rows_to_batch, document_mask=document_mask))


def train_stream(docs: Sequence, seed: int, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """This process's endless stream of training documents, the packers' input: its slice,
  reshuffled every epoch (stream index e * len(slice) + i is the i-th document of epoch e)."""
  ds = _process_slice(docs, process_index, process_count)
  if len(ds) == 0:
    raise ConfigError(f"no training documents for process {process_index} of {process_count} "
                      f"(the split has {len(docs)} documents)")
  return ds.shuffle(seed=_shuffle_seed(seed)).repeat(None)


def make_train_iterator(docs: Sequence, *, seq_len: int, batch_size: int, bos_id: int, seed: int,
                        process_index: int = 0, process_count: int = 1,
                        num_workers: int = 0, prefetch: int = 0, max_docs_per_row: int = 0,
                        document_mask: bool = True, packing: str = "concat",
                        bestfit_buffer: int = bestfit.NANOCHAT_BUFFER) -> grain.DatasetIterator:
  """Infinite iterator of packed batches over this process's slice, reshuffled every epoch.

  `batch_size` is this process's rows per step. The iterator supports get_state()/set_state()
  (and grain.checkpoint.CheckpointSave/Restore). A state belongs to this process count,
  `num_workers` and `packing` (not to `prefetch`: the state is the same with or without it);
  `map_train_state` converts saved states to other counts.

  `prefetch` > 0: a background thread keeps up to that many batches ready (grain's thread
  prefetch: the state is that of the last batch consumed, an error in the thread is raised by
  next(), and close() or dropping the iterator stops the thread). `max_docs_per_row`,
  `document_mask`, `packing` and `bestfit_buffer` (documents the best-fit choice searches): the
  module docstring.
  """
  ds = train_stream(docs, seed, process_index, process_count)
  packed = _packed(ds, seq_len=seq_len, batch_size=batch_size, bos_id=bos_id, packing=packing,
                   bestfit_buffer=bestfit_buffer, max_docs_per_row=max_docs_per_row, document_mask=document_mask,
                   pad_final=False)
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    packed = packed.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))
  if prefetch > 0:
    packed = grain.experimental.ThreadPrefetchIterDataset(packed, prefetch_buffer_size=prefetch)
  return iter(packed)


def make_eval_iterator(docs: Sequence, *, seq_len: int, batch_size: int, bos_id: int, num_batches: int,
                       process_index: int = 0, process_count: int = 1, max_docs_per_row: int = 0,
                       document_mask: bool = True, packing: str = "concat",
                       bestfit_buffer: int = bestfit.NANOCHAT_BUFFER) -> Iterator[dict[str, np.ndarray]]:
  """Deterministic, finite iterator: documents in order, no shuffle, the last batch padded.

  num_batches > 0: exactly that many batches; once this process's slice is used up the rest are
  all padding (loss_mask 0), so every process runs the same number of steps. num_batches <= 0:
  one pass over the slice (the count may then differ between processes). `max_docs_per_row`,
  `document_mask`, `packing` and `bestfit_buffer` as for training, so evaluation sees the layout
  the model trains on (best-fit evaluation rows crop as training rows do, as nanochat's do).
  """
  ds = _process_slice(docs, process_index, process_count)
  batches = iter(_packed(ds, seq_len=seq_len, batch_size=batch_size, bos_id=bos_id, packing=packing,
                         bestfit_buffer=bestfit_buffer, max_docs_per_row=max_docs_per_row,
                         document_mask=document_mask, pad_final=True))
  if num_batches <= 0:
    return batches
  empty = pack_batch(np.zeros(0, np.int32), np.zeros(0, np.int64), batch_size, seq_len + 1, document_mask)
  padding = (dict((k, v.copy()) for k, v in empty.items()) for _ in itertools.count())
  return itertools.islice(itertools.chain(batches, padding), num_batches)


def _packer_positions(state: dict[str, Any]) -> tuple[list[tuple[int, int, bool]], int]:
  """[(first unused position, positions used, clean)] per packer in a train-iterator state, and
  the worker count. Positions count the packer's own document stream: with W workers, worker w
  packs positions w, w+W, ... of this process's (shuffled, repeated) stream.

  concat: the parent state is from before a partly used document, so `next_index` is both; clean
  = no document partly used. bestfit: the buffered documents are read but unused; clean = none
  buffered.
  """
  packers = state["iterators_in_use_states"] if "iterators_in_use_states" in state else [state]
  out = []
  for p in packers:
    if "buffer" in p:
      read, buffered = int(p["next_index"]), [int(i) for i in p["buffer"]]
      out.append((min(buffered, default=read), read - len(buffered), not buffered))
    else:
      k = int(p["parent"]["next_index"])
      out.append((k, k, not int(p["offset"])))
  return out, len(packers)


def _start_at(packer: dict[str, Any], position: int) -> None:
  """Sets a packer's state (either packing's) to a fresh start at `position` of its stream."""
  if "buffer" in packer:
    packer["next_index"], packer["buffer"] = position, []
  else:
    packer["parent"]["next_index"], packer["offset"] = position, 0


def worker_count(state: dict[str, Any]) -> int:
  """Worker processes behind a train-iterator state (0: in-process); states only restore into
  an iterator with the same count."""
  return len(state["iterators_in_use_states"]) if "iterators_in_use_states" in state else 0


def map_train_state(saved: list[dict[str, Any]], num_docs: int, process_index: int, process_count: int,
                    template: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
  """Maps train-iterator states saved by len(saved) processes onto process `process_index` of
  `process_count`, which see other document slices; returns (state, one-line note).

  Positions map exactly only at an epoch boundary. Elsewhere every process restarts at the
  beginning of the earliest epoch any old process had not finished, so documents of the
  interrupted epoch are seen again (never skipped), and the note says so. `template` is the new
  iterator's own `get_state()`, needed when it runs worker processes (the state then has one
  entry per worker); without it the state is for an in-process iterator.
  """
  old_count = len(saved)
  epochs, exact, seen = [], True, 0
  for i, state in enumerate(saved):
    size = len(range(i, num_docs, old_count))
    packers, workers = _packer_positions(state)
    unused = min(w + workers * k for w, (k, _, _) in enumerate(packers))   # the stream before this is used
    epochs.append(unused // size)
    seen += sum(used for _, used, _ in packers)
  epoch = min(epochs)
  for i, state in enumerate(saved):
    start = epoch * len(range(i, num_docs, old_count))
    packers, workers = _packer_positions(state)
    exact &= all(k == -(-(start - w) // workers) and clean for w, (k, _, clean) in enumerate(packers))
    seen -= start
  position = epoch * len(range(process_index, num_docs, process_count))
  if template is not None:
    new = json.loads(json.dumps(template))
  else:
    bestfit_rows = "buffer" in (saved[0]["iterators_in_use_states"][0] if "iterators_in_use_states" in saved[0]
                                else saved[0])
    new = {"next_index": 0, "buffer": []} if bestfit_rows else {"parent": {"next_index": 0}, "offset": 0}
  packers = new["iterators_in_use_states"] if "iterators_in_use_states" in new else [new]
  for w, packer in enumerate(packers):
    _start_at(packer, -(-(position - w) // len(packers)))
  if exact:
    return new, f"data position mapped exactly: epoch {epoch} starts on every process"
  return new, (f"warning: data position mapped to the start of epoch {epoch}; {seen} documents of the "
               "interrupted epoch will be seen again")
