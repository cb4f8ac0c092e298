"""Sampling with a KV cache: prefill the prompts once, then one compiled loop decodes token by token.

Layout: lmtiny.model.kv_cache (right-padded rows, each with its own length and positions, so each
row computes exactly what it would alone).

Shapes are bucketed so few programs compile: the prompt block is padded to a power of two
(at least 16) and the cache length is the power of two that holds the longest prompt plus
max_new_tokens, capped at the model's context (model.max_seq_len).

Decoding runs `chunk` steps per call inside one `lax.while_loop` (one compiled program for a
given batch and cache length); between chunks the host streams the new tokens and may stop rows
(stop strings). Sampling: logits / temperature, then top-k, then top-p on what is left
(temperature 0 is greedy argmax). Temperature, top-k and top-p are runtime values (arrays, a
scalar for every row or one value per row), not compile-time constants: one compiled program
serves every setting (a chat server would otherwise compile again for each new value; the
continuous-batching engine, lmtiny.chat.batching, mixes settings in one batch). The filter
branch is picked at run time (`lax.switch`): no filter, top-k within the TOP_K_CAPS largest (a
cheap partial sort, then a mask by rank), or a full sort of the vocabulary. The random key of a
row is fold_in(key(seed), row id) and each token folds in its position, so a row's text does not
depend on what else is in the batch. The decode loop can also return each emitted token's
log-probability and the most likely alternatives (DecodeState.logprobs), as an OpenAI-style API
reports them.

"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmtiny.errors import UserError
from lmtiny.model.kv_cache import extend, init_cache, KVCache
from lmtiny.model.transformer import cast_params, compute_dtype
from lmtiny.parallel import xla_options
from lmtiny.parallel.sharding import constrain

Array = jax.Array
MIN_BUCKET = 16
MAX_STOP_IDS = 8
# top_k (and top_p under it) sorts only this many largest logits when top_k is at most one of
# them; a larger top_k, or top_p without top_k, sorts the whole vocabulary. A partial sort of 64
# costs ~0.1 ms on a 64K vocabulary (CPU) where a full sort costs ~13 ms per row.
TOP_K_CAPS = (64, 1024)


class SamplingError(UserError):
  """A user-fixable sampling request (bad filter value, empty or too-long prompt)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 = greedy; top_k 0 = off; top_p 1 = off. Passed to the compiled programs as
  arrays (`arrays()`), so a new value does not recompile."""
  temperature: float = 0.8
  top_k: int = 50
  top_p: float = 0.95

  def __post_init__(self):
    if not 0 <= self.temperature < float("inf"):
      raise SamplingError(f"temperature={self.temperature}: must be a finite number >= 0")
    if int(self.top_k) != self.top_k or self.top_k < 0:
      raise SamplingError(f"top_k={self.top_k}: must be an integer >= 0 (0 = off)")
    if not 0 < self.top_p <= 1:
      raise SamplingError(f"top_p={self.top_p}: must be in (0, 1]")

  def arrays(self) -> SamplingArrays:
    return SamplingArrays(np.float32(self.temperature), np.int32(min(self.top_k, 2**31 - 1)),
                          np.float32(self.top_p))


class SamplingArrays(NamedTuple):
  """SamplingParams as scalar arrays: what the compiled programs take (traced, not static)."""
  temperature: Array
  top_k: Array
  top_p: Array


class TokenLogprobs(NamedTuple):
  """Log-probabilities of tokens under the model: [B] (and [B, N]) per step, or [B, C] (and
  [B, C, N]) for a chunk of steps."""
  logprob: Array   # the token's
  top_ids: Array   # int32: the N most likely tokens, most likely first
  top_logprobs: Array


class DecodeState(NamedTuple):
  """Everything the decode loop carries; `next_B` is sampled but not yet emitted or fed."""
  cache: KVCache
  next_B: Array   # int32 token to emit next
  pos_B: Array    # its position (where it is written into the cache when fed)
  end_B: Array    # a row stops after emitting the token at position end_B - 1
  done_B: Array   # bool
  keys_B: Array   # typed PRNG keys, one per row
  # next_B's log-probabilities, when the caller wants them (the decode loop then returns them for
  # every emitted token); None costs nothing.
  logprobs: TokenLogprobs | None = None


# ---------------------------------------------------------------------------------------------
# Filters and the sampler.


def _filter_sorted(logits_BxV: Array, k: Array, top_p: Array, cap: int) -> Array:
  """The filter from the `cap` largest logits (sorted, ties broken by index): keeps ranks < k, then
  among those the smallest prefix whose (renormalised) mass is >= top_p (when top_p < 1)."""
  b, v = logits_BxV.shape
  vals_BxC, idx_BxC = jax.lax.top_k(logits_BxV, cap)
  vals_BxC = jnp.where(jnp.arange(cap) < k, vals_BxC, -jnp.inf)
  probs_BxC = jax.nn.softmax(vals_BxC.astype(jnp.float32), axis=-1)
  mass_before_BxC = jnp.cumsum(probs_BxC, axis=-1) - probs_BxC
  vals_BxC = jnp.where((mass_before_BxC < top_p) | (top_p >= 1), vals_BxC, -jnp.inf)
  return jnp.full_like(logits_BxV, -jnp.inf).at[jnp.arange(b)[:, None], idx_BxC].set(vals_BxC)


def filter_logits(logits_BxV: Array, top_k=0, top_p=1.0) -> Array:
  """-inf everywhere but the top_k largest logits (exactly k, ties broken by index) and then,
  among those, the smallest set of highest-probability tokens whose mass is >= top_p. top_k and
  top_p may be traced, and scalars or one value per row ([B]): which sort runs is decided at run
  time, inside one program (the one that holds every row's k; a row that filters nothing is
  passed through)."""
  b, v = logits_BxV.shape
  top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (b,))
  top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (b,))
  k_B = jnp.where((top_k > 0) & (top_k < v), top_k, v)
  caps = sorted({min(c, v) for c in TOP_K_CAPS} | {v})
  branches = [lambda x, k, p: x] + [functools.partial(_filter_sorted, cap=c) for c in caps]
  # 0: nothing to filter; else 1 + the first cap that holds k (the last one, v, always does).
  index_B = jnp.where((k_B == v) & (top_p >= 1), 0,
                      1 + jnp.sum(k_B[:, None] > jnp.asarray(caps[:-1], jnp.int32)[None, :], axis=-1))
  filtered_BxV = jax.lax.switch(jnp.max(index_B), branches, logits_BxV, k_B[:, None], top_p[:, None])
  return jnp.where((index_B == 0)[:, None], logits_BxV, filtered_BxV)


def sample_next(logits_BxV: Array, keys_B: Array, positions_B: Array,
                sampling: SamplingParams | SamplingArrays) -> Array:
  """One token per row; the row's key folded with the token's position makes the draw. The
  sampling values are scalars or one per row ([B]): a row with temperature 0 is greedy."""
  if isinstance(sampling, SamplingParams):
    sampling = sampling.arrays()
  b = logits_BxV.shape[0]
  temperature_B = jnp.broadcast_to(jnp.asarray(sampling.temperature, jnp.float32), (b,))
  greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

  def draw(logits_BxV):
    scaled_BxV = logits_BxV.astype(jnp.float32) / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
    logits_BxV = filter_logits(scaled_BxV, sampling.top_k, sampling.top_p)
    keys = jax.vmap(jax.random.fold_in)(keys_B, positions_B)
    drawn_B = jax.vmap(jax.random.categorical)(keys, logits_BxV).astype(jnp.int32)
    return jnp.where(temperature_B == 0, greedy_B, drawn_B)

  return jax.lax.cond(jnp.all(temperature_B == 0), lambda x: greedy_B, draw, logits_BxV)


def token_logprobs(logits_BxV: Array, tokens_B: Array, n: int) -> TokenLogprobs:
  """Each row's token's log-probability under the model (the logits before temperature and
  filters) and the row's n most likely tokens with theirs."""
  logprobs_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
  top_BxN, ids_BxN = jax.lax.top_k(logprobs_BxV, n)
  chosen_B = jnp.take_along_axis(logprobs_BxV, tokens_B[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return TokenLogprobs(chosen_B, ids_BxN.astype(jnp.int32), top_BxN)


def _prefill(graphdef, params, tokens_BxT, lengths_B, ends_B, keys_B, sampling: SamplingArrays, *,
             cache_len: int) -> DecodeState:
  model = nnx.merge(graphdef, params)
  b = tokens_BxT.shape[0]
  cache = init_cache(model.cfg, b, cache_len)
  zeros_B = jnp.zeros((b,), jnp.int32)
  logits_BxV, cache = extend(model, tokens_BxT, zeros_B, cache, last_B=lengths_B - 1)
  first_B = sample_next(logits_BxV, keys_B, lengths_B, sampling)
  return DecodeState(cache, first_B, lengths_B, ends_B, jnp.zeros((b,), bool), keys_B)


def decode_chunk(graphdef, params, state: DecodeState, stop_B, stop_ids_N, sampling: SamplingArrays, *,
                 chunk: int):
  """Up to `chunk` steps; returns the new state, the emitted tokens [B, chunk] (-1 = none), which
  rows are done, and the emitted tokens' TokenLogprobs ([B, chunk, ...]) when the state carries
  them (else None). The sampling values are scalars or one per row."""
  model = nnx.merge(graphdef, params)
  b = state.next_B.shape[0]

  def cond(carry):
    i, st, _, _ = carry
    return (i < chunk) & ~jnp.all(st.done_B)

  def body(carry):
    i, st, out_BxC, lp_out = carry
    tok_B, active_B = st.next_B, ~st.done_B
    out_BxC = out_BxC.at[:, i].set(jnp.where(active_B, tok_B, -1))
    is_stop_B = jnp.any(tok_B[:, None] == stop_ids_N[None, :], axis=-1)
    done_B = st.done_B | is_stop_B | (st.pos_B + 1 >= st.end_B)
    logits_BxV, cache = extend(model, tok_B[:, None], st.pos_B, st.cache, last_B=jnp.zeros((b,), jnp.int32))
    pos_B = jnp.where(done_B, st.pos_B, st.pos_B + 1)
    next_B = jnp.where(done_B, tok_B, sample_next(logits_BxV, st.keys_B, pos_B, sampling))
    logprobs = st.logprobs
    if logprobs is not None:
      lp_out = jax.tree.map(lambda out, x: out.at[:, i].set(x), lp_out, logprobs)
      logprobs = token_logprobs(logits_BxV, next_B, logprobs.top_ids.shape[-1])
    return i + 1, DecodeState(cache, next_B, pos_B, st.end_B, done_B, st.keys_B, logprobs), out_BxC, lp_out

  state = state._replace(done_B=state.done_B | stop_B)
  out_BxC = jnp.full((b, chunk), -1, jnp.int32)
  lp_out = None
  if state.logprobs is not None:
    lp_out = jax.tree.map(lambda x: jnp.zeros((b, chunk) + x.shape[1:], x.dtype), state.logprobs)
  _, state, out_BxC, lp_out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out_BxC, lp_out))
  # Replicated, so that every process can read them.
  if lp_out is not None:
    lp_out = jax.tree.map(lambda x: constrain(x, (None,) * x.ndim), lp_out)
  return state, constrain(out_BxC, (None, None)), constrain(state.done_B, (None,)), lp_out


