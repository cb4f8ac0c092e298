"""Continuous batching (lmtiny.chat.batching): a job's tokens through the engine equal
Sampler.generate alone while jobs with other settings join and leave; nothing compiles after
warm-up; jobs share decode calls; decode log-probabilities equal a full forward pass's; long
prompts prefilled in pieces give the same tokens; per-row sampling settings equal each row
sampled alone."""
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chat_fixtures import counting_lowerings, make_tokenizer, random_sampler
from lmtiny.chat.batching import BatchEngine, EngineBusy, Failed, Finished, Job, Tokens
from lmtiny.model.sampling import filter_logits, sample_next, SamplingArrays, SamplingParams

CONTEXT = 64
GREEDY = SamplingParams(0.0, 0, 1.0)


@pytest.fixture(scope="module")
def engine():
  tok = make_tokenizer()
  return BatchEngine(random_sampler(tok, CONTEXT), max_batch=4, max_queue=16, stop_ids=(tok.bos_id,)), tok


def _collect(job: Job, on_first=None):
  """(ids, logprobs, finish reason) of a job, waiting for its events."""
  ids, logprobs = [], []
  while True:
    owner, event = job.events.get(timeout=120)
    assert owner is job
    if isinstance(event, Tokens):
      if not ids and on_first is not None:
        on_first()
      ids += event.ids
      logprobs += event.logprobs
    elif isinstance(event, Finished):
      return ids, logprobs, event.reason
    else:
      assert isinstance(event, Failed)
      raise AssertionError(event.message)


def _prompt(tok, text):
  return [tok.bos_id] + tok.encode(text)


def _alone(engine, job: Job):
  out = engine.sampler.generate([job.ids], max_new_tokens=job.max_tokens, sampling=job.sampling, seed=job.seed,
                                rows=[job.stream], stop_ids=sorted(engine.stop_set))
  return out.tokens[0], "stop" if out.finish_reasons[0] == "stop_token" else "length"


def test_tokens_equal_the_sampler_alone_while_other_jobs_come_and_go(engine):
  engine, tok = engine
  watched = [Job(_prompt(tok, "The standard library's json module"), 40, GREEDY),
             Job(_prompt(tok, "def main():" * 3), 30, SamplingParams(0.9, 20, 1.0), seed=7, stream=1)]
  others = [Job(_prompt(tok, "x" * i), 3 + i, SamplingParams(0.5 + 0.1 * i, 5 * i, 0.9), seed=i)
            for i in range(1, 6)]
  late = []

  def join_late():  # while the watched jobs run: three more, with new settings, over two slots
    late.extend(others[2:])
    engine.submit(others[2:])

  engine.submit(watched[:1] + others[:2])
  first = _collect(watched[0], on_first=lambda: engine.submit(watched[1:]) or join_late())
  second = _collect(watched[1])
  for job in others:
    ids, _, reason = _collect(job)
    assert (ids, reason) == _alone(engine, job)
  assert len(late) == 3
  for job, (ids, _, reason) in zip(watched, (first, second)):
    assert len(ids) >= 8  # long enough to share decode calls with the others
    assert (ids, reason) == _alone(engine, job)


def test_nothing_compiles_after_warmup(engine):
  engine, tok = engine
  with counting_lowerings() as lowered:
    jobs = [Job([tok.bos_id] + list(range(5, 5 + n)), max_tokens, SamplingParams(t, k, p), seed=n)
            for n, max_tokens, t, k, p in ((0, 2, 0.0, 0, 1.0), (5, 9, 1.3, 0, 0.5), (12, 4, 0.7, 3, 1.0),
                                           (30, 20, 2.0, 2000, 0.9), (55, 5, 0.1, 64, 0.99), (8, 1, 1.0, 1, 1.0))]
    engine.submit(jobs)
    for job in jobs:
      _collect(job)
    for n in (2, 17, 40, CONTEXT):
      engine.score(list(range(1, n + 1)))
  assert lowered == []


