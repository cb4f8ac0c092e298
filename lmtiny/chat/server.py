"""The chat server: a standard-library HTTP server over the KV-cache sampler.

  GET  /                   the chat page (lmtiny.chat.page)
  GET  /favicon.ico        its icon
  GET  /health             {"ok": true, "step": ..., "context": ..., "default_max_tokens": ...}
  POST /chat/completions   {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...],
                            "temperature": 0.8, "top_k": 50, "max_tokens": 256, "seed": 0}
                           -> text/event-stream: `data: {"token": "..."}` events as the reply is
                              generated, then `data: {"done": true, "finish_reason": ...,
                              "tokens": n, "trimmed": k, "unanswered": u, "ttft_s": ...,
                              "tokens_per_s": ...}`

One process serves many tabs: HTTP threads hand requests to one generation thread, which runs
whatever is waiting (up to max_batch requests with the same sampling settings) as one batch of
the sampler, each row with its own random stream (seed) and stream of text, so a reply is the
same whether it ran alone or beside others. Sampling settings are runtime values of the compiled
programs: a new temperature or top-k compiles nothing. An optional system message comes first,
then user and assistant alternate. An exchange whose assistant message is empty (a reply stopped
before its first token) is left out ("unanswered" counts its messages): an empty turn would teach
the model to answer with nothing. Conversations longer than the context lose their oldest
exchanges first (lmtiny.tokenizer.fit_conversation, as `generate --chat` does, in time linear
in the history); a reply limit longer than the room left stops the reply at the context's end
(finish_reason "length"). A client that disconnects (the page's stop button) stops its row.

Robustness: bad requests get a 4xx JSON error (a negative or non-integer Content-Length, JSON
nested too deeply, a message holding a lone surrogate: 400); a request's headers and body get
READ_TIMEOUT_S in all from its start (headers that do not arrive: the connection closes; a body:
408, then the connection closes); more than max_queue requests waiting for generation get 503
with Retry-After; the listen backlog (LISTEN_BACKLOG) holds a burst of simultaneous connections;
a client that hangs up (before or during its reply) ends its request quietly.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from lmtiny.chat.page import favicon_ico, render_page
from lmtiny.model.sampling import SamplingParams, TextStream
from lmtiny.tokenizer import fit_conversation

MAX_BODY_BYTES = 1 << 20
# Seconds a client gets to send a request, its headers and body together (not per read: bytes
# trickled one at a time buy no time); a socket write that blocks this long (a client that stopped
# reading) ends the reply too.
READ_TIMEOUT_S = 5.0
# Connections the kernel queues before the server accepts them (the standard library's 5 reset
# 7 of 20 simultaneous clients); Linux caps it at net.core.somaxconn (4096 by default).
LISTEN_BACKLOG = 1024
RETRY_AFTER_S = 1


class RequestError(ValueError):
  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass
class Request:
  ids: list[int]
  temperature: float
  top_k: int
  max_tokens: int
  seed: int
  trimmed: int = 0
  unanswered: int = 0
  events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
  cancelled: bool = False
  submitted: float = dataclasses.field(default_factory=time.perf_counter)


def _shown(value) -> str:
  """A short description of a client's value for an error message (never a deep or huge repr)."""
  if isinstance(value, (str, int, float)) or value is None:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
  return f"a JSON {'array' if isinstance(value, list) else 'object'}"


def _number(body: dict, key: str, default, cast, low, high):
  value = body.get(key, default)
  if isinstance(value, float) and not math.isfinite(value):  # JSON's NaN / Infinity (int() would raise)
    raise RequestError(400, f"{key}: must be a finite number, got {_shown(value)}")
  if isinstance(value, bool) or not isinstance(value, (int, float)) or cast(value) != value:
    raise RequestError(400, f"{key}: must be {'an integer' if cast is int else 'a number'}, got {_shown(value)}")
  if not low <= value <= high:
    raise RequestError(400, f"{key}={value}: must be in [{low}, {high}]")
  return cast(value)