_prefill_jit = xla_options.jit(_prefill, static_argnums=0, static_argnames=("cache_len",))
_cast_params_jit = xla_options.jit(cast_params, static_argnums=1)
decode_chunk_jit = xla_options.jit(decode_chunk, static_argnums=0, static_argnames=("chunk",),
                                   donate_argnames=("state",))


def host_array(x: Array) -> np.ndarray:
  """x as a numpy array on this host."""
  if not x.is_fully_addressable:  # multi-process: the array is replicated, any local copy will do
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def _row_keys(seed: int, rows: Sequence[int]) -> Array:
  base = jax.random.key(seed)
  return jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.asarray(rows, jnp.int32))


def bucket(n: int) -> int:
  """The power of two >= n, at least MIN_BUCKET."""
  return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


@dataclasses.dataclass
class Generation:
  tokens: list[list[int]]        # new tokens per row (a stop token itself is left out)
  finish_reasons: list[str]      # "stop_token", "stopped" (by the host callback) or "length"
  prefill_tokens: int = 0        # real prompt tokens, padding not counted
  prefill_seconds: float = 0.0   # prefill and the first sampled token
  decode_tokens: int = 0         # tokens emitted after the first
  decode_seconds: float = 0.0
  compile_seconds: float = 0.0   # warm-up (only when generate(warmup=True) compiled something)


