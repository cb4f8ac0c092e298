"""One epoch of a conversation mixture, ended and scheduled as nanochat's SFT ends and schedules it
(its scripts/chat_sft.py at 92d63d4, `--num-iterations=-1`; config.sft.steps=0).

nanochat counts the conversations its best-fit rows have placed, `consumed` (rank r of W starts at r
and adds W per conversation, so the ranks together count the mixture once), and its loop fetches
each micro-batch one ahead of the one it trains on. So:
- the LR of step s follows progress = consumed / the mixture's size as counted after the first
  micro-batch of step s + 1, which was fetched before the optimizer stepped;
- step s is trained only if the count after its own first micro-batch is below the size: the batch
  that crosses it is fetched, never trained, and the run ends. Any rank's crossing ends every rank.
`OneEpoch` wraps the rows' iterator (lmtiny.chat.bestfit_pad: `placed_after_rows`) with one batch
of look-ahead, so once it has handed out step s's batch it knows both. Across processes the count
is the largest one (an all-gather of one integer per step; nanochat all-reduces its flag). Its
checkpointed state is the rows' position before the look-ahead, so a resume continues exactly.

One deviation: progress is capped at 1. nanochat's last step reads the count of the batch that
crossed the size, a hair past 1, and its warmdown formula then gives that step a slightly
negative LR (with final_lr_frac 0); here the LR ends at optim.min_lr_ratio.
"""
from __future__ import annotations

from typing import Any

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

EPOCH = "epoch"  # a run's ended_by when its data ran out (lmtiny.training.loop)


def largest_over_processes(value: int) -> int:
  """`value`'s maximum over the processes (the value itself with one)."""
  if jax.process_count() == 1:
    return value
  return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def step_bound(size: int, rows_per_step: int) -> int:
  """The most steps one epoch can take: every row places a conversation at least (a rendered
  conversation is cut to a row), and the step that reaches the size is not trained."""
  return max(1, -(-size // rows_per_step))


class OneEpoch(grain.DatasetIterator):
  """`rows`' batches (rows_per_step rows for this process, of which micro_rows form its first
  micro-batch) with the epoch's progress and end (see the module's docstring)."""

  def __init__(self, rows, size: int, micro_rows: int, process_index: int = 0, process_count: int = 1):
    super().__init__()
    if size < 1 or micro_rows < 1:
      raise ValueError(f"one epoch needs conversations and rows: size {size}, micro-batch rows {micro_rows}")
    self._rows, self._size, self._micro_rows = rows, size, micro_rows
    self._start, self._stride = process_index, process_count
    self._fetch()

  def _fetch(self) -> None:
    """The next batch, the rows' state before it, and nanochat's count after its first micro-batch."""
    self._state_before = self._rows.get_state()
    self._batch = next(self._rows)
    placed = self._rows.placed_after_rows[self._micro_rows - 1]
    self._consumed = largest_over_processes(self._start + placed * self._stride)

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self._batch
    self._fetch()
    return batch

  def progress(self) -> float:
    """The epoch's progress for the LR of the step just handed out, in [0, 1]."""
    return min(self._consumed / self._size, 1.0)

  def exhausted(self) -> bool:
    """Whether the next batch would not be trained: the epoch ends before it."""
    return self._consumed >= self._size

  def get_state(self) -> dict[str, Any]:
    return self._state_before

  def set_state(self, state: dict[str, Any]) -> None:
    self._rows.set_state(state)
    self._fetch()
