"""The chat server over HTTP: streamed replies equal the sampler's, concurrent requests equal
sequential ones, new sampling settings compile nothing, bad requests get 4xx JSON (bad
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

import pytest
from flax import nnx

from chat_fixtures import chat_config, make_tokenizer
from lmtiny import serve
from lmtiny.chat.page import render_page
from lmtiny.chat.server import ChatEngine, make_server
from lmtiny.model.sampling import Sampler, SamplingParams
from lmtiny.model.transformer import Transformer
from lmtiny.tokenizer import render_for_completion

CONTEXT = 64


def _serve(context, **engine_kw):
  tok = make_tokenizer()
  cfg = chat_config(tok)
  cfg.model.max_seq_len = context
  sampler = Sampler(Transformer(cfg.model, nnx.Rngs(0)), chunk=4)  # as lmtiny.serve streams
  engine = ChatEngine(sampler, tok, context, max_batch=4, **engine_kw)
  server = make_server(engine, port=0, info={"step": 0})
  threading.Thread(target=server.serve_forever, daemon=True).start()
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
  server, tok, sampler = _serve(256)
  yield server.server_address[1], tok, sampler
  server.shutdown()
  server.server_close()


def _get(port, path):
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
  conn.request("GET", path)
  data = conn.getresponse().read().decode()
  conn.close()
  return data


def _post(port, body, raw=None):
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
  data = raw if raw is not None else json.dumps(body).encode()
  conn.request("POST", "/chat/completions", body=data, headers={"Content-Type": "application/json"})
  response = conn.getresponse()
  payload = response.read().decode()
  conn.close()
  if response.getheader("Content-Type") == "text/event-stream":
    events = [json.loads(chunk[6:]) for chunk in payload.split("\n\n") if chunk.startswith("data: ")]
    return response.status, events
  return response.status, json.loads(payload)


def _reply(events):
  return "".join(e.get("token", "") for e in events), events[-1]


def _expected(tok, sampler, messages, *, temperature, top_k, max_tokens, seed):
  ids = render_for_completion(tok, messages)
  out = sampler.generate([ids], max_new_tokens=max_tokens, sampling=SamplingParams(temperature, top_k, 1.0),
                         seed=0, rows=[seed], stop_ids=(tok.special_id("assistant_end"), tok.bos_id))
  return tok.decode(out.tokens[0])


def _chat(text):
  return [{"role": "user", "content": text}]


def test_stream_is_the_samplers_reply(served):
  port, tok, sampler = served[:3]
  for temperature, seed in ((0.0, 0), (0.9, 7)):
    body = dict(messages=_chat("What does os.path.join do?"), temperature=temperature, top_k=20,
                max_tokens=10, seed=seed)
    status, events = _post(port, body)
    text, done = _reply(events)
    assert status == 200 and done["done"] and len(events) > 2  # streamed in pieces
    assert text == _expected(tok, sampler, body["messages"], temperature=temperature, top_k=20,
                             max_tokens=10, seed=seed)
    assert done["tokens"] <= 10 and done["finish_reason"] in ("stop", "length") and done["trimmed"] == 0


@pytest.mark.slow(seconds=6)
def test_concurrent_requests_give_the_sequential_replies(served):
  port = served[0]
  # The stream test's settings, so the batch-1 programs are compiled already.
  bodies = [dict(messages=_chat(f"Question number {i}?" + " more" * i), temperature=0.9, top_k=20,
                 max_tokens=10, seed=i) for i in range(4)]
  sequential = [_reply(_post(port, b)[1])[0] for b in bodies]
  results = [None] * 4
  barrier = threading.Barrier(4)

  def client(i):
    barrier.wait()
    results[i] = _reply(_post(port, bodies[i])[1])[0]

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
  status, events = _post(port, dict(messages=messages, temperature=0.0, max_tokens=8))
  text, done = _reply(events)
  assert status == 200 and done["trimmed"] >= 2 and done["trimmed"] % 2 == 0
  kept = messages[done["trimmed"]:]
  assert len(render_for_completion(tok, kept)) <= CONTEXT - 8 < len(render_for_completion(tok, messages[done["trimmed"] - 2:]))
  assert text == _expected(tok, sampler, kept, temperature=0.0, top_k=50, max_tokens=8, seed=0)


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
  status, events = _post(port, dict(messages=messages, temperature=0.0, max_tokens=page_max_tokens))
  text, done = _reply(events)
  assert status == 200 and done["trimmed"] == 0
  assert text == _expected(tok, sampler, messages, temperature=0.0, top_k=50, max_tokens=255, seed=0)
  assert done["tokens"] <= 256 - len(ids)
  assert (done["finish_reason"] == "length") == (len(ids) + done["tokens"] == 256)
  # An explicit limit past the context is still the client's error.
  status, payload = _post(port, dict(messages=messages, max_tokens=256))
  assert status == 400 and payload["error"].startswith("max_tokens=256: must be in [1, 255]")


def test_a_system_message_comes_first(served):
  port, tok, sampler = served[:3]
  messages = [{"role": "system", "content": "Answer briefly."}] + _chat("What does os.path.join do?")
  status, events = _post(port, dict(messages=messages, temperature=0.0, top_k=20, max_tokens=10))
  text, done = _reply(events)
  assert status == 200 and done["done"] and done["trimmed"] == 0
  assert text == _expected(tok, sampler, messages, temperature=0.0, top_k=20, max_tokens=10, seed=0)


@pytest.mark.parametrize("body, status, message", [
    (b"{nope", 400, "invalid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"messages": []}, 400, "messages: must be a non-empty list"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages\\[0\\]"),
    ({"messages": [{"role": "user", "content": 3}]}, 400, "messages\\[0\\]"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages\\[0\\]"),
    ({"messages": _chat("a") + [{"role": "system", "content": "s"}] + _chat("b")}, 400, "messages\\[1\\]"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]}, 400,
     'messages\\[1\\]: must be {"role": "user"'),
    ({"messages": [{"role": "system", "content": "s"}]}, 400, "last message must be the user's"),
    ({"messages": _chat("a") + [{"role": "assistant", "content": "b"}]}, 400, "last message must be the user's"),
    ({"messages": _chat("a"), "temperature": "hot"}, 400, "temperature: must be a number"),
    ({"messages": _chat("a"), "top_k": 2.5}, 400, "top_k: must be an integer"),
    ({"messages": _chat("a"), "max_tokens": CONTEXT}, 400, f"max_tokens={CONTEXT}"),
    ({"messages": _chat("word " * 200)}, 413, "context is 64"),
])
def test_bad_requests_get_a_4xx_json_error(served, body, status, message):
  port = served[0]
  got_status, payload = _post(port, None, raw=body if isinstance(body, bytes) else json.dumps(body).encode())
  assert got_status == status
  assert pytest.importorskip("re").search(message, payload["error"])


def test_other_paths_and_methods(served):
  port = served[0]
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
  for method, path, status in (("GET", "/nope", 404), ("GET", "/chat/completions", 405), ("POST", "/x", 404)):
    conn.request(method, path, body=b"{}" if method == "POST" else None)
    response = conn.getresponse()
    assert response.status == status and "error" in json.loads(response.read())
  conn.request("GET", "/health")
  assert json.loads(conn.getresponse().read()) == {"ok": True, "step": 0, "context": CONTEXT, "default_max_tokens": 12}
  conn.request("GET", "/")
  page = conn.getresponse().read().decode()
  assert "/chat/completions" in page and 'id="stop"' in page
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
  return (f"POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
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
  assert status == 400 and json.loads(body) == {"error": message} and headers["Connection"] == "close"


def test_a_body_shorter_than_its_content_length_times_out_with_408(served):
  engine = _handler(served).engine
  server = make_server(engine, port=0, read_timeout_s=0.5)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    port = server.server_address[1]
    started = time.monotonic()
    status, _, body = _raw(port, _post_head("100", b'{"messages": '), timeout=10)
    assert status == 408 and json.loads(body)["error"] == "body: 13 of 100 bytes (Content-Length) arrived in 0.5 s"
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
    assert status == 400 and "ended after 6 of the 100 bytes" in json.loads(body)["error"]
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
  assert status == 400 and json.loads(body)["error"].startswith(message)


def test_an_exchange_with_an_empty_reply_is_left_out(served):
  port, tok, sampler = served[:3]
  stopped = _chat("first question") + [{"role": "assistant", "content": ""}]
  answered = _chat("second question") + [{"role": "assistant", "content": "an answer"}]
  messages = stopped + answered + stopped + _chat("third question")
  status, events = _post(port, dict(messages=messages, temperature=0.0, max_tokens=8))
  text, done = _reply(events)
  assert status == 200 and done["unanswered"] == 4 and done["trimmed"] == 0
  want_messages = answered + _chat("third question")
  assert text == _expected(tok, sampler, want_messages, temperature=0.0, top_k=50, max_tokens=8, seed=0)
  # With a system message too; a final empty reply is still refused (the last message is the user's).
  system = [{"role": "system", "content": "Be brief."}]
  status, events = _post(port, dict(messages=system + stopped + _chat("q"), temperature=0.0, max_tokens=8))
  assert status == 200 and _reply(events)[1]["unanswered"] == 2
  status, payload = _post(port, dict(messages=_chat("q") + [{"role": "assistant", "content": ""}]))
  assert status == 400 and "last message must be the user's" in payload["error"]


def test_new_sampling_settings_compile_nothing(served):
  port = served[0]
  messages = _chat("Which module reads CSV files?")
  _post(port, dict(messages=messages, temperature=0.8, top_k=50, max_tokens=6))  # compiles (if needed)
  lowered = []

  def listener(event, duration_secs, **kwargs):
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      lowered.append(event)
  jax = pytest.importorskip("jax")
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for temperature, top_k in ((0.3, 5), (1.7, 0), (0.0, 50), (1.0, 200), (0.55, 1), (0.8, 999), (2.5, 64)):
      status, events = _post(port, dict(messages=messages, temperature=temperature, top_k=top_k, max_tokens=6))
      assert status == 200 and _reply(events)[1]["done"]
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
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
  assert json.loads(body) == {"error": "messages[0].content: not valid Unicode (a lone surrogate U+D800 at character 3)"}


def _own_server(served, read_timeout_s):
  """A second server on the module's engine, with its own read timeout."""
  server = make_server(_handler(served).engine, port=0, read_timeout_s=read_timeout_s)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server