def _check_unicode(text: str, where: str) -> None:
  """JSON's "\\ud800" decodes to a lone surrogate, which no tokenizer can encode."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise RequestError(400, f"{where}: not valid Unicode (a lone surrogate U+{ord(text[e.start]):04X} at "
                            f"character {e.start})") from None


def _without_unanswered(messages: list[dict], system: int) -> list[dict]:
  """The messages less each exchange whose assistant message is empty (a stopped reply)."""
  kept = messages[:system]
  for i in range(system, len(messages), 2):
    exchange = messages[i:i + 2]
    if len(exchange) == 2 and exchange[1]["content"] == "":
      continue
    kept += exchange
  return kept


class ChatEngine:
  """Owns the sampler; `submit` queues a request (503 when max_queue are waiting already), a
  worker thread generates."""

  def __init__(self, sampler, tokenizer, context: int, *, max_batch: int = 4, max_tokens: int = 256,
               max_queue: int = 64, batch_window_s: float = 0.01):
    self.sampler, self.tok, self.context = sampler, tokenizer, context
    self.batch_window_s = batch_window_s
    self.max_batch, self.default_max_tokens = max_batch, min(max_tokens, context - 1)
    self.max_queue = max_queue
    self.stop_ids = (tokenizer.special_id("assistant_end"), tokenizer.bos_id)
    self._queue: queue.Queue = queue.Queue()
    self._pending: list[Request] = []
    self._waiting = 0  # submitted, not yet in a batch
    self._waiting_lock = threading.Lock()
    self._thread = threading.Thread(target=self._work, daemon=True, name="lmtiny-generate")
    self._thread.start()

  def parse(self, body) -> Request:
    """A checked request with the prompt fitted to the context (RequestError otherwise)."""
    if not isinstance(body, dict):
      raise RequestError(400, "body: must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
      raise RequestError(400, "messages: must be a non-empty list")
    system = int(isinstance(messages[0], dict) and messages[0].get("role") == "system")
    for i, m in enumerate(messages):
      role = "system" if i < system else "user" if (i - system) % 2 == 0 else "assistant"
      if not isinstance(m, dict) or m.get("role") != role or not isinstance(m.get("content"), str):
        raise RequestError(400, f'messages[{i}]: must be {{"role": "{role}", "content": <string>}} '
                                "(an optional system message first, then user and assistant alternate, "
                                "starting with user)")
      _check_unicode(m["content"], f"messages[{i}].content")
    if (len(messages) - system) % 2 == 0:
      raise RequestError(400, "messages: the last message must be the user's")
    temperature = _number(body, "temperature", 0.8, float, 0.0, 10.0)
    top_k = _number(body, "top_k", 50, int, 0, 1 << 20)
    max_tokens = _number(body, "max_tokens", self.default_max_tokens, int, 1, self.context - 1)
    seed = _number(body, "seed", 0, int, 0, 2**31 - 1)
    answered = _without_unanswered(messages, system)
    kept, ids = fit_conversation(self.tok, answered, self.context, max_tokens)
    if len(ids) >= self.context:
      what = "the system and last messages are" if system else "the last message is"
      raise RequestError(413, f"messages: {what} {len(ids)} tokens with the chat tokens, but the "
                              f"model's context is {self.context}; send something shorter")
    return Request(ids, temperature, top_k, max_tokens, seed, trimmed=len(answered) - len(kept),
                   unanswered=len(messages) - len(answered))

  def submit(self, request: Request) -> Request:
    """Queues the request, or raises RequestError(503) when max_queue requests wait already."""
    with self._waiting_lock:
      if self._waiting >= self.max_queue:
        raise RequestError(503, f"busy: {self._waiting} requests are waiting; retry in a moment")
      self._waiting += 1
    self._queue.put(request)
    return request

  def _next_batch(self) -> list[Request]:
    if not self._pending:
      self._pending.append(self._queue.get())
      time.sleep(self.batch_window_s)  # let requests sent together (several tabs) join one batch
    while True:  # everything already waiting
      try:
        self._pending.append(self._queue.get_nowait())
      except queue.Empty:
        break
    first = self._pending[0]
    key = (first.temperature, first.top_k)
    batch = [r for r in self._pending if (r.temperature, r.top_k) == key][:self.max_batch]
    self._pending = [r for r in self._pending if r not in batch]
    with self._waiting_lock:
      self._waiting -= len(batch)
    return batch

  def _work(self):
    while True:
      batch = self._next_batch()
      try:
        self._generate(batch)
      except Exception as e:  # keep serving; the requests in this batch get the error
        for r in batch:
          r.events.put({"error": f"generation failed: {type(e).__name__}: {e}"})

  def _generate(self, batch: list[Request]):
    real = len(batch)
    # Batches are padded to a power of two (repeats of the first request, stopped at once), so
    # at most log2(max_batch) + 1 batch sizes ever compile.
    size = 1 << (real - 1).bit_length()
    batch = batch + [dataclasses.replace(batch[0], events=queue.Queue(), cancelled=True)] * (size - real)
    streams = [TextStream(self.tok) for _ in batch]
    counts, first = [0] * len(batch), [None] * len(batch)

    def on_tokens(row, new_ids):
      if row >= real:
        return True
      r = batch[row]
      new_ids = new_ids[:r.max_tokens - counts[row]]
      counts[row] += len(new_ids)
      if first[row] is None:
        first[row] = time.perf_counter()
      text = streams[row].add(new_ids)
      if text:
        r.events.put({"token": text})
      return r.cancelled or counts[row] >= r.max_tokens

    def on_finish(row):
      if row >= real:
        return
      r, now = batch[row], time.perf_counter()
      rest = streams[row].finish()
      if rest:
        r.events.put({"token": rest})
      if r.cancelled:
        reason = "stopped"
      elif counts[row] >= r.max_tokens or len(r.ids) + counts[row] >= self.context:
        reason = "length"
      else:
        reason = "stop"  # <|assistant_end|> (or a new document's <|bos|>)
      decode = now - (first[row] or now)
      r.events.put({"done": True, "finish_reason": reason, "tokens": counts[row], "trimmed": r.trimmed,
                    "unanswered": r.unanswered, "ttft_s": round((first[row] or now) - r.submitted, 4),
                    "tokens_per_s": round((counts[row] - 1) / decode, 2) if decode > 0 else None})

    self.sampler.generate([r.ids for r in batch], max_new_tokens=max(r.max_tokens for r in batch),
                          sampling=SamplingParams(batch[0].temperature, batch[0].top_k, 1.0), seed=0,
                          rows=[r.seed for r in batch[:real]] + list(range(size - real)), stop_ids=self.stop_ids, on_tokens=on_tokens,
                          on_finish=on_finish)


class _DeadlineReads(io.RawIOBase):
  """A connection's reads, each allowed only the time left until `deadline` (time.monotonic()), so a
  request trickled a byte at a time gets no more time in all than one that sends nothing."""

  def __init__(self, raw, sock):
    super().__init__()
    self.raw, self.sock, self.deadline = raw, sock, None

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    if self.deadline is not None:
      left = self.deadline - time.monotonic()
      if left <= 0:
        raise TimeoutError("the request's deadline passed")
      self.sock.settimeout(left)
    return self.raw.readinto(buffer)

  def close(self) -> None:
    self.raw.close()
    super().close()


class Handler(BaseHTTPRequestHandler):
  engine: ChatEngine = None   # set by make_server
  info: dict = {}
  server_version = "lmtiny"
  timeout = READ_TIMEOUT_S    # the socket's timeout (StreamRequestHandler.setup applies it)

  def log_message(self, format, *args):  # quiet: one line per request is noise in a terminal
    pass

  def setup(self):
    super().setup()
    self._reads = _DeadlineReads(self.rfile.detach(), self.connection)
    self.rfile = io.BufferedReader(self._reads)

  def handle_one_request(self):
    """One request, its request line, headers and body read within READ_TIMEOUT_S in all (the
    standard library's TimeoutError handling then closes the connection; a late body gets 408).
    A client gone before or during the reply (a closed tab, a reset) ends it without a traceback."""
    self._reads.deadline = time.monotonic() + self.timeout
    try:
      super().handle_one_request()
    except (BrokenPipeError, ConnectionResetError):
      self.close_connection = True  # nobody to answer

  def parse_request(self) -> bool:
    ok = super().parse_request()  # the headers are read
    self.connection.settimeout(self.timeout)  # a reply's writes get the whole timeout
    return ok

  def _send(self, status: int, content_type: str, data: bytes, headers: dict | None = None):
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(data)))
    for name, value in (headers or {}).items():
      self.send_header(name, value)
    self.end_headers()
    self.wfile.write(data)

  def _json(self, status: int, payload: dict, headers: dict | None = None):
    self._send(status, "application/json", json.dumps(payload).encode(), headers)

  def _error(self, e: RequestError):
    headers = {}
    if e.status == 503:
      headers["Retry-After"] = str(RETRY_AFTER_S)
    if e.status in (400, 404, 408, 411, 413):  # the body may be unread or half read: no reuse
      self.close_connection = True
      headers["Connection"] = "close"
    self._json(e.status, {"error": str(e)}, headers)

  def do_GET(self):
    if self.path in ("/", "/index.html"):
      page = render_page(self.engine.default_max_tokens, self.engine.context).encode()
      self._send(200, "text/html; charset=utf-8", page)
    elif self.path == "/favicon.ico":
      self._send(200, "image/x-icon", favicon_ico(), {"Cache-Control": "max-age=86400"})
    elif self.path == "/health":
      self._json(200, {"ok": True, **self.info, "context": self.engine.context,
                       "default_max_tokens": self.engine.default_max_tokens})
    elif self.path == "/chat/completions":
      self._json(405, {"error": "use POST for /chat/completions"})
    else:
      self._json(404, {"error": f"{self.path}: not found"})

  def do_POST(self):
    try:
      if self.path != "/chat/completions":
        raise RequestError(404, f"{self.path}: not found")
      request = self.engine.submit(self.engine.parse(self._read_json()))
    except RequestError as e:
      self._error(e)
      return
    try:
      self.send_response(200)
      self.send_header("Content-Type", "text/event-stream")
      self.send_header("Cache-Control", "no-cache")
      self.end_headers()
      while True:
        event = request.events.get()
        self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
        self.wfile.flush()
        if "done" in event or "error" in event:
          return
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
      request.cancelled = True  # the page's stop button, a closed tab, a client that stopped reading
      self.close_connection = True

  def _content_length(self) -> int:
    text = self.headers.get("Content-Length")
    if text is None:
      raise RequestError(411, "Content-Length: required")
    try:
      length = int(text)
    except ValueError:
      raise RequestError(400, f"Content-Length: {_shown(text)} is not an integer") from None
    if length < 0:
      raise RequestError(400, f"Content-Length={length}: must be >= 0")
    if length > MAX_BODY_BYTES:
      raise RequestError(413, f"body: {length} bytes, at most {MAX_BODY_BYTES}")
    return length

  def _read_body(self, length: int) -> bytes:
    """The body, read by the request's deadline (READ_TIMEOUT_S from its start, headers included)."""
    chunks, left = [], length
    try:
      while left:
        chunk = self.rfile.read1(min(left, 1 << 16))
        if not chunk:
          raise RequestError(400, f"body: the connection ended after {length - left} of the "
                                  f"{length} bytes that Content-Length announced")
        chunks.append(chunk)
        left -= len(chunk)
    except TimeoutError:
      raise RequestError(408, f"body: {length - left} of {length} bytes (Content-Length) arrived in "
                              f"{self.timeout:g} s") from None
    finally:
      self.connection.settimeout(self.timeout)
    return b"".join(chunks)

  def _read_json(self):
    data = self._read_body(self._content_length())
    try:
      return json.loads(data or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise RequestError(400, f"body: invalid JSON ({e})") from None
    except RecursionError:
      raise RequestError(400, "body: JSON nested too deeply") from None


class ChatHTTPServer(ThreadingHTTPServer):
  """A thread per connection, a listen backlog for bursts, and threads that do not hold up exit."""
  request_queue_size = LISTEN_BACKLOG
  daemon_threads = True


def make_server(engine: ChatEngine, host: str = "127.0.0.1", port: int = 8000, info: dict | None = None,
                read_timeout_s: float = READ_TIMEOUT_S):
  """A ChatHTTPServer (not started: call serve_forever, or run it in a thread)."""
  handler = type("ChatHandler", (Handler,), {"engine": engine, "info": dict(info or {}),
                                             "timeout": read_timeout_s})
  return ChatHTTPServer((host, port), handler)
