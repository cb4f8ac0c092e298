"""The chat server's OpenAI API over HTTP: streamed and whole chat replies equal the sampler's,
concurrent requests equal sequential ones, n choices, stop strings, usage, completions with
logprobs and echo (max_tokens 0: the prompt's log-probabilities), /v1/models, the API key, new
sampling settings compile nothing, bad requests get OpenAI's error shape with 4xx (bad
Content-Length, deep JSON, slow bodies), long chats lose their oldest turns, stopped-empty replies
are left out, the favicon, a full queue answers 503, 100 simultaneous clients are all answered,
the page's default reply limit is one the server accepts; `python -m lmtiny.serve` flag checks;
the page's script under Node with a stub DOM; and the page end to end in headless Chromium."""
import http.client
import json
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
import zlib

import numpy as np
import pytest

from chat_fixtures import counting_lowerings, make_tokenizer, random_sampler, serve_in_thread
from lmtiny import serve
from lmtiny.chat.batching import BatchEngine, EngineBusy
from lmtiny.chat.page import render_page
from lmtiny.chat.replies import Service
from lmtiny.chat.server import make_server
from lmtiny.model.sampling import SamplingParams
from lmtiny.tokenizer import render_for_completion

CONTEXT = 64
CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"


def _serve(context, api_key=None, **service_kw):
  tok = make_tokenizer()
  sampler = random_sampler(tok, context)
  engine = BatchEngine(sampler, max_batch=4, stop_ids=(tok.special_id("assistant_end"), tok.bos_id))
  server = serve_in_thread(Service(engine, tok, model="tiny", **service_kw), info={"step": 0}, api_key=api_key)
  return server, tok, sampler


@pytest.fixture(scope="module")
def served():
  server, tok, sampler = _serve(CONTEXT, max_tokens=12)
  yield server.server_address[1], tok, sampler, server
  server.shutdown()
  server.server_close()


@pytest.fixture(scope="module")
def served_256():
  """The README's demo shape: a 256-token context and lmtiny.serve's default --max-tokens 256."""
  server, tok, sampler = _serve(256, max_tokens=256)
  yield server.server_address[1], tok, sampler
  server.shutdown()
  server.server_close()


def _get(port, path, headers=None):
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
  conn.request("GET", path, headers=headers or {})
  data = conn.getresponse().read().decode()
  conn.close()
  return data


def _post(port, body, raw=None, path=CHAT, headers=None):
  """(status, payload): the JSON reply, or for a stream the list of its chunks (the final
  `[DONE]` checked and left out)."""
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
  data = raw if raw is not None else json.dumps(body).encode()
  conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
  response = conn.getresponse()
  payload = response.read().decode()
  conn.close()
  if response.getheader("Content-Type") == "text/event-stream":
    events = [chunk[6:] for chunk in payload.split("\n\n") if chunk.startswith("data: ")]
    assert events[-1] == "[DONE]" and payload.endswith("data: [DONE]\n\n")
    return response.status, [json.loads(e) for e in events[:-1]]
  return response.status, json.loads(payload)


