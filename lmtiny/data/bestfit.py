"""BOS-aligned best-fit rows (`data.packing="bestfit"`): nanochat's way of filling rows (its
`nanochat/dataloader.py` at 92d63d4), as a grain dataset with an exactly resumable state.

Every document becomes [BOS] + its tokens. A buffer holds the documents read so far and not yet
used, in the order they were read; before every choice it is topped up, `refill` documents at a
time (nanochat reads its tokenizer batches of 128), until it holds at least `buffer_size`
(nanochat: 1000). A row of seq_len + 1 tokens is filled from its first token on:
- the longest buffered document that fits in the space left is placed whole (the first in buffer
  order among equally long ones);
- when none fits, the shortest buffered document (again the first of equals) fills the rest of the
  row exactly and its tail is dropped: those tokens are cropped, never trained on.
So every row starts with a BOS and has no padding. Rows do not depend on the batch size: the
buffer carries over from one row and one batch to the next.

A finite stream (evaluation) stops topping up when it runs out; the buffer is then emptied by the
same rule, and the row it runs out in is padded (segment 0).

The documents come from a grain MapDataset (the process's shuffled, repeated slice), read by their
index in that stream. The state is that index and the indices of the buffered documents, so a
restore re-reads the buffer (at most buffer_size + refill - 1 documents) and continues exactly.
"""
from __future__ import annotations

from typing import Any

import grain
import numpy as np

NANOCHAT_BUFFER = 1000  # documents the choice searches (nanochat's buffer_size)
NANOCHAT_REFILL = 128   # documents added per top-up (nanochat's tokenizer_batch_size)


def choose(lengths: np.ndarray, space: int) -> tuple[int, bool]:
  """(buffer index, whole) of the next document for `space` tokens: the longest that fits, else
  the shortest, cropped. Ties go to the first in buffer order. `lengths` > 0 (each has its BOS)."""
  fitting = np.where(lengths <= space, lengths, 0)
  best = int(np.argmax(fitting))
  if fitting[best] > 0:
    return best, True
  return int(np.argmin(lengths)), False


class BestFitRowsDataset(grain.IterDataset):
  """Batches of best-fit rows over a MapDataset of token documents: dicts of [batch_size, seq_len + 1]
  int32 `tokens`, `segments` (1..k per document of a row, 0 on padding) and `positions` (from 0 at
  each document's BOS)."""

  def __init__(self, parent: grain.MapDataset, *, seq_len: int, batch_size: int, bos_id: int,
               buffer_size: int = NANOCHAT_BUFFER, refill: int = NANOCHAT_REFILL):
    super().__init__(parent)
    if buffer_size < 1 or refill < 1:
      raise ValueError(f"buffer_size={buffer_size} and refill={refill} must be >= 1")
    self._options = dict(row_len=seq_len + 1, batch_size=batch_size, bos_id=bos_id, buffer_size=buffer_size,
                         refill=refill)

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """A grain worker process's share: every n-th document of the stream (as grain slices its own
    reads), so worker w packs stream positions w, w + n, ..."""
    if sequential_slice:
      raise ValueError("best-fit rows take an interleaved worker slice, not a sequential one")
    self._parents = (self._parent.slice(sl),)

  def __iter__(self) -> grain.DatasetIterator:
    return _BestFitIterator(self._parent, **self._options)

  def __str__(self) -> str:
    return f"BestFitRowsDataset({self._options})"


class _BestFitIterator(grain.DatasetIterator):
  """State: {"next_index": the stream index of the next document to read, "buffer": the stream
  indices of the buffered documents, in buffer order}."""

  def __init__(self, docs: grain.MapDataset, *, row_len: int, batch_size: int, bos_id: int, buffer_size: int,
               refill: int):
    super().__init__()  # the parent is a MapDataset, read by index, not an iterator
    self._docs, self._length = docs, len(docs)
    self._row_len, self._batch_size, self._bos = row_len, batch_size, np.array([bos_id], np.int32)
    self._buffer_size, self._refill = buffer_size, refill
    self._next = 0
    self._ids: list[int] = []
    self._tokens: list[np.ndarray] = []
    self._lengths = np.zeros(0, np.int64)

  def _read(self, index: int) -> np.ndarray:
    return np.concatenate([self._bos, np.asarray(self._docs[index])], dtype=np.int32)

  def _top_up(self) -> None:
    while len(self._ids) < self._buffer_size and self._next < self._length:
      stop = min(self._next + self._refill, self._length)
      new = [self._read(i) for i in range(self._next, stop)]
      self._ids.extend(range(self._next, stop))
      self._tokens.extend(new)
      self._lengths = np.append(self._lengths, [t.size for t in new])
      self._next = stop

  def _take(self, i: int) -> np.ndarray:
    del self._ids[i]
    self._lengths = np.delete(self._lengths, i)
    return self._tokens.pop(i)

  def _fill_row(self, tok: np.ndarray, seg: np.ndarray, pos: np.ndarray) -> int:
    """Fills one row (views of length row_len) in place; returns the tokens placed (row_len unless
    a finite stream ran out)."""
    col = docs = 0
    while col < self._row_len:
      self._top_up()
      if not self._ids:
        break
      space = self._row_len - col
      i, whole = choose(self._lengths, space)
      doc = self._take(i)
      n = doc.size if whole else space
      docs += 1
      tok[col:col + n], seg[col:col + n], pos[col:col + n] = doc[:n], docs, np.arange(n)
      col += n
    return col

  def __next__(self) -> dict[str, np.ndarray]:
    shape = (self._batch_size, self._row_len)
    tok, seg, pos = np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    for row in range(self._batch_size):
      if self._fill_row(tok[row], seg[row], pos[row]) < self._row_len:
        if row == 0 and not seg[0, 0]:
          raise StopIteration
        break  # the stream ran out: the rest of the batch is padding
    return {"tokens": tok, "segments": seg, "positions": pos}

  def get_state(self) -> dict[str, Any]:
    return {"next_index": self._next, "buffer": list(self._ids)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._next = int(state["next_index"])
    self._ids = [int(i) for i in state["buffer"]]
    self._tokens = [self._read(i) for i in self._ids]
    self._lengths = np.array([t.size for t in self._tokens], np.int64)