class Sampler:
  """Batched generation from an NNX Transformer (parameters as they are: one device or sharded)."""

  def __init__(self, model, *, chunk: int = 16):
    self.cfg = model.cfg
    self.graphdef, self.params = nnx.split(model)
    # No call decodes more than the context holds; a larger chunk would only size the token buffer.
    self.chunk = max(1, min(chunk, self.cfg.max_seq_len))
    self._warm = set()

  def compute_params(self):
    """Weight matrices cast to the compute dtype once per generate call (not per decoded token);
    float32 compute needs no copy."""
    dtype = compute_dtype(self.cfg)
    if dtype == jnp.float32:
      return self.params
    return _cast_params_jit(self.params, dtype)

  def check_prompt(self, ids: Sequence[int], index: int = 0) -> None:
    context = self.cfg.max_seq_len
    if not len(ids):
      raise SamplingError(f"prompt {index}: empty (no tokens)")
    if len(ids) >= context:
      raise SamplingError(f"prompt {index}: {len(ids)} tokens, but the model's context is {context} "
                          f"(model.max_seq_len), which leaves no room for a new token")

  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               sampling: SamplingParams = SamplingParams(), seed: int = 0, rows: Sequence[int] | None = None,
               stop_ids: Sequence[int] = (), on_tokens: Callable[[int, list[int]], bool] | None = None,
               on_finish: Callable[[int], None] | None = None, warmup: bool = False) -> Generation:
    """Generates up to max_new_tokens per prompt (fewer at the context's end or a stop token).

    rows: the id of each row's random stream (default 0..B-1). on_tokens(row, new_ids) is called
    as tokens arrive (streaming); returning True stops that row. on_finish(row) is called once
    when a row is done. warmup=True first compiles new shapes on dummy inputs, so the reported
    speeds exclude compilation.
    """
    if max_new_tokens < 1:
      raise SamplingError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if not prompts:
      raise SamplingError("no prompts")
    for i, ids in enumerate(prompts):
      self.check_prompt(ids, i)
    b = len(prompts)
    rows = list(range(b)) if rows is None else list(rows)
    lengths = np.array([len(p) for p in prompts], np.int32)
    cache_len = min(self.cfg.max_seq_len, bucket(int(lengths.max()) + max_new_tokens))
    prompt_len = min(cache_len, bucket(int(lengths.max())))
    tokens = np.zeros((b, prompt_len), np.int32)
    for i, ids in enumerate(prompts):
      tokens[i, :len(ids)] = ids
    ends = np.minimum(lengths + max_new_tokens, cache_len).astype(np.int32)
    knobs = sampling.arrays()
    stop_set = {int(s) for s in stop_ids}
    if len(stop_set) > MAX_STOP_IDS:
      raise SamplingError(f"stop_ids: {len(stop_set)} ids, at most {MAX_STOP_IDS} are supported")
    stop_ids_N = np.full((MAX_STOP_IDS,), -1, np.int32)
    stop_ids_N[:len(stop_set)] = sorted(stop_set)
    result = Generation([[] for _ in range(b)], ["length"] * b, prefill_tokens=int(lengths.sum()))

    params = self.compute_params()
    shape_key = (b, prompt_len, cache_len)
    if warmup and shape_key not in self._warm:
      t0 = time.perf_counter()
      ones = np.ones((b,), np.int32)
      state = _prefill_jit(self.graphdef, params, np.zeros_like(tokens), ones, ones + 1,
                           _row_keys(seed, rows), knobs, cache_len=cache_len)
      host_array(decode_chunk_jit(self.graphdef, params, state, np.ones((b,), bool), stop_ids_N, knobs,
                              chunk=self.chunk)[2])
      result.compile_seconds = time.perf_counter() - t0
    self._warm.add(shape_key)

    t0 = time.perf_counter()
    state = _prefill_jit(self.graphdef, params, tokens, lengths, ends, _row_keys(seed, rows), knobs,
                         cache_len=cache_len)
    jax.block_until_ready(state.next_B)
    result.prefill_seconds = time.perf_counter() - t0
    finished = np.zeros((b,), bool)
    emitted = 0
    t0 = time.perf_counter()
    while not finished.all():
      state, out, done, _ = decode_chunk_jit(self.graphdef, params, state, finished.copy(), stop_ids_N, knobs,
                                           chunk=self.chunk)
      out, done = host_array(out), host_array(done).copy()
      for i in np.flatnonzero(~finished):
        new = [int(t) for t in out[i] if t >= 0]
        emitted += len(new)
        if new and new[-1] in stop_set:
          new.pop()
          result.finish_reasons[i] = "stop_token"
        result.tokens[i].extend(new)
        if new and on_tokens is not None and on_tokens(i, new):
          done[i], result.finish_reasons[i] = True, "stopped"
      if on_finish is not None:
        for i in np.flatnonzero(done & ~finished):
          on_finish(i)
      finished |= done
    result.decode_seconds = time.perf_counter() - t0
    result.decode_tokens = max(0, emitted - b)
    return result