def _reply(chunks, index=0):
  """A streamed choice's text and its last chunk (the one with its finish_reason)."""
  mine = [c for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
  text = "".join(c["choices"][0]["delta"].get("content", "") for c in mine)
  assert mine[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
  return text, mine[-1]


def _expected_ids(tok, sampler, ids, *, temperature, top_k=0, top_p=1.0, max_tokens, seed, row=0):
  out = sampler.generate([ids], max_new_tokens=max_tokens, sampling=SamplingParams(temperature, top_k, top_p),
                         seed=seed, rows=[row], stop_ids=(tok.special_id("assistant_end"), tok.bos_id))
  return out.tokens[0], "stop" if out.finish_reasons[0] == "stop_token" else "length"


def _expected(tok, sampler, messages, **kw):
  return tok.decode(_expected_ids(tok, sampler, render_for_completion(tok, messages), **kw)[0])


def _chat(text):
  return [{"role": "user", "content": text}]


def _message(payload) -> str:
  assert set(payload["error"]) == {"message", "type", "param", "code"}
  return payload["error"]["message"]


def test_stream_and_whole_replies_are_the_samplers(served):
  port, tok, sampler = served[:3]
  for temperature, seed, stream in ((0.0, 0, True), (0.9, 7, True), (0.9, 7, False)):
    body = dict(messages=_chat("What does os.path.join do?"), temperature=temperature, top_k=20,
                max_tokens=10, seed=seed, stream=stream)
    status, payload = _post(port, body)
    want_ids, want_reason = _expected_ids(tok, sampler, render_for_completion(tok, body["messages"]),
                                          temperature=temperature, top_k=20, max_tokens=10, seed=seed)
    if stream:
      text, last = _reply(payload)
      assert len(payload) > 3  # streamed in pieces
      assert last["object"] == "chat.completion.chunk" and last["model"] == "tiny"
      assert last["choices"][0]["finish_reason"] == want_reason and last["lmtiny"]["trimmed"] == 0
      assert len({c["id"] for c in payload}) == 1 and payload[0]["id"].startswith("chatcmpl-")
    else:
      choice = payload["choices"][0]
      text = choice["message"]["content"]
      assert payload["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
      assert choice["finish_reason"] == want_reason
      prompt = len(render_for_completion(tok, body["messages"]))
      assert payload["usage"] == {"prompt_tokens": prompt, "completion_tokens": len(want_ids),
                                  "total_tokens": prompt + len(want_ids)}
    assert text == tok.decode(want_ids)


def test_n_choices_stop_strings_and_usage_in_a_stream(served):
  port, tok, sampler = served[:3]
  messages = _chat("Name a module.")
  ids = render_for_completion(tok, messages)
  wants = [tok.decode(_expected_ids(tok, sampler, ids, temperature=1.0, max_tokens=10, seed=5, row=i)[0])
           for i in range(3)]
  assert len(set(wants)) == 3
  status, chunks = _post(port, dict(messages=messages, n=3, max_tokens=10, seed=5, stream=True,
                                    stream_options={"include_usage": True}))
  assert status == 200 and [_reply(chunks, i)[0] for i in range(3)] == wants
  usage = chunks[-1]
  assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == len(ids)
  # A stop string: the reply ends before it, finish_reason "stop".
  cut = wants[0][3:5]
  status, payload = _post(port, dict(messages=messages, max_tokens=10, seed=5, stop=[cut, "never"]))
  choice = payload["choices"][0]
  assert choice["message"]["content"] == wants[0][:wants[0].index(cut)] and choice["finish_reason"] == "stop"


def test_completions_logprobs_and_echo(served):
  port, tok, sampler = served[:3]
  engine = _handler(served).service.engine
  prompt = "The json module"
  ids = [tok.bos_id] + tok.encode(prompt)
  # Echo with max_tokens 0 (lm-eval's log-likelihood request): the prompt's tokens and their logprobs.
  status, payload = _post(port, dict(prompt=[prompt, ids[1:]], max_tokens=0, echo=True, logprobs=1), path=TEXT)
  assert status == 200 and payload["object"] == "text_completion"
  text, tokens = payload["choices"]
  scored = engine.score(ids)
  assert text["text"] == prompt and text["finish_reason"] == "length"
  assert "".join(text["logprobs"]["tokens"]) == prompt
  np.testing.assert_allclose(text["logprobs"]["token_logprobs"], scored.logprob, rtol=1e-6)
  assert text["logprobs"]["text_offset"][0] == 0 and len(text["logprobs"]["top_logprobs"][1]) == 1
  assert tokens["logprobs"]["token_logprobs"][0] is None  # token ids: the first has nothing before it
  np.testing.assert_allclose(tokens["logprobs"]["token_logprobs"][1:], engine.score(ids[1:]).logprob, rtol=1e-6)
  assert payload["usage"]["completion_tokens"] == 0
  # Generated tokens: the greedy continuation and its logprobs, which a full forward pass agrees with.
  status, payload = _post(port, dict(prompt=prompt, max_tokens=6, temperature=0, logprobs=3), path=TEXT)
  choice = payload["choices"][0]
  want_ids, reason = _expected_ids(tok, sampler, ids, temperature=0.0, max_tokens=6, seed=0)
  assert choice["text"] == tok.decode(want_ids) and choice["finish_reason"] == reason
  logprobs = choice["logprobs"]
  np.testing.assert_allclose(logprobs["token_logprobs"], engine.score(ids + want_ids).logprob[len(ids) - 1:],
                             atol=2e-4)
  for top, lp in zip(logprobs["top_logprobs"], logprobs["token_logprobs"]):  # greedy: the top token
    assert len(top) == 3 and max(top.values()) == pytest.approx(lp, abs=2e-4), (top, lp)
  assert logprobs["text_offset"][0] == len(prompt) and payload["usage"]["completion_tokens"] == len(want_ids)


def test_tokenizer_endpoints(served):
  """vLLM's /tokenizer_info, /tokenize and /detokenize, which lm-eval's remote tokenizer uses."""
  port, tok = served[:2]
  info = json.loads(_get(port, "/tokenizer_info"))
  assert info["eos_token"] == info["bos_token"] == "<|bos|>" and info["model_max_length"] == CONTEXT
  status, payload = _post(port, {"prompt": "import json", "add_special_tokens": False}, path="/tokenize")
  assert status == 200 and payload["tokens"] == tok.encode("import json")
  status, payload = _post(port, {"prompt": "import json", "add_special_tokens": True}, path="/tokenize")
  assert payload["tokens"] == [tok.bos_id] + tok.encode("import json")
  status, payload = _post(port, {"prompt": "<|bos|>"}, path="/tokenize")  # exactly a chat token: its id
  assert payload["tokens"] == [tok.bos_id]
  status, payload = _post(port, {"prompt": "say <|bos|>"}, path="/tokenize")  # inside text: never parsed
  assert tok.bos_id not in payload["tokens"]
  status, payload = _post(port, {"tokens": tok.encode("import json")}, path="/detokenize")
  assert status == 200 and payload == {"prompt": "import json"}
  status, payload = _post(port, {"tokens": [-1]}, path="/detokenize")
  assert status == 400 and payload["error"]["param"] == "tokens"


def test_models_and_the_api_key():
  server, tok, _ = _serve(CONTEXT, api_key="sesame", max_tokens=4)
  port = server.server_address[1]
  try:
    status, payload = _post(port, dict(messages=_chat("hi")))
    assert status == 401 and payload["error"]["code"] == "invalid_api_key"
    status, payload = _post(port, dict(messages=_chat("hi")), headers={"Authorization": "Bearer wrong"})
    assert status == 401 and payload["error"]["type"] == "authentication_error"
    key = {"Authorization": "Bearer sesame"}
    status, payload = _post(port, dict(messages=_chat("hi"), max_tokens=2), headers=key)
    assert status == 200 and payload["choices"][0]["finish_reason"] in ("stop", "length")
    models = json.loads(_get(port, "/v1/models", headers=key))
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["object"] == "list"
    assert json.loads(_get(port, "/v1/models"))["error"]["code"] == "invalid_api_key"
    assert json.loads(_get(port, "/health"))["ok"]  # the page and /health stay open
    assert 'id="api_key"' in _get(port, "/") and "hidden>API key" not in _get(port, "/")
  finally:
    server.shutdown()
    server.server_close()


def test_concurrent_requests_give_the_sequential_replies(served):
  port = served[0]
  bodies = [dict(messages=_chat(f"Question number {i}?" + " more" * i), temperature=0.9, top_k=20 * i,
                 top_p=1 - 0.1 * i, max_tokens=10 + i, seed=i) for i in range(4)]
  sequential = [_post(port, b)[1]["choices"][0]["message"]["content"] for b in bodies]
  results = [None] * 4
  barrier = threading.Barrier(4)

  def client(i):
    barrier.wait()
    results[i] = _post(port, bodies[i])[1]["choices"][0]["message"]["content"]

  threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert results == sequential
  assert len(set(sequential)) == 4


def test_long_chats_lose_their_oldest_exchanges(served):
  port, tok, sampler = served[:3]
  long = "tell me about the standard library " * 3
  messages = []
  for i in range(4):
    messages += [{"role": "user", "content": f"{i} {long}"}, {"role": "assistant", "content": f"answer {i} {long}"}]
  messages += _chat("last question")
  status, payload = _post(port, dict(messages=messages, temperature=0.0, max_tokens=8))
  trimmed = payload["lmtiny"]["trimmed"]
  assert status == 200 and trimmed >= 2 and trimmed % 2 == 0
  kept = messages[trimmed:]
  assert len(render_for_completion(tok, kept)) <= CONTEXT - 8 < len(render_for_completion(tok, messages[trimmed - 2:]))
  assert payload["choices"][0]["message"]["content"] == _expected(tok, sampler, kept, temperature=0.0, max_tokens=8,
                                                                  seed=0)


def test_the_pages_default_reply_limit_works_and_keeps_the_history(served_256):
  port, tok, sampler = served_256
  assert json.loads(_get(port, "/health")) == {"ok": True, "step": 0, "context": 256, "default_max_tokens": 255}
  page_max_tokens = int(re.search(r'id="max_tokens"[^>]* value="(\d+)"', _get(port, "/")).group(1))
  assert page_max_tokens == 255
  # A second turn as the page sends it (~40 tokens of history): nothing is left out, and the reply
  # runs until <|assistant_end|> or the context's end.
  messages = _chat("What does os.path.join do?") + [{"role": "assistant", "content": "It joins paths."}] + \
      _chat("And os.path.split?")
  ids = render_for_completion(tok, messages)
  status, chunks = _post(port, dict(messages=messages, temperature=0.0, top_k=50, max_tokens=page_max_tokens,
                                    stream=True, stream_options={"include_usage": True}))
  text, last = _reply(chunks)
  assert status == 200 and last["lmtiny"]["trimmed"] == 0
  assert text == _expected(tok, sampler, messages, temperature=0.0, top_k=50, max_tokens=255, seed=0)
  tokens = chunks[-1]["usage"]["completion_tokens"]
  assert tokens <= 256 - len(ids)
  assert (last["choices"][0]["finish_reason"] == "length") == (len(ids) + tokens == 256)
  # An explicit limit past the context is still the client's error.
  status, payload = _post(port, dict(messages=messages, max_tokens=256))
  assert status == 400 and _message(payload).startswith("max_tokens=256: must be in [1, 255]")
  assert payload["error"]["param"] == "max_tokens"


def test_a_system_message_comes_first(served):
  port, tok, sampler = served[:3]
  messages = [{"role": "system", "content": "Answer briefly."}] + _chat("What does os.path.join do?")
  parts = [{"role": "system", "content": [{"type": "text", "text": "Answer "}, {"type": "text", "text": "briefly."}]}]
  for sent in (messages, parts + messages[1:]):
    status, payload = _post(port, dict(messages=sent, temperature=0.0, top_k=20, max_tokens=10))
    assert status == 200 and payload["lmtiny"]["trimmed"] == 0
    assert payload["choices"][0]["message"]["content"] == _expected(tok, sampler, messages, temperature=0.0,
                                                                    top_k=20, max_tokens=10, seed=0)


@pytest.mark.parametrize("body, status, message, path", [
    (b"{nope", 400, "invalid JSON", CHAT),
    (b"[1, 2]", 400, "JSON object", CHAT),
    ({"messages": []}, 400, "messages: must be a non-empty list", CHAT),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages\\[0\\]", CHAT),
    ({"messages": [{"role": "user", "content": 3}]}, 400, "messages\\[0\\]", CHAT),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages\\[0\\]", CHAT),
    ({"messages": _chat("a") + [{"role": "system", "content": "s"}] + _chat("b")}, 400, "messages\\[1\\]", CHAT),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]}, 400,
     'messages\\[1\\]: must be {"role": "user"', CHAT),
    ({"messages": [{"role": "system", "content": "s"}]}, 400, "last message must be the user's", CHAT),
    ({"messages": _chat("a") + [{"role": "assistant", "content": "b"}]}, 400, "last message must be the user's", CHAT),
    ({"messages": _chat("a"), "temperature": "hot"}, 400, "temperature: must be a number", CHAT),
    ({"messages": _chat("a"), "temperature": 2.5}, 400, "temperature=2.5: must be in", CHAT),
    ({"messages": _chat("a"), "top_k": 2.5}, 400, "top_k: must be an integer", CHAT),
    ({"messages": _chat("a"), "top_p": 0}, 400, "top_p=0", CHAT),
    ({"messages": _chat("a"), "n": 17}, 400, "n=17: must be in \\[1, 16\\]", CHAT),
    ({"messages": _chat("a"), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop: must be", CHAT),
    ({"messages": _chat("a"), "stream": "yes"}, 400, "stream: must be true or false", CHAT),
    ({"messages": _chat("a"), "max_tokens": CONTEXT}, 400, f"max_tokens={CONTEXT}", CHAT),
    ({"messages": _chat("a"), "max_completion_tokens": 0}, 400, "max_completion_tokens=0", CHAT),
    ({"messages": _chat("word " * 200)}, 413, "context is 64", CHAT),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens=0: must be in \\[1,", TEXT),
    ({"prompt": "a", "logprobs": 6}, 400, "logprobs=6: must be in \\[0, 5\\]", TEXT),
    ({"prompt": "a", "logprobs": 1, "stream": True}, 400, "logprobs: not available with stream", TEXT),
    ({"prompt": [[1, 2], 3]}, 400, "prompt: must be a string", TEXT),
    ({"prompt": ["a"] * 9, "n": 8}, 400, "n x prompts: 72 sequences, but at most 64 may wait", TEXT),
    ({"prompt": [[1, 1 << 20]]}, 400, "prompt\\[0\\]: token ids must be in", TEXT),
    ({"prompt": "word " * 200, "max_tokens": 0, "echo": True}, 413, "prompt\\[0\\]: .* context is 64", TEXT),
])
def test_bad_requests_get_an_openai_error(served, body, status, message, path):
  port = served[0]
  raw = body if isinstance(body, bytes) else json.dumps(body).encode()
  got_status, payload = _post(port, None, raw=raw, path=path)
  assert got_status == status
  assert re.search(message, _message(payload))
  assert payload["error"]["type"] == "invalid_request_error"


def test_other_paths_and_methods(served):
  port = served[0]
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
  for method, path, status in (("GET", "/nope", 404), ("GET", CHAT, 405), ("GET", TEXT, 405), ("POST", "/x", 404),
                               ("POST", "/chat/completions", 404)):  # the old protocol is gone
    conn.request(method, path, body=b"{}" if method == "POST" else None)
    response = conn.getresponse()
    assert response.status == status and path in _message(json.loads(response.read()))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
  conn.request("GET", "/health")
  assert json.loads(conn.getresponse().read()) == {"ok": True, "step": 0, "context": CONTEXT, "default_max_tokens": 12}
  conn.request("GET", "/v1/models")
  assert json.loads(conn.getresponse().read())["data"][0]["id"] == "tiny"
  conn.request("GET", "/")
  page = conn.getresponse().read().decode()
  assert CHAT in page and 'id="stop"' in page and "hidden>API key" in page
  assert f'id="max_tokens" type="number" min="1" max="{CONTEXT - 1}" step="1" value="12"' in page
  conn.close()


def _raw(port, data: bytes, timeout=10.0, shut_write=False):
  """Sends raw bytes and returns (status, headers, body) of the reply; the connection stays open
  for writing (like a client still sending) unless shut_write. Raises on no complete reply."""
  with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
    conn.sendall(data)
    if shut_write:
      conn.shutdown(socket.SHUT_WR)
    reply = b""
    while b"\r\n\r\n" not in reply or len(reply) < _expected_size(reply):
      chunk = conn.recv(65536)
      if not chunk:
        break
      reply += chunk
  head, _, body = reply.partition(b"\r\n\r\n")
  lines = head.decode().split("\r\n")
  headers = dict(line.split(": ", 1) for line in lines[1:])
  assert len(body) == int(headers["Content-Length"])  # a complete reply
  return int(lines[0].split()[1]), headers, body


def _expected_size(reply: bytes) -> int:
  head, _, _ = reply.partition(b"\r\n\r\n")
  match = re.search(rb"Content-Length: (\d+)", head)
  return len(head) + 4 + int(match.group(1)) if match else 1 << 62


def _post_head(length: str, body: bytes = b"") -> bytes:
  return (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
          f"Content-Length: {length}\r\n\r\n").encode() + body


@pytest.mark.parametrize("length, message", [
    ("-1", "Content-Length=-1: must be >= 0"),
    ("-99999", "Content-Length=-99999: must be >= 0"),
    ("12abc", "Content-Length: '12abc' is not an integer"),
    ("1e3", "Content-Length: '1e3' is not an integer"),
])
def test_a_bad_content_length_is_400_at_once(served, length, message):
  # The client keeps its side open: the old server read (length -1: until the client hung up).
  status, headers, body = _raw(served[0], _post_head(length), timeout=5)
  assert status == 400 and _message(json.loads(body)) == message and headers["Connection"] == "close"


def test_a_body_shorter_than_its_content_length_times_out_with_408(served):
  server = make_server(_handler(served).service, port=0, read_timeout_s=0.5)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    port = server.server_address[1]
    started = time.monotonic()
    status, _, body = _raw(port, _post_head("100", b'{"messages": '), timeout=10)
    assert status == 408 and _message(json.loads(body)) == "body: 13 of 100 bytes (Content-Length) arrived in 0.5 s"
    # Trickling bytes buys no time: the limit is for the whole body.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
      conn.sendall(_post_head("100"))
      replied = b""
      for _ in range(40):
        try:
          conn.sendall(b" ")
        except OSError:  # the server closed after answering
          break
        conn.settimeout(0.05)
        try:
          replied += conn.recv(65536)
        except TimeoutError:
          continue
        if replied:
          break
      assert replied.startswith(b"HTTP/1.0 408 ")
    # A client that hangs up early gets a 400 (the body ended), not a hung thread.
    status, _, body = _raw(port, _post_head("100", b'{"mess'), shut_write=True)
    assert status == 400 and "ended after 6 of the 100 bytes" in _message(json.loads(body))
    assert time.monotonic() - started < 9  # no read waited for the 10 s client timeout
  finally:
    server.shutdown()
    server.server_close()


def _handler(served):
  return served[3].RequestHandlerClass


@pytest.mark.parametrize("raw, message", [
    (b"[" * 400_000, "body: JSON nested too deeply"),
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "body: JSON nested too deeply"),
    (b'{"messages": [{"role": "user", "content": "a"}], "top_k": Infinity}', "top_k: must be a finite number, got inf"),
    (b'{"messages": [{"role": "user", "content": "a"}], "temperature": NaN}', "temperature: must be a finite number"),
    (b'{"messages": [{"role": "user", "content": "a"}], "seed": ' + b"[" * 900 + b"]" * 900 + b"}",
     "seed: must be an integer, got a JSON array"),
], ids=["deep-array", "deep-messages", "infinite-top-k", "nan-temperature", "deep-seed"])
def test_deep_or_non_finite_json_is_400(served, raw, message):
  status, headers, body = _raw(served[0], _post_head(str(len(raw)), raw))
  assert status == 400 and _message(json.loads(body)).startswith(message)


def test_an_exchange_with_an_empty_reply_is_left_out(served):
  port, tok, sampler = served[:3]
  stopped = _chat("first question") + [{"role": "assistant", "content": ""}]
  answered = _chat("second question") + [{"role": "assistant", "content": "an answer"}]
  messages = stopped + answered + stopped + _chat("third question")
  status, payload = _post(port, dict(messages=messages, temperature=0.0, max_tokens=8))
  assert status == 200 and payload["lmtiny"] == {"unanswered": 4, "trimmed": 0}
  want_messages = answered + _chat("third question")
  assert payload["choices"][0]["message"]["content"] == _expected(tok, sampler, want_messages, temperature=0.0,
                                                                  max_tokens=8, seed=0)
  # With a system message too; a final empty reply is still refused (the last message is the user's).
  system = [{"role": "system", "content": "Be brief."}]
  status, payload = _post(port, dict(messages=system + stopped + _chat("q"), temperature=0.0, max_tokens=8))
  assert status == 200 and payload["lmtiny"]["unanswered"] == 2
  status, payload = _post(port, dict(messages=_chat("q") + [{"role": "assistant", "content": ""}]))
  assert status == 400 and "last message must be the user's" in _message(payload)


def test_new_settings_and_prompt_lengths_compile_nothing(served):
  port = served[0]
  with counting_lowerings() as lowered:
    for i, (temperature, top_k, top_p) in enumerate(((0.3, 5, 1.0), (1.7, 0, 0.5), (0.0, 50, 1.0), (1.0, 200, 0.9),
                                                     (0.55, 1, 1.0), (0.8, 999, 0.99))):
      status, payload = _post(port, dict(messages=_chat("Which module reads CSV files?" + " and" * 4 * i),
                                         temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=6, seed=i))
      assert status == 200 and payload["choices"][0]["finish_reason"]
    status, payload = _post(port, dict(prompt="a b c d e f g h i j k l m n o p q", max_tokens=0, echo=True,
                                       logprobs=2), path=TEXT)
    assert status == 200
  assert lowered == []


def _png_rgba(png: bytes):
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  chunks, i = {}, 8
  while i < len(png):
    n = struct.unpack(">I", png[i:i + 4])[0]
    kind, data = png[i + 4:i + 8], png[i + 8:i + 8 + n]
    assert struct.unpack(">I", png[i + 8 + n:i + 12 + n])[0] == zlib.crc32(kind + data)
    chunks[kind] = chunks.get(kind, b"") + data
    i += 12 + n
  width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
  return width, height, depth, color, zlib.decompress(chunks[b"IDAT"])


def test_favicon(served):
  conn = http.client.HTTPConnection("127.0.0.1", served[0], timeout=30)
  conn.request("GET", "/favicon.ico")
  response = conn.getresponse()
  data = response.read()
  conn.close()
  assert response.status == 200 and response.getheader("Content-Type") == "image/x-icon"
  reserved, kind, count = struct.unpack("<HHH", data[:6])
  width, height, _, _, planes, bits, size, offset = struct.unpack("<BBBBHHII", data[6:22])
  assert (reserved, kind, count, width, height, planes, bits) == (0, 1, 1, 32, 32, 1, 32)
  assert offset == 22 and len(data) == 22 + size < 2048
  w, h, depth, color, raw = _png_rgba(data[offset:])
  assert (w, h, depth, color) == (32, 32, 8, 6) and len(raw) == 32 * (1 + 32 * 4)
  assert 'rel="icon" href="/favicon.ico"' in _get(served[0], "/")


def test_a_lone_surrogate_in_a_message_is_400(served):
  # JSON's "\ud800" decodes to a str no tokenizer can encode: before, the connection was dropped.
  raw = b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
  status, headers, body = _raw(served[0], _post_head(str(len(raw)), raw))
  assert status == 400 and headers["Connection"] == "close"
  assert _message(json.loads(body)) == "messages[0].content: not valid Unicode (a lone surrogate U+D800 at character 3)"


def _own_server(served, read_timeout_s):
  """A second server on the module's engine, with its own read timeout."""
  server = make_server(_handler(served).service, port=0, read_timeout_s=read_timeout_s)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server


def test_headers_trickled_a_byte_at_a_time_get_no_more_than_the_deadline(served):
  # Before: each byte reset a per-read timeout, so one header byte every 0.5 s held a thread for
  # ever. Now headers and body together have READ_TIMEOUT_S (here 1.5 s) from the request's start.
  server = _own_server(served, 1.5)
  try:
    with socket.create_connection(server.server_address, timeout=1) as conn:
      started = time.monotonic()
      conn.sendall(f"POST {CHAT} HTTP/1.1\r\n".encode())
      closed_after = None
      for byte in b"X-Slow: " + b"x" * 20:  # at most ~10 s, then the test fails by itself
        try:
          conn.sendall(bytes([byte]))
          conn.settimeout(0.5)
          if conn.recv(65536) == b"":  # the server closed its side
            closed_after = time.monotonic() - started
            break
        except TimeoutError:
          continue  # still open: send the next byte
        except (BrokenPipeError, ConnectionResetError):
          closed_after = time.monotonic() - started
          break
    assert closed_after is not None and closed_after < 1.5 + 1.0, closed_after
  finally:
    server.shutdown()
    server.server_close()


def _request_threads() -> int:
  return sum("process_request_thread" in t.name for t in threading.enumerate())


def _hang_up(port, data: bytes, *, reset: bool, read_first: int = 0):
  """Sends `data`, reads `read_first` bytes of the reply, and closes: with a reset (RST) or a FIN."""
  conn = socket.create_connection(("127.0.0.1", port), timeout=10)
  conn.sendall(data)
  if read_first:
    conn.recv(read_first)
  if reset:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
  conn.close()


def test_clients_that_hang_up_before_or_during_the_reply_leave_no_traceback(served, capfd):
  # Before: each left a traceback (BrokenPipeError, ConnectionResetError) on the server's stderr.
  port = served[0]
  body = json.dumps(dict(messages=_chat("Hi"), temperature=0.0, max_tokens=2)).encode()
  before = _request_threads()
  for _ in range(3):
    for reset in (True, False):
      _hang_up(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", reset=reset)
      _hang_up(port, _post_head(str(len(body)), body), reset=reset)
      _hang_up(port, _post_head(str(len(body)), body), reset=reset, read_first=1)  # mid-stream
      _hang_up(port, _post_head("100", b"{"), reset=reset)  # mid-body
  for _ in range(500):  # every handler thread is done
    if _request_threads() <= before:
      break
    time.sleep(0.02)
  status, payload = _post(port, dict(messages=_chat("Hi"), max_tokens=2))  # still serving
  assert status == 200 and payload["choices"][0]["finish_reason"]
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Exception" not in err, err[-3000:]


class _FullEngine:
  """An engine whose queue is full."""
  context, max_queue = CONTEXT, 2

  def submit(self, jobs):
    raise EngineBusy("busy: 2 requests are waiting; retry in a moment")


def test_a_full_queue_answers_503_with_retry_after():
  server = make_server(Service(_FullEngine(), make_tokenizer(), max_tokens=4), port=0)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    body = json.dumps({"messages": _chat("d")}).encode()
    status, headers, payload = _raw(server.server_address[1], _post_head(str(len(body)), body))
    assert status == 503 and headers["Retry-After"] == "1"
    assert json.loads(payload) == {"error": {"message": "busy: 2 requests are waiting; retry in a moment",
                                             "type": "server_error", "param": None, "code": "overloaded"}}
  finally:
    server.shutdown()
    server.server_close()


def test_a_hundred_simultaneous_clients_are_all_answered(served):
  """Loopback, 100 clients at once (the old listen backlog of 5 reset some): each gets a complete
  reply, 200 with a finished stream or 503 with Retry-After; every socket has a timeout."""
  port = served[0]
  clients = 100
  results = [None] * clients
  barrier = threading.Barrier(clients)
  body = json.dumps(dict(messages=_chat("Hi"), temperature=0.0, max_tokens=2, stream=True)).encode()

  def client(i):
    try:
      barrier.wait(timeout=30)
      conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
      conn.request("POST", CHAT, body=body, headers={"Content-Type": "application/json"})
      response = conn.getresponse()
      payload = response.read().decode()
      conn.close()
      results[i] = (response.status, response.getheader("Retry-After"), payload)
    except Exception as e:  # recorded: the assertion below names it
      results[i] = ("error", type(e).__name__, str(e))

  threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  errors = [r for r in results if r is None or r[0] not in (200, 503)]
  assert errors == []
  for status, retry_after, payload in results:
    if status == 200:
      assert '"finish_reason": "' in payload and payload.endswith("data: [DONE]\n\n")
    else:
      assert retry_after == "1" and _message(json.loads(payload)).startswith("busy:")
  assert sum(r[0] == 200 for r in results) >= 4


_NODE_HARNESS = r"""
const vm = require("vm");
function element() {
  const classes = new Set();
  return {value: "", textContent: "", disabled: false, dataset: {}, children: [], scrollTop: 0, scrollHeight: 0,
          classList: {add: (c) => classes.add(c), contains: (c) => classes.has(c)},
          get className() { return [...classes].join(" "); }, set className(v) { v.split(" ").forEach((c) => classes.add(c)); },
          set innerHTML(v) { this.children = []; }, appendChild(c) { this.children.push(c); },
          addEventListener() {}, focus() {}};
}
const byId = {};
const document = {getElementById: (id) => byId[id] || (byId[id] = element()), createElement: element, body: element()};
const sent = [];
const replies = [];  // per request: null = never answers (until aborted), or the SSE text
function fetch(url, options) {
  sent.push(JSON.parse(options.body));
  const reply = replies.shift();
  return new Promise((resolve, reject) => {
    options.signal.addEventListener("abort", () => reject(Object.assign(new Error("aborted"), {name: "AbortError"})));
    if (reply === null) return;
    const chunks = [new TextEncoder().encode(reply)];
    resolve({ok: true, body: {getReader: () => ({read: async () => chunks.length ? {value: chunks.shift(), done: false} : {done: true}})}});
  });
}
const context = vm.createContext({document, fetch, AbortController, TextDecoder, TextEncoder, JSON, Number, Math,
                                  Error, Object, Promise, console, performance});
vm.runInContext(require("fs").readFileSync(0, "utf8"), context);
const tick = () => new Promise((r) => setTimeout(r, 10));
const done = 'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "lmtiny": {"trimmed": 0}}\n\n' +
             'data: {"choices": [], "usage": {"completion_tokens": 1}}\n\ndata: [DONE]\n\n';
const piece = (text) => 'data: {"choices": [{"index": 0, "delta": {"content": "' + text + '"}, "finish_reason": null}]}\n\n';
async function ask(text, reply, stopEarly) {
  replies.push(reply);
  document.getElementById("input").value = text;
  const sending = document.getElementById("send").onclick();
  await tick();
  if (stopEarly) document.getElementById("stop").onclick();
  await sending;
}
(async () => {
  await ask("first", null, true);                                  // Stop before the first token
  await ask("second", piece("Hi") + done, false);  // a reply
  await ask("third", null, true);                                  // stopped before its first token again
  await ask("fourth", done, false);                                // a reply with no text
  await ask("fifth", piece("Yes") + done, false);
  const log = document.getElementById("log").children.map((c) => [c.className, c.textContent]);
  console.log(JSON.stringify({sent: sent.map((b) => b.messages), log, status: document.getElementById("status").textContent,
                              stream: sent.every((b) => b.stream === true && b.stream_options.include_usage === true)}));
})();
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="no node binary")
def test_the_pages_script_never_sends_an_empty_reply():
  page = render_page(12, CONTEXT)
  script = page[page.index("<script>") + len("<script>"):page.index("</script>")]
  out = subprocess.run(["node", "-e", _NODE_HARNESS], input=script, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout)
  user = lambda t: {"role": "user", "content": t}  # noqa: E731
  assert result["sent"] == [[user("first")], [user("second")], [user("second"), {"role": "assistant", "content": "Hi"},
                                                                  user("third")],
                            [user("second"), {"role": "assistant", "content": "Hi"}, user("fourth")],
                            [user("second"), {"role": "assistant", "content": "Hi"}, user("fifth")]]
  assert result["stream"] and result["status"].startswith("1 tokens | first token ") and result["status"].endswith(" stop")
  classes = [c for c, _ in result["log"]]
  assert classes[:2] == ["message user unanswered", "message assistant stopped unanswered"]
  assert classes[2:4] == ["message user", "message assistant"]


@pytest.mark.parametrize("flag, value, message", [
    ("--max-tokens", "0", "--max-tokens=0: must be >= 1"),
    ("--chunk", "0", "--chunk=0: must be >= 1"),
    ("--max-batch", "-1", "--max-batch=-1: must be >= 1"),
    ("--max-queue", "0", "--max-queue=0: must be >= 1"),
    ("--port", "70000", "--port=70000: must be in [0, 65535]"),
    ("--api-key", " x", "--api-key: must be non-empty, without leading or trailing spaces"),
])
def test_serve_rejects_bad_flags_before_loading(tmp_path, capsys, flag, value, message):
  # The run directory does not exist: a flag that got past the checks would fail on it instead.
  assert serve.main(["--workdir", str(tmp_path / "missing"), flag, value]) == 2
  assert capsys.readouterr().err == f"error: {message}\n"


def _chromium():
  return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium chromium-driver)")
def test_page_in_headless_chromium(served):
  webdriver = pytest.importorskip("selenium.webdriver")
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  port, tok, sampler = served[:3]
  options = webdriver.ChromeOptions()
  options.binary_location = _chromium()
  for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
    options.add_argument(flag)
  driver_path = shutil.which("chromedriver")
  service = webdriver.ChromeService(executable_path=driver_path) if driver_path else None
  driver = webdriver.Chrome(options=options, service=service)
  try:
    driver.get(f"http://127.0.0.1:{port}/")
    wait = WebDriverWait(driver, 60)
    for name, value in (("temperature", "0"), ("max_tokens", "8")):
      box = driver.find_element(By.ID, name)
      box.clear()
      box.send_keys(value)

    def ask(text):
      driver.find_element(By.ID, "input").send_keys(text)
      driver.find_element(By.ID, "send").click()
      wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle"
                 and "tok/s" in d.find_element(By.ID, "status").text)
      return driver.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1].get_attribute("textContent")

    first = ask("Hello there")
    history = _chat("Hello there")
    assert first == _expected(tok, sampler, history, temperature=0.0, top_k=50, max_tokens=8, seed=0)
    second = ask("And now?")  # the page sends the whole conversation
    history += [{"role": "assistant", "content": first}] + _chat("And now?")
    assert len(driver.find_elements(By.CSS_SELECTOR, ".message")) == 4
    assert second == _expected(tok, sampler, history, temperature=0.0, top_k=50, max_tokens=8,
                                       seed=0)
    driver.find_element(By.ID, "new").click()
    assert driver.find_elements(By.CSS_SELECTOR, ".message") == []
    assert driver.find_element(By.ID, "stop").get_attribute("disabled") is not None
  finally:
    driver.quit()
