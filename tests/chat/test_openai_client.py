"""lmtiny.serve's API through the official `openai` Python client (skipped without it): chat,
streaming, completions with logprobs and echo, models, errors as the client's exceptions, and
24 concurrent clients all answered while the engine batches them."""
import threading

import numpy as np
import pytest

from chat_fixtures import make_tokenizer, random_sampler, serve_in_thread
from lmtiny.chat.batching import BatchEngine
from lmtiny.chat.replies import Service
from lmtiny.model.sampling import SamplingParams
from lmtiny.tokenizer import render_for_completion

openai = pytest.importorskip("openai")

CONTEXT = 64
KEY = "test-key"


@pytest.fixture(scope="module")
def served():
  tok = make_tokenizer()
  sampler = random_sampler(tok, CONTEXT)
  engine = BatchEngine(sampler, max_batch=8, stop_ids=(tok.special_id("assistant_end"), tok.bos_id))
  server = serve_in_thread(Service(engine, tok, max_tokens=16, model="tiny"), api_key=KEY)
  client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key=KEY, max_retries=0)
  yield client, tok, sampler, engine
  server.shutdown()
  server.server_close()


def _expected(tok, sampler, ids, *, temperature, max_tokens, seed):
  out = sampler.generate([ids], max_new_tokens=max_tokens, sampling=SamplingParams(temperature, 0, 1.0), seed=seed,
                         stop_ids=(tok.special_id("assistant_end"), tok.bos_id))
  return tok.decode(out.tokens[0])


def _chat(text):
  return [{"role": "user", "content": text}]


def test_chat_whole_and_streamed(served):
  client, tok, sampler, _ = served
  messages = _chat("What does os.path.join do?")
  want = _expected(tok, sampler, render_for_completion(tok, messages), temperature=0.7, max_tokens=12, seed=3)
  reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0.7, seed=3)
  assert reply.choices[0].message.content == want and reply.choices[0].finish_reason in ("stop", "length")
  assert reply.usage.prompt_tokens == len(render_for_completion(tok, messages))
  stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0.7, seed=3,
                                          stream=True, stream_options={"include_usage": True})
  chunks = list(stream)
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
  assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
  assert [m.id for m in client.models.list()] == ["tiny"]


def test_completions_with_logprobs_and_echo(served):
  client, tok, sampler, engine = served
  prompt = "import json"
  ids = [tok.bos_id] + tok.encode(prompt)
  scored = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
  logprobs = scored.choices[0].logprobs
  assert scored.choices[0].text == prompt and "".join(logprobs.tokens) == prompt
  np.testing.assert_allclose(logprobs.token_logprobs, engine.score(ids).logprob, rtol=1e-6)
  reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
  assert reply.choices[0].text == _expected(tok, sampler, ids, temperature=0.0, max_tokens=5, seed=0)
  assert all(len(top) == 2 for top in reply.choices[0].logprobs.top_logprobs)


def test_errors_are_the_clients_exceptions(served):
  client = served[0]
  with pytest.raises(openai.BadRequestError, match="temperature=5"):
    client.chat.completions.create(model="tiny", messages=_chat("hi"), temperature=5)
  wrong = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
  with pytest.raises(openai.AuthenticationError):
    wrong.chat.completions.create(model="tiny", messages=_chat("hi"))


def test_concurrent_clients_are_all_answered_in_shared_batches(served):
  client, tok, sampler, engine = served
  clients, replies = 24, {}
  calls, tokens = engine.decode_calls, engine.decode_tokens
  barrier = threading.Barrier(clients)

  def ask(i):
    barrier.wait(timeout=60)
    reply = client.chat.completions.create(model="tiny", messages=_chat(f"Question {i}?"), max_tokens=12,
                                           temperature=1.0, seed=i)
    replies[i] = reply.choices[0]

  threads = [threading.Thread(target=ask, args=(i,)) for i in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert sorted(replies) == list(range(clients))
  assert all(c.finish_reason in ("stop", "length") for c in replies.values())
  # Shared decode calls: on average more than a third of the 8 slots were busy in each.
  calls, tokens = engine.decode_calls - calls, engine.decode_tokens - tokens
  assert tokens / (calls * engine.chunk) > 8 / 3, (tokens, calls)