def test_headers_trickled_a_byte_at_a_time_get_no_more_than_the_deadline(served):
  # Before: each byte reset a per-read timeout, so one header byte every 0.5 s held a thread for
  # ever. Now headers and body together have READ_TIMEOUT_S (here 1.5 s) from the request's start.
  server = _own_server(served, 1.5)
  try:
    with socket.create_connection(server.server_address, timeout=1) as conn:
      started = time.monotonic()
      conn.sendall(b"POST /chat/completions HTTP/1.1\r\n")
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
  status, events = _post(port, dict(messages=_chat("Hi"), max_tokens=2))  # still serving
  assert status == 200 and events[-1]["done"]
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Exception" not in err, err[-3000:]


class _BlockedSampler:
  """Generates nothing until released: requests pile up in the queue."""

  def __init__(self):
    self.release = threading.Event()

  def generate(self, prompts, *, on_finish, **kwargs):
    self.release.wait(60)
    for row in range(len(prompts)):
      on_finish(row)


def test_a_full_queue_answers_503_with_retry_after():
  tok = make_tokenizer()
  sampler = _BlockedSampler()
  engine = ChatEngine(sampler, tok, CONTEXT, max_batch=1, max_queue=2)
  server = make_server(engine, port=0)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    first = engine.submit(engine.parse({"messages": _chat("a")}))
    for _ in range(500):  # the worker takes it into a batch (and blocks there)
      if engine._waiting == 0:
        break
      time.sleep(0.01)
    waiting = [engine.submit(engine.parse({"messages": _chat(c)})) for c in "bc"]
    body = json.dumps({"messages": _chat("d")}).encode()
    status, headers, payload = _raw(server.server_address[1], _post_head(str(len(body)), body))
    assert status == 503 and headers["Retry-After"] == "1"
    assert json.loads(payload) == {"error": "busy: 2 requests are waiting; retry in a moment"}
    sampler.release.set()
    for request in [first] + waiting:
      assert request.events.get(timeout=30)["done"]
  finally:
    sampler.release.set()
    server.shutdown()
    server.server_close()


