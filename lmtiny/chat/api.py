"""OpenAI's API over the batching engine: request bodies checked and turned into jobs, and the
jobs' tokens turned into OpenAI's replies (lmtiny.chat.server carries them over HTTP).

  /v1/chat/completions  messages (an optional system message, then user and assistant alternating,
                        ending with the user's; content a string or a list of text parts); long
                        chats lose their oldest exchanges first (lmtiny.tokenizer.fit_conversation),
                        and an exchange whose assistant message is empty (a reply stopped before
                        its first token) is left out: the reply's `lmtiny` field counts both.
  /v1/completions       prompt: a string, a list of strings, a list of token ids or a list of
                        those; a string is a new document (<|bos|> + its tokens), token ids are
                        taken as they are. `echo` puts the prompt before the reply and, with
                        `logprobs`, the prompt tokens' log-probabilities (the first token of token-id
                        prompts has none); max_tokens 0 with echo only scores the prompt (what
                        lm-eval's local-completions asks for log-likelihoods).

Both take max_tokens (chat also max_completion_tokens), temperature (default 1), top_p (1),
top_k (an extension, 0 = off), seed (default: a random one), n, stop (up to MAX_STOP strings; the
reply ends before the first), stream (server-sent chunks; stream_options.include_usage adds a
last chunk with usage); unknown fields are ignored. A reply ends with finish_reason "stop" (the
model ended its turn or document, or a stop string) or "length" (max_tokens, or the context's
end). Log-probabilities are the model's (before temperature and filters). Errors are ApiError:
OpenAI's {"error": {"message", "type", "param", "code"}} with an HTTP status.
"""
from __future__ import annotations

import dataclasses
import math
import secrets

from lmtiny.chat.batching import TOP_LOGPROBS
from lmtiny.model.sampling import SamplingParams
from lmtiny.tokenizer import fit_conversation

MAX_N = 16            # choices per request
MAX_PROMPTS = 64      # prompts per completions request
MAX_STOP = 4          # stop strings (OpenAI's limit)
MAX_SEED = 2**31 - 1


class ApiError(Exception):
  """An error the client gets: status, message, and the request field it is about (param)."""

  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status, self.param, self.code = status, param, code

  @property
  def type(self) -> str:
    if self.status == 401:
      return "authentication_error"
    return "server_error" if self.status >= 500 else "invalid_request_error"

  def body(self) -> dict:
    return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def shown(value) -> str:
  """A short description of a client's value for an error message (never a deep or huge repr)."""
  if isinstance(value, (str, int, float)) or value is None:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
  return f"a JSON {'array' if isinstance(value, list) else 'object'}"


def _number(body: dict, key: str, default, cast, low, high):
  value = body.get(key)
  if value is None:
    return default
  if isinstance(value, float) and not math.isfinite(value):  # JSON's NaN / Infinity (int() would raise)
    raise ApiError(400, f"{key}: must be a finite number, got {shown(value)}", key)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or cast(value) != value:
    raise ApiError(400, f"{key}: must be {'an integer' if cast is int else 'a number'}, got {shown(value)}", key)
  if not low <= value <= high:
    raise ApiError(400, f"{key}={value}: must be in [{low}, {high}]", key)
  return cast(value)


def check_unicode(text: str, where: str) -> None:
  """JSON's "\\ud800" decodes to a lone surrogate, which no tokenizer can encode."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ApiError(400, f"{where}: not valid Unicode (a lone surrogate U+{ord(text[e.start]):04X} at "
                        f"character {e.start})", where) from None


@dataclasses.dataclass
class Settings:
  """What every choice of a request shares."""
  max_tokens: int
  sampling: SamplingParams
  seed: int
  n: int
  stop: list[str]
  stream: bool
  include_usage: bool


@dataclasses.dataclass
class Prompt:
  ids: list[int]
  text: str           # what echo shows
  shown: list[int]    # the ids echo shows (without a <|bos|> the server added)


@dataclasses.dataclass
class Request:
  kind: str   # "chat" | "text"
  prompts: list[Prompt]
  settings: Settings
  echo: bool = False
  logprobs: int | None = None
  trimmed: int = 0
  unanswered: int = 0


def _settings(body: dict, context: int, default_max_tokens: int, *, least_tokens: int = 1) -> Settings:
  max_tokens = _number(body, "max_tokens", None, int, least_tokens, context - 1)
  if max_tokens is None:
    max_tokens = _number(body, "max_completion_tokens", default_max_tokens, int, least_tokens, context - 1)
  temperature = _number(body, "temperature", 1.0, float, 0.0, 2.0)
  top_p = _number(body, "top_p", 1.0, float, 0.0, 1.0)
  if top_p == 0:
    raise ApiError(400, "top_p=0: must be in (0, 1]", "top_p")
  top_k = _number(body, "top_k", 0, int, 0, 1 << 20)
  seed = _number(body, "seed", None, int, 0, MAX_SEED)
  n = _number(body, "n", 1, int, 1, MAX_N)
  stop = body.get("stop")
  stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
    raise ApiError(400, f"stop: must be a non-empty string or a list of at most {MAX_STOP}, got {shown(body['stop'])}",
                   "stop")
  for i, s in enumerate(stop):
    check_unicode(s, f"stop[{i}]")
  stream = body.get("stream", False)
  if not isinstance(stream, bool):
    raise ApiError(400, f"stream: must be true or false, got {shown(stream)}", "stream")
  options = body.get("stream_options") or {}
  if not isinstance(options, dict):
    raise ApiError(400, f"stream_options: must be an object, got {shown(options)}", "stream_options")
  return Settings(max_tokens, SamplingParams(temperature, top_k, top_p),
                  secrets.randbelow(MAX_SEED + 1) if seed is None else seed, n, stop, stream,
                  bool(options.get("include_usage")))


def _content(message) -> str | None:
  """A message's text: a string, or a list of {"type": "text", "text": ...} parts (None: neither)."""
  content = message.get("content")
  if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                       isinstance(p.get("text"), str) for p in content):
    content = "".join(p["text"] for p in content)
  return content if isinstance(content, str) else None


