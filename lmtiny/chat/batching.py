"""Continuous batching: one KV cache of `max_batch` slots, requests joining and leaving as they come.

The engine preallocates the cache for `max_batch` rows of the model's whole context and runs one
generation thread. Each decode call (lmtiny.model.sampling's compiled loop) advances every busy
slot by up to `chunk` tokens; between calls the thread hands the new tokens to their jobs, frees
the slots of jobs that are done (a stop token, their max_tokens, the context's end) or cancelled,
and prefills waiting jobs into the free slots, so a job joins the running batch at the next
decode call, whatever its settings. A prompt is prefilled in pieces of PREFILL_PIECE tokens (the
last one padded), so one program serves every prompt length, and a decode call runs only the
leading slots that hold jobs (`row_buckets`: 1, 4, 16, ... or all), so a lone job costs what a
batch of one does. Every job's temperature, top-k, top-p and random stream are per-slot runtime
arrays of the same programs: after `warmup` (the decode calls, the prefill piece and the scoring
piece) nothing compiles again. A slot's random key is fold_in(key(seed), stream), as row
`stream` of Sampler.generate with that seed, so a job's tokens do not depend on what else is in
the batch.

A job's events go to its `events` queue as (job, event) pairs (so that the jobs of one request,
its n choices or prompts, can share a queue): `Tokens` (ids, and their log-probabilities with
the most likely alternatives), then one `Finished` ("stop": a stop token, which is not passed on;
"length") or `Failed`. `score` gives a prompt's own tokens' log-probabilities (an API's echo).
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmtiny.model.kv_cache import extend, init_cache, KVCache
from lmtiny.model.sampling import (decode_chunk, decode_chunk_jit, DecodeState, host_array, MAX_STOP_IDS, SamplingArrays,
                                   SamplingError, SamplingParams, sample_next, token_logprobs, TokenLogprobs)
from lmtiny.parallel import xla_options

# Alternatives reported per token (OpenAI's completions API allows up to 5).
TOP_LOGPROBS = 5


class EngineBusy(RuntimeError):
  """max_queue jobs are waiting already."""


@dataclasses.dataclass
class Job:
  """One sequence to generate: a prompt (token ids), its limits and sampling settings."""
  ids: list[int]
  max_tokens: int
  sampling: SamplingParams
  seed: int = 0
  stream: int = 0   # the random stream within the seed (choice i of a request with n choices: i)
  events: queue.Queue = dataclasses.field(default_factory=queue.Queue)   # of (job, event) pairs
  index: int = 0    # the caller's name for it (its choice in a request)
  cancelled: bool = False   # set by the client's thread: the slot is freed at the next decode call
  submitted: float = dataclasses.field(default_factory=time.perf_counter)


class Tokens(NamedTuple):
  ids: list[int]
  logprobs: list[float]                        # each token's log-probability under the model
  top: list[list[tuple[int, float]]]           # the TOP_LOGPROBS most likely tokens at each step


class Finished(NamedTuple):
  reason: str   # "stop" | "length"


class Failed(NamedTuple):
  message: str


def _prefill_piece(graphdef, params, state: DecodeState, slot, tokens_1xP, start, length, end, seed, stream,
                   sampling: SamplingArrays) -> DecodeState:
  """Runs the prompt's tokens at positions start..start + P - 1 (right-padded past its end) into
  row `slot` of the cache; the piece that holds the prompt's last token also samples the first
  new token there and opens the slot (done False). The other rows are untouched."""
  model = nnx.merge(graphdef, params)
  p = tokens_1xP.shape[1]

  def row(full):
    return jax.lax.dynamic_slice_in_dim(full, slot, 1, axis=1)

  def put(full, part):
    return jax.lax.dynamic_update_slice_in_dim(full, part, slot, axis=1)

  # The token before the piece (model.smear mixes it in): none before the prompt's first.
  before_1 = jnp.where(start == 0, 0, state.cache.last_token[slot])[None]
  cache = KVCache(row(state.cache.k), row(state.cache.v), before_1)
  last = jnp.clip(length - 1 - start, 0, p - 1)
  logits_1xV, cache = extend(model, tokens_1xP, start[None], cache, last_B=last[None])
  key = jax.random.fold_in(jax.random.key(seed), stream)
  first_1 = sample_next(logits_1xV, key[None], length[None], sampling)
  logprobs = jax.tree.map(lambda full, part: full.at[slot].set(part[0]), state.logprobs,
                          token_logprobs(logits_1xV, first_1, TOP_LOGPROBS))
  new_cache = KVCache(put(state.cache.k, cache.k), put(state.cache.v, cache.v),
                      state.cache.last_token.at[slot].set(cache.last_token[0]))
  # Until the last piece the slot stays closed (done), so what the earlier pieces set is unused.
  opened = length <= start + p
  return DecodeState(new_cache, state.next_B.at[slot].set(first_1[0]), state.pos_B.at[slot].set(length),
                     state.end_B.at[slot].set(end), state.done_B.at[slot].set(~opened),
                     state.keys_B.at[slot].set(key), logprobs)


def _score_piece(graphdef, params, cache: KVCache, tokens_1xP, targets_1xP, start):
  """log p(target | the tokens up to it) for each of P tokens at positions start..; the cache
  (one row) carries the pieces before."""
  model = nnx.merge(graphdef, params)
  logits_1xPxV, cache = extend(model, tokens_1xP, start[None], cache)
  return cache, token_logprobs(logits_1xPxV[0], targets_1xP[0], TOP_LOGPROBS)


def _rows(state: DecodeState, rows: int) -> DecodeState:
  """The first `rows` slots of the state (the cache's batch axis is its second)."""
  cache = KVCache(state.cache.k[:, :rows], state.cache.v[:, :rows], state.cache.last_token[:rows])
  return jax.tree.map(lambda x: x[:rows], state._replace(cache=None))._replace(cache=cache)


def _with_rows(state: DecodeState, head: DecodeState) -> DecodeState:
  """The state with its first slots replaced by `head`'s."""
  rows = head.next_B.shape[0]
  cache = KVCache(state.cache.k.at[:, :rows].set(head.cache.k), state.cache.v.at[:, :rows].set(head.cache.v),
                  state.cache.last_token.at[:rows].set(head.cache.last_token))
  rest = jax.tree.map(lambda full, part: full.at[:rows].set(part), state._replace(cache=None),
                      head._replace(cache=None))
  return rest._replace(cache=cache)


def _decode_rows(graphdef, params, state: DecodeState, stop_R, stop_ids_N, sampling: SamplingArrays, *,
                 chunk: int, rows: int):
  """The decode loop on the first `rows` slots only (the others are free): a batch with few
  busy slots costs what a small batch does."""
  head, out, done, logprobs = decode_chunk(graphdef, params, _rows(state, rows), stop_R, stop_ids_N, sampling,
                                           chunk=chunk)
  return _with_rows(state, head), out, done, logprobs


_decode_rows_jit = xla_options.jit(_decode_rows, static_argnums=0, static_argnames=("chunk", "rows"),
                                   donate_argnames=("state",))
_prefill_piece_jit = xla_options.jit(_prefill_piece, static_argnums=0, donate_argnames=("state",))
_score_piece_jit = xla_options.jit(_score_piece, static_argnums=0, donate_argnames=("cache",))


def _pieces(n: int, piece: int, context: int) -> list[int]:
  """Where the pieces of n tokens start: every `piece` tokens, the last moved back so that it
  ends within the context (it then runs some tokens again, which writes the same keys/values)."""
  return [min(s, context - piece) for s in range(0, n, piece)]


def _empty_state(cfg, batch: int, cache_len: int) -> DecodeState:
  """Every slot free. Built by one jitted call, so that no two leaves share a buffer (the decode
  and prefill programs donate the state)."""
  def build():
    zeros_B = jnp.zeros((batch,), jnp.int32)
    logprobs = TokenLogprobs(jnp.zeros((batch,), jnp.float32), jnp.zeros((batch, TOP_LOGPROBS), jnp.int32),
                             jnp.zeros((batch, TOP_LOGPROBS), jnp.float32))
    keys_B = jax.vmap(jax.random.key)(zeros_B)
    return DecodeState(init_cache(cfg, batch, cache_len), zeros_B, zeros_B, zeros_B, jnp.ones((batch,), bool),
                       keys_B, logprobs)
  return jax.jit(build)()


IDLE = SamplingParams(0.0, 0, 1.0)  # a free slot's settings: greedy (the cheapest path)
# Prompt tokens per prefill call: one program for every prompt length (a long prompt takes
# several calls, a short one is padded).
PREFILL_PIECE = 128


class BatchEngine:
  """Owns a Sampler's weights and the slots; `submit` queues jobs, a thread generates."""

  def __init__(self, sampler, *, max_batch: int = 8, max_queue: int = 64, stop_ids: Sequence[int] = (),
               prefill_piece: int = PREFILL_PIECE, warmup: bool = True):
    if len(set(stop_ids)) > MAX_STOP_IDS:
      raise SamplingError(f"stop_ids: {len(set(stop_ids))} ids, at most {MAX_STOP_IDS} are supported")
    self.sampler, self.cfg = sampler, sampler.cfg
    self.context = self.cfg.max_seq_len
    self.piece = min(prefill_piece, self.context)
    self.max_batch, self.max_queue, self.chunk = max_batch, max_queue, sampler.chunk
    self.stop_set = {int(s) for s in stop_ids}
    self._stop_ids_N = np.full((MAX_STOP_IDS,), -1, np.int32)
    self._stop_ids_N[:len(self.stop_set)] = sorted(self.stop_set)
    self.graphdef, self.params = sampler.graphdef, sampler.compute_params()
    self._slots: list[Job | None] = [None] * max_batch
    self._knobs = [np.zeros((max_batch,), np.float32), np.zeros((max_batch,), np.int32),
                   np.ones((max_batch,), np.float32)]
    self._state = _empty_state(self.cfg, max_batch, self.context)
    self._score_cache = jax.jit(lambda: init_cache(self.cfg, 1, self.context))
    self._queue: queue.Queue = queue.Queue()
    self._waiting = 0
    self._lock = threading.Lock()
    # Counters (read by tests and benchmarks): decode calls, the tokens they emitted, prefills.
    self.decode_calls = self.decode_tokens = self.prefills = 0
    self.compile_seconds = self.warmup() if warmup else 0.0
    self._thread = threading.Thread(target=self._work, daemon=True, name="lmtiny-batching")
    self._thread.start()

  # -- programs ---------------------------------------------------------------------------------

  def warmup(self) -> float:
    """Compiles every program a request can need (before the thread starts); returns seconds."""
    t0 = time.perf_counter()
    self._prefill(0, Job([0], 1, IDLE))
    self._slots[0] = None
    self.score([0, 0])
    for rows in self.row_buckets():
      self._decode(np.ones((rows,), bool))
    return time.perf_counter() - t0

  def row_buckets(self) -> list[int]:
    """How many leading slots a decode call runs: powers of four below max_batch, and max_batch
    (a job takes the lowest free slot, so busy slots gather at the front). Each is a program
    compiled at start-up (powers of two took the tiny config's start from 12 s to 51 s here)."""
    return sorted({min(4 ** i, self.max_batch) for i in range(self.max_batch.bit_length())})

  def _prefill(self, slot: int, job: Job) -> None:
    n = len(job.ids)
    end = min(n + job.max_tokens, self.context)
    knobs = job.sampling.arrays()
    for start in _pieces(n, self.piece, self.context):
      tokens = np.zeros((1, self.piece), np.int32)
      part = job.ids[start:start + self.piece]
      tokens[0, :len(part)] = part
      self._state = _prefill_piece_jit(self.graphdef, self.params, self._state, np.int32(slot), tokens,
                                       np.int32(start), np.int32(n), np.int32(end), np.int32(job.seed),
                                       np.int32(job.stream), knobs)
    for array, value in zip(self._knobs, knobs):
      array[slot] = value
    self._slots[slot] = job
    self.prefills += 1

  def _decode(self, stop_R: np.ndarray):
    """A decode call on the first len(stop_R) slots (one of row_buckets())."""
    rows = len(stop_R)
    knobs = SamplingArrays(*(a[:rows].copy() for a in self._knobs))  # the host may change them during the call
    if rows == self.max_batch:
      self._state, out, done, logprobs = decode_chunk_jit(self.graphdef, self.params, self._state, stop_R,
                                                           self._stop_ids_N, knobs, chunk=self.chunk)
    else:
      self._state, out, done, logprobs = _decode_rows_jit(self.graphdef, self.params, self._state, stop_R,
                                                          self._stop_ids_N, knobs, chunk=self.chunk, rows=rows)
    return host_array(out), host_array(done), jax.tree.map(host_array, logprobs)

  def score(self, ids: Sequence[int]) -> TokenLogprobs:
    """TokenLogprobs of ids[1:], each given the ids before it ([n - 1] and [n - 1, TOP_LOGPROBS]),
    as numpy arrays; at most `context` ids. Thread-safe; runs beside the generation thread."""
    n = len(ids)
    targets = list(ids[1:]) + [0]
    cache, parts = self._score_cache(), []
    for start in _pieces(n, self.piece, self.context):
      tokens, wanted = np.zeros((2, 1, self.piece), np.int32)
      tokens[0, :len(ids[start:start + self.piece])] = ids[start:start + self.piece]
      wanted[0, :len(targets[start:start + self.piece])] = targets[start:start + self.piece]
      cache, scored = _score_piece_jit(self.graphdef, self.params, cache, tokens, wanted, np.int32(start))
      parts.append((start, jax.tree.map(host_array, scored)))
    out = TokenLogprobs(np.zeros((n,), np.float32), np.zeros((n, TOP_LOGPROBS), np.int32),
                        np.zeros((n, TOP_LOGPROBS), np.float32))
    for start, scored in parts:  # in order: a moved-back last piece overwrites with the same values
      for full, part in zip(out, scored):
        full[start:start + self.piece] = part[:n - start]
    return TokenLogprobs(*(x[:n - 1] for x in out))

  # -- jobs -------------------------------------------------------------------------------------

  def check(self, job: Job) -> None:
    """SamplingError for a job that cannot run (an empty prompt, or one the context cannot hold)."""
    self.sampler.check_prompt(job.ids)
    if job.max_tokens < 1:
      raise SamplingError(f"max_tokens={job.max_tokens}: must be >= 1")

  def submit(self, jobs: Sequence[Job]) -> None:
    """Queues the jobs together, or raises EngineBusy when they would make more than max_queue wait."""
    for job in jobs:
      self.check(job)
    with self._lock:
      if self._waiting + len(jobs) > self.max_queue:
        raise EngineBusy(f"busy: {self._waiting} requests are waiting; retry in a moment")
      self._waiting += len(jobs)
    for job in jobs:
      self._queue.put(job)

  def waiting(self) -> int:
    return self._waiting

  def _admit(self) -> None:
    """Prefills waiting jobs into free slots; blocks for one when no slot is busy."""
    while None in self._slots:
      idle = all(j is None for j in self._slots)
      try:
        job = self._queue.get() if idle else self._queue.get_nowait()
      except queue.Empty:
        return
      with self._lock:
        self._waiting -= 1
      if not job.cancelled:
        self._prefill(self._slots.index(None), job)

  def _free(self, slot: int) -> None:
    self._slots[slot] = None
    for array, value in zip(self._knobs, IDLE.arrays()):
      array[slot] = value

  def _work(self):
    while True:
      try:
        self._admit()
        self._step()
      except Exception as e:  # keep serving: the jobs in the batch get the error, the cache starts over
        for slot, job in enumerate(self._slots):
          if job is not None:
            job.events.put((job, Failed(f"generation failed: {type(e).__name__}: {e}")))
            self._free(slot)
        self._state = _empty_state(self.cfg, self.max_batch, self.context)

  def _step(self) -> None:
    busy = [slot for slot, job in enumerate(self._slots) if job is not None]
    if not busy:
      return
    last = max(busy)
    rows = next(r for r in self.row_buckets() if r > last)
    out, done, logprobs = self._decode(np.array([job is None or job.cancelled for job in self._slots[:rows]]))
    self.decode_calls += 1
    for slot, job in enumerate(self._slots[:rows]):
      if job is None:
        continue
      if job.cancelled:
        self._free(slot)
        continue
      steps = int(np.sum(out[slot] >= 0))
      self.decode_tokens += steps
      ids = [int(t) for t in out[slot, :steps]]
      reason = None
      if done[slot]:
        reason = "stop" if ids and ids[-1] in self.stop_set else "length"
        ids = ids[:-1] if reason == "stop" else ids
      if ids:
        top = [list(zip(map(int, i), map(float, p)))
               for i, p in zip(logprobs.top_ids[slot, :len(ids)], logprobs.top_logprobs[slot, :len(ids)])]
        job.events.put((job, Tokens(ids, [float(x) for x in logprobs.logprob[slot, :len(ids)]], top)))
      if reason is not None:
        job.events.put((job, Finished(reason)))
        self._free(slot)
