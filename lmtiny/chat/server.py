"""The chat server: a standard-library HTTP server speaking OpenAI's API over the batching engine.

  GET  /                       the chat page (lmtiny.chat.page), which talks to /v1/chat/completions
  GET  /favicon.ico            its icon
  GET  /health                 {"ok": true, "step": ..., "context": ..., "default_max_tokens": ...}
  GET  /v1/models              the one model ({"object": "list", "data": [{"id": ..., ...}]})
  POST /v1/chat/completions    OpenAI's chat completions, streamed (server-sent `data: {chunk}` events,
                               then `data: [DONE]`) or not (lmtiny.chat.api lists the fields)
  POST /v1/completions         OpenAI's completions, with logprobs and echo
  GET  /tokenizer_info         vLLM's tokenizer endpoints, which lm-eval's local-completions uses
  POST /tokenize, /detokenize  (tokenizer_backend="remote"): text <-> token ids

Requests run on one BatchEngine (lmtiny.chat.batching): each joins the running batch at the next
decode call whatever its settings and leaves when done, so many clients share the model; a
reply is the same whether it ran alone or beside others. With an API key (`api_key`), everything
but the page, its icon and /health needs `Authorization: Bearer KEY` (401 otherwise); the page
asks for the key. Errors are OpenAI's {"error": {"message", "type", "param", "code"}}.

Robustness: a negative or non-integer Content-Length, JSON nested too deeply, a message holding a
lone surrogate: 400; a body over MAX_BODY_BYTES: 413; a request's headers and body get
READ_TIMEOUT_S in all from its start (headers that do not arrive: the connection closes; a body:
408, then the connection closes); more than max_queue jobs waiting for a slot: 503 with
Retry-After; the listen backlog (LISTEN_BACKLOG) holds a burst of simultaneous connections; a
client that hangs up (before or during its reply) ends its request quietly and frees its slot.
"""
from __future__ import annotations

import hmac
import io
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from lmtiny.chat.api import ApiError, parse_chat, parse_completion, shown
from lmtiny.chat.page import favicon_ico, render_page
from lmtiny.chat.replies import chat_chunks, chat_reply, Service, text_chunks, text_reply