def _without_unanswered(messages: list[dict], system: int) -> list[dict]:
  """The messages less each exchange whose assistant message is empty (a stopped reply)."""
  kept = messages[:system]
  for i in range(system, len(messages), 2):
    exchange = messages[i:i + 2]
    if len(exchange) == 2 and exchange[1]["content"] == "":
      continue
    kept += exchange
  return kept


def _messages(body: dict) -> tuple[list[dict], int]:
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise ApiError(400, "messages: must be a non-empty list", "messages")
  system = int(isinstance(messages[0], dict) and messages[0].get("role") in ("system", "developer"))
  out = []
  for i, m in enumerate(messages):
    role = "system" if i < system else "user" if (i - system) % 2 == 0 else "assistant"
    content = _content(m) if isinstance(m, dict) else None
    if content is None or m.get("role") not in ((role, "developer") if role == "system" else (role,)):
      raise ApiError(400, f'messages[{i}]: must be {{"role": "{role}", "content": <string>}} '
                          "(an optional system message first, then user and assistant alternate, "
                          "starting with user)", f"messages[{i}]")
    check_unicode(content, f"messages[{i}].content")
    out.append({"role": role, "content": content})
  if (len(messages) - system) % 2 == 0:
    raise ApiError(400, "messages: the last message must be the user's", "messages")
  return out, system


def parse_chat(body, tok, context: int, default_max_tokens: int) -> Request:
  """A checked chat request with its prompt fitted to the context (ApiError otherwise)."""
  if not isinstance(body, dict):
    raise ApiError(400, "body: must be a JSON object")
  messages, system = _messages(body)
  settings = _settings(body, context, default_max_tokens)
  answered = _without_unanswered(messages, system)
  kept, ids = fit_conversation(tok, answered, context, settings.max_tokens)
  if len(ids) >= context:
    what = "the system and last messages are" if system else "the last message is"
    raise ApiError(413, f"messages: {what} {len(ids)} tokens with the chat tokens, but the "
                        f"model's context is {context}; send something shorter", "messages",
                   "context_length_exceeded")
  return Request("chat", [Prompt(ids, "", [])], settings, trimmed=len(answered) - len(kept),
                 unanswered=len(messages) - len(answered))


def _prompts(value, tok) -> list[Prompt]:
  def is_ids(x):
    return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
  if isinstance(value, str) or is_ids(value):
    value = [value]
  if not isinstance(value, list) or not value or not all(isinstance(p, str) or is_ids(p) for p in value):
    raise ApiError(400, "prompt: must be a string, a list of strings, a list of token ids or a list of "
                        f"those, got {shown(value)}", "prompt")
  if len(value) > MAX_PROMPTS:
    raise ApiError(400, f"prompt: {len(value)} prompts, at most {MAX_PROMPTS}", "prompt")
  out = []
  for i, p in enumerate(value):
    if isinstance(p, str):
      check_unicode(p, f"prompt[{i}]")
      ids = tok.encode(p)
      out.append(Prompt([tok.bos_id] + ids, p, ids))
    else:
      if not all(0 <= t < tok.vocab_size for t in p):
        raise ApiError(400, f"prompt[{i}]: token ids must be in [0, {tok.vocab_size})", "prompt")
      out.append(Prompt(list(p), tok.decode(p), list(p)))
  return out


def parse_completion(body, tok, context: int, default_max_tokens: int) -> Request:
  """A checked completions request (ApiError otherwise)."""
  if not isinstance(body, dict):
    raise ApiError(400, "body: must be a JSON object")
  echo = body.get("echo", False)
  if not isinstance(echo, bool):
    raise ApiError(400, f"echo: must be true or false, got {shown(echo)}", "echo")
  body = dict(body, max_tokens=body.get("max_tokens", 16))  # OpenAI's default for completions
  settings = _settings(body, context, default_max_tokens, least_tokens=0 if echo else 1)
  logprobs = _number(body, "logprobs", None, int, 0, TOP_LOGPROBS)
  prompts = _prompts(body.get("prompt"), tok)
  for i, p in enumerate(prompts):
    room = context if settings.max_tokens == 0 else context - 1
    if len(p.ids) > room:
      raise ApiError(413, f"prompt[{i}]: {len(p.ids)} tokens, but the model's context is {context}", "prompt",
                     "context_length_exceeded")
  if settings.stream and logprobs is not None:
    raise ApiError(400, "logprobs: not available with stream (ask without streaming)", "logprobs")
  return Request("text", prompts, settings, echo=echo, logprobs=logprobs)