# ---------------------------------------------------------------------------------------------
# Text.


class TextStream:
  """Incremental detokenizer for streaming: returns text as it becomes final, cut before the
  first stop string, holding back a tail that could still grow into a stop string or that is an
  incomplete UTF-8 character (byte-fallback pieces decode to U+FFFD until complete)."""

  def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
    self.tokenizer = tokenizer
    self.stop_strings = [s for s in stop_strings if s]
    self.ids: list[int] = []
    self.emitted = 0
    self.stopped = False
    self.text = ""

  def add(self, ids: Sequence[int]) -> str:
    """Feeds new ids; returns the newly final text. Sets `stopped` at a stop string."""
    if self.stopped:
      return ""
    self.ids.extend(ids)
    text = self.tokenizer.decode(self.ids)
    cuts = [text.find(s) for s in self.stop_strings]
    cuts = [c for c in cuts if c >= 0]
    if cuts:
      self.stopped, self.text = True, text[:min(cuts)]
      return self._emit(len(self.text))
    self.text = text
    hold = len(text) - len(text.rstrip("\ufffd"))
    for s in self.stop_strings:
      for n in range(min(len(s) - 1, len(text)), 0, -1):
        if text.endswith(s[:n]):
          hold = max(hold, n)
          break
    return self._emit(len(text) - hold)

  def finish(self) -> str:
    """The held-back rest, once no more tokens will come."""
    return self._emit(len(self.text))

  def _emit(self, upto: int) -> str:
    new = self.text[self.emitted:upto] if upto > self.emitted else ""
    self.emitted = max(self.emitted, upto)
    return new


def sample_text(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.8,
                top_k: int = 50, top_p: float = 0.95, seed: int = 0) -> list[str]:
  """Continuations of text prompts (each starts a document: BOS + prompt; "" samples from BOS
  alone), ending at max_new_tokens, the context's end or a generated BOS (a new document)."""
  sampling = SamplingParams(temperature, top_k, top_p)
  ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
  out = Sampler(model).generate(ids, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                stop_ids=(tokenizer.bos_id,))
  return [tokenizer.decode(t) for t in out.tokens]