MAX_BODY_BYTES = 1 << 20
# Seconds a client gets to send a request, its headers and body together (not per read: bytes
# trickled one at a time buy no time); a socket write that blocks this long (a client that stopped
# reading) ends the reply too.
READ_TIMEOUT_S = 5.0
# Connections the kernel queues before the server accepts them (the standard library's 5 reset
# 7 of 20 simultaneous clients); Linux caps it at net.core.somaxconn (4096 by default).
LISTEN_BACKLOG = 1024
RETRY_AFTER_S = 1
POST_PATHS = ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize")


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
  service: Service = None   # set by make_server
  info: dict = {}
  api_key: str | None = None
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

  def _error(self, e: ApiError):
    headers = {}
    if e.status == 503:
      headers["Retry-After"] = str(RETRY_AFTER_S)
    if e.status == 401:
      headers["WWW-Authenticate"] = "Bearer"
    if e.status in (400, 401, 404, 405, 408, 411, 413):  # the body may be unread or half read: no reuse
      self.close_connection = True
      headers["Connection"] = "close"
    self._json(e.status, e.body(), headers)

  def _path(self) -> str:
    return self.path.split("?", 1)[0]

  def _authorize(self) -> None:
    if self.api_key is None:
      return
    given = self.headers.get("Authorization", "")
    if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), self.api_key.encode())):
      raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY' with the "
                          "server's --api-key", code="invalid_api_key")

  def do_GET(self):
    path, service = self._path(), self.service
    try:
      if path in ("/", "/index.html"):
        page = render_page(service.default_max_tokens, service.context, needs_key=self.api_key is not None)
        self._send(200, "text/html; charset=utf-8", page.encode())
      elif path == "/favicon.ico":
        self._send(200, "image/x-icon", favicon_ico(), {"Cache-Control": "max-age=86400"})
      elif path == "/health":
        self._json(200, {"ok": True, **self.info, "context": service.context,
                         "default_max_tokens": service.default_max_tokens})
      elif path in ("/v1/models", f"/v1/models/{service.model}"):
        self._authorize()
        models = service.models()
        self._json(200, models if path == "/v1/models" else models["data"][0])
      elif path == "/tokenizer_info":
        self._authorize()
        self._json(200, service.tokenizer_info())
      elif path in POST_PATHS:
        raise ApiError(405, f"{path}: use POST", code="method_not_allowed")
      else:
        raise ApiError(404, f"{path}: not found", code="unknown_url")
    except ApiError as e:
      self._error(e)

  def do_POST(self):
    path, service = self._path(), self.service
    try:
      if path not in POST_PATHS:
        raise ApiError(404, f"{path}: not found", code="unknown_url")
      self._authorize()
      body = self._read_json()
      if path in ("/tokenize", "/detokenize"):
        self._json(200, service.tokenize(body) if path == "/tokenize" else service.detokenize(body))
        return
      chat = path == POST_PATHS[0]
      parse = parse_chat if chat else parse_completion
      request = parse(body, service.tok, service.context, service.default_max_tokens)
      run = service.start(request)
    except ApiError as e:
      self._error(e)
      return
    try:
      if request.settings.stream:
        self._stream(chat_chunks(run) if chat else text_chunks(run))
      else:
        self._json(200, chat_reply(run) if chat else text_reply(run))
    except ApiError as e:  # generation failed before the reply started
      self._error(e)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
      self.close_connection = True  # the page's stop button, a closed tab, a client that stopped reading
    finally:
      run.cancel()  # frees the slots of choices still running (a client gone); a no-op otherwise

  def _stream(self, payloads):
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Cache-Control", "no-cache")
    self.end_headers()
    try:
      for payload in payloads:
        self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
        self.wfile.flush()
    except ApiError as e:  # mid-stream: the error as an event, as OpenAI sends it
      self.wfile.write(f"data: {json.dumps(e.body())}\n\n".encode())
    self.wfile.write(b"data: [DONE]\n\n")
    self.wfile.flush()

  def _content_length(self) -> int:
    text = self.headers.get("Content-Length")
    if text is None:
      raise ApiError(411, "Content-Length: required")
    try:
      length = int(text)
    except ValueError:
      raise ApiError(400, f"Content-Length: {shown(text)} is not an integer") from None
    if length < 0:
      raise ApiError(400, f"Content-Length={length}: must be >= 0")
    if length > MAX_BODY_BYTES:
      raise ApiError(413, f"body: {length} bytes, at most {MAX_BODY_BYTES}")
    return length

  def _read_body(self, length: int) -> bytes:
    """The body, read by the request's deadline (READ_TIMEOUT_S from its start, headers included)."""
    chunks, left = [], length
    try:
      while left:
        chunk = self.rfile.read1(min(left, 1 << 16))
        if not chunk:
          raise ApiError(400, f"body: the connection ended after {length - left} of the "
                                  f"{length} bytes that Content-Length announced")
        chunks.append(chunk)
        left -= len(chunk)
    except TimeoutError:
      raise ApiError(408, f"body: {length - left} of {length} bytes (Content-Length) arrived in "
                              f"{self.timeout:g} s") from None
    finally:
      self.connection.settimeout(self.timeout)
    return b"".join(chunks)

  def _read_json(self):
    data = self._read_body(self._content_length())
    try:
      return json.loads(data or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ApiError(400, f"body: invalid JSON ({e})") from None
    except RecursionError:
      raise ApiError(400, "body: JSON nested too deeply") from None


class ChatHTTPServer(ThreadingHTTPServer):
  """A thread per connection, a listen backlog for bursts, and threads that do not hold up exit."""
  request_queue_size = LISTEN_BACKLOG
  daemon_threads = True


def make_server(service: Service, host: str = "127.0.0.1", port: int = 8000, info: dict | None = None,
                read_timeout_s: float = READ_TIMEOUT_S, api_key: str | None = None):
  """A ChatHTTPServer (not started: call serve_forever, or run it in a thread)."""
  handler = type("ChatHandler", (Handler,), {"service": service, "info": dict(info or {}),
                                             "timeout": read_timeout_s, "api_key": api_key})
  return ChatHTTPServer((host, port), handler)
