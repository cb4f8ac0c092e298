"""nanochat's SFT rows (its scripts/chat_sft.py at 92d63d4, `sft_data_generator_bos_bestfit`):
BOS-aligned best-fit over a buffer of rendered conversations, padded instead of cropped.

The stream is a sequence of conversations read from position `process_index` in steps of
`process_count`, wrapping around at its end (nanochat's cursor over its ranks). A buffer holds
`buffer_size` (nanochat: 100) rendered conversations, topped up before every choice. A row of
seq_len + 1 tokens is filled from its start: the longest buffered conversation that fits in the
space left goes in whole (the first in buffer order among equally long ones); when none fits, the
rest of the row is padding (BOS tokens, mask 0, segment 0) and the row is done. No token of a
conversation is ever cropped by a row (a conversation longer than a row was cut when rendered).

Batches have the pipeline's keys (lmtiny.data.pipeline): each conversation its own segment with
positions from 0, or with document_mask=False one causal sequence per row (nanochat's attention);
loss_mask is the render's mask of each target (0 on padding and on the next conversation's BOS).
The state (the stream position and the buffered positions) restores exactly.

`placed_after_rows` counts what nanochat's SFT loop counts to end an epoch: the conversations this
process has placed in rows so far (its reads minus those still buffered), after each row of the
last batch (lmtiny.training.epoch).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import grain
import numpy as np

from lmtiny.data.bestfit import choose
from lmtiny.data.pipeline import _layout

NANOCHAT_BUFFER = 100  # conversations the best-fit choice searches (nanochat's SFT buffer_size)


def pack_rows(rows: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], row_len: int, bos_id: int,
              document_mask: bool) -> dict[str, np.ndarray]:
  """A batch from rows of (ids, mask) conversations placed from each row's start, BOS-padded."""
  shape = (len(rows), row_len)
  tok, msk = np.full(shape, bos_id, np.int32), np.zeros(shape, np.int32)
  seg, pos = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  for r, row in enumerate(rows):
    col = 0
    for k, (ids, mask) in enumerate(row, 1):
      n = len(ids)
      tok[r, col:col + n], msk[r, col:col + n], seg[r, col:col + n], pos[r, col:col + n] = ids, mask, k, np.arange(n)
      col += n
  batch = _layout(tok, seg, pos, document_mask)
  batch["loss_mask"] = batch["loss_mask"] * msk[:, 1:]
  return batch


class BestFitPadDataset(grain.IterDataset):
  """Endless batches of nanochat's SFT rows over `stream` (a sequence of conversations), rendered
  by `render(conversation) -> (ids, mask)`."""

  def __init__(self, stream: Sequence, render: Callable, *, seq_len: int, batch_size: int, bos_id: int,
               document_mask: bool = True, buffer_size: int = NANOCHAT_BUFFER, process_index: int = 0,
               process_count: int = 1):
    super().__init__()
    if not len(stream):
      raise ValueError("best-fit rows need at least one conversation")
    self._args = (stream, render)
    self._options = dict(row_len=seq_len + 1, batch_size=batch_size, bos_id=bos_id, document_mask=document_mask,
                         buffer_size=buffer_size, start=process_index, step=process_count)

  def __iter__(self) -> grain.DatasetIterator:
    return _BestFitPadIterator(*self._args, **self._options)


class _BestFitPadIterator(grain.DatasetIterator):
  """State: {"next_index": conversations read so far by this process, "buffer": the reads
  (0, 1, ...) still buffered, in buffer order}; read j is stream position (start + j * step) % len."""

  def __init__(self, stream, render, *, row_len, batch_size, bos_id, document_mask, buffer_size, start, step):
    super().__init__()
    self._stream, self._render = stream, render
    self._row_len, self._batch_size, self._bos, self._document_mask = row_len, batch_size, bos_id, document_mask
    self._buffer_size, self._start, self._step = buffer_size, start, step
    self._next, self._reads, self._items, self._lengths = 0, [], [], []
    self.placed_after_rows: tuple[int, ...] = ()

  def _read(self, j: int) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = self._render(self._stream[(self._start + j * self._step) % len(self._stream)])
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)

  def _top_up(self) -> None:
    while len(self._reads) < self._buffer_size:
      item = self._read(self._next)
      self._reads.append(self._next)
      self._items.append(item)
      self._lengths.append(len(item[0]))
      self._next += 1

  def _row(self) -> list[tuple[np.ndarray, np.ndarray]]:
    row, space = [], self._row_len
    while space > 0:
      self._top_up()
      i, whole = choose(np.asarray(self._lengths), space)  # pretraining's best fit (lmtiny.data.bestfit)
      if not whole:
        break  # nothing fits: the rest is padding, where pretraining would crop
      del self._reads[i], self._lengths[i]
      item = self._items.pop(i)
      row.append(item)
      space -= len(item[0])
    return row

  def __next__(self) -> dict[str, np.ndarray]:
    rows, placed = [], []
    for _ in range(self._batch_size):
      rows.append(self._row())
      placed.append(self._next - len(self._reads))
    self.placed_after_rows = tuple(placed)
    return pack_rows(rows, self._row_len, self._bos, self._document_mask)

  def get_state(self) -> dict[str, Any]:
    return {"next_index": self._next, "buffer": list(self._reads)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._next = int(state["next_index"])
    self._reads = [int(j) for j in state["buffer"]]
    self._items = [self._read(j) for j in self._reads]
    self._lengths = [len(ids) for ids, _ in self._items]