def test_simultaneous_jobs_share_decode_calls(engine):
  engine, tok = engine
  calls, tokens = engine.decode_calls, engine.decode_tokens
  jobs = [Job(_prompt(tok, f"question {i}"), 12, GREEDY, stream=i) for i in range(4)]
  engine.submit(jobs)
  emitted = sum(len(_collect(job)[0]) for job in jobs)
  calls, tokens = engine.decode_calls - calls, engine.decode_tokens - tokens
  assert tokens >= emitted >= 4
  # One at a time would take a call per 4 tokens (chunk) of each job: 4 jobs of 12 at least 12 calls.
  assert calls <= 12 // 4 + 2, calls


def test_decode_logprobs_equal_a_full_forward_pass(engine):
  engine, tok = engine
  job = Job(_prompt(tok, "import os"), 10, SamplingParams(1.0, 0, 1.0), seed=3)
  engine.submit([job])
  ids, logprobs, _ = _collect(job)
  scored = engine.score(job.ids + ids)
  np.testing.assert_allclose(logprobs, scored.logprob[len(job.ids) - 1:], atol=2e-4)
  assert (scored.top_logprobs[:, 0] >= scored.logprob - 1e-6).all()
  assert (np.diff(scored.top_logprobs, axis=-1) <= 0).all()  # most likely first


def test_cancelled_jobs_leave_and_a_full_queue_is_refused(engine):
  engine, tok = engine
  job = Job(_prompt(tok, "a long one"), CONTEXT - 8, GREEDY)
  engine.submit([job])
  job.events.get(timeout=120)  # its first tokens
  job.cancelled = True
  for _ in range(200):  # the slot is freed at the next decode call
    if all(j is None for j in engine._slots):
      break
    threading.Event().wait(0.01)
  assert all(j is None for j in engine._slots)
  with pytest.raises(EngineBusy, match="busy: 0 requests are waiting"):
    engine.submit([Job(_prompt(tok, "q"), 2, GREEDY) for _ in range(17)])


def test_per_row_settings_equal_each_row_alone():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((5, 300)) * 3, jnp.float32)
  top_k = np.array([0, 5, 100, 0, 300], np.int32)
  top_p = np.array([1.0, 1.0, 0.8, 0.6, 0.95], np.float32)
  temperature = np.array([0.0, 0.7, 1.0, 1.5, 0.3], np.float32)
  keys = jax.vmap(jax.random.key)(jnp.arange(5))
  positions = jnp.arange(5, dtype=jnp.int32) + 10
  filter_jit, sample_jit = jax.jit(filter_logits), jax.jit(sample_next)
  rows = filter_jit(logits, top_k, top_p)
  tokens = sample_jit(logits, keys, positions, SamplingArrays(temperature, top_k, top_p))
  for i in range(5):
    alone = filter_jit(logits[i:i + 1], np.int32(top_k[i]), np.float32(top_p[i]))
    np.testing.assert_array_equal(rows[i:i + 1], alone)
    one = sample_jit(logits[i:i + 1], keys[i:i + 1], positions[i:i + 1],
                     SamplingParams(float(temperature[i]), int(top_k[i]), float(top_p[i])).arrays())
    assert int(tokens[i]) == int(one[0])
  assert int(tokens[0]) == int(jnp.argmax(logits[0]))


def test_long_prompts_are_prefilled_in_pieces(engine):
  engine, tok = engine
  pieces = BatchEngine(engine.sampler, max_batch=2, stop_ids=(tok.bos_id,), prefill_piece=24)
  ids = [tok.bos_id] + list(range(5, 55))  # 51 tokens: pieces at 0, 24 and 40 (moved back to end at 64)
  jobs = [Job(ids, 10, GREEDY), Job(ids[:30], 12, SamplingParams(0.9, 20, 0.95), seed=4)]
  pieces.submit(jobs)
  for job in jobs:
    ids_out, _, reason = _collect(job)
    assert (ids_out, reason) == _alone(engine, job)
  np.testing.assert_allclose(pieces.score(ids).logprob, engine.score(ids).logprob, atol=1e-5)