def test_a_hundred_simultaneous_clients_are_all_answered(served):
  """Loopback, 100 clients at once (the old listen backlog of 5 reset some): each gets a complete
  reply, 200 with a finished stream or 503 with Retry-After; every socket has a timeout."""
  port = served[0]
  clients = 100
  results = [None] * clients
  barrier = threading.Barrier(clients)
  body = json.dumps(dict(messages=_chat("Hi"), temperature=0.0, max_tokens=2)).encode()

  def client(i):
    try:
      barrier.wait(timeout=30)
      conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
      conn.request("POST", "/chat/completions", body=body, headers={"Content-Type": "application/json"})
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
      assert '"done": true' in payload.split("\n\n")[-2]
    else:
      assert retry_after == "1" and json.loads(payload)["error"].startswith("busy:")
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
                                  Error, Object, Promise, console});
vm.runInContext(require("fs").readFileSync(0, "utf8"), context);
const tick = () => new Promise((r) => setTimeout(r, 10));
const done = 'data: {"done": true, "finish_reason": "stop", "tokens": 1, "trimmed": 0, "ttft_s": 0.1, "tokens_per_s": null}\n\n';
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
  await ask("second", 'data: {"token": "Hi"}\n\n' + done, false);  // a reply
  await ask("third", null, true);                                  // stopped before its first token again
  await ask("fourth", done, false);                                // a reply with no text
  await ask("fifth", 'data: {"token": "Yes"}\n\n' + done, false);
  const log = document.getElementById("log").children.map((c) => [c.className, c.textContent]);
  console.log(JSON.stringify({sent: sent.map((b) => b.messages), log}));
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
  classes = [c for c, _ in result["log"]]
  assert classes[:2] == ["message user unanswered", "message assistant stopped unanswered"]
  assert classes[2:4] == ["message user", "message assistant"]


@pytest.mark.parametrize("flag, value, message", [
    ("--max-tokens", "0", "--max-tokens=0: must be >= 1"),
    ("--chunk", "0", "--chunk=0: must be >= 1"),
    ("--max-batch", "-1", "--max-batch=-1: must be >= 1"),
    ("--max-queue", "0", "--max-queue=0: must be >= 1"),
    ("--port", "70000", "--port=70000: must be in [0, 65535]"),
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
