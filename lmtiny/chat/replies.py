"""Running an API request (lmtiny.chat.api) on the batching engine and shaping OpenAI's replies.

`Service` owns the engine and the tokenizer; `Service.start(request)` queues the request's jobs
(one per prompt and choice) and returns a `Run`, whose `events()` yields each choice's new text as
it becomes final (lmtiny.model.sampling.TextStream: cut before a stop string, whole UTF-8
characters) and then its end; a choice that meets a stop string frees its slot at once. The
functions below turn a finished or streaming run into OpenAI's JSON (chat.completion,
chat.completion.chunk, text_completion, logprobs, usage).
"""
from __future__ import annotations

import queue
import time
import uuid
from typing import Iterator, Sequence

from lmtiny.chat.api import ApiError, check_unicode, Prompt, Request, shown
from lmtiny.chat.batching import BatchEngine, EngineBusy, Failed, Job, Tokens
from lmtiny.model.sampling import TextStream
from lmtiny.tokenizer import Tokenizer

TOKEN_TEXT_WINDOW = 8  # ids decoded before a token to find its own text (a piece's leading space)


class Service:
  """What the HTTP handlers share: the engine, the tokenizer, the limits and the model's name."""

  def __init__(self, engine: BatchEngine, tokenizer: Tokenizer, *, max_tokens: int, model: str = "lmtiny"):
    self.engine, self.tok, self.model = engine, tokenizer, model
    self.context = engine.context
    self.default_max_tokens = min(max_tokens, self.context - 1)
    self.created = int(time.time())

  def start(self, request: Request) -> Run:
    """Queues the request's jobs (ApiError 503 when the queue is full; 400 when they could never
    fit in it)."""
    run = Run(self, request)
    if len(run.jobs) > self.engine.max_queue:
      raise ApiError(400, f"n x prompts: {len(run.jobs)} sequences, but at most {self.engine.max_queue} may wait "
                          "(the server's --max-queue)", "n")
    try:
      self.engine.submit(run.jobs)
    except EngineBusy as e:
      raise ApiError(503, str(e), code="overloaded") from None
    return run

  def models(self) -> dict:
    return {"object": "list", "data": [{"id": self.model, "object": "model", "created": self.created,
                                        "owned_by": "lmtiny", "max_model_len": self.context}]}

  # vLLM's tokenizer endpoints, which lm-eval's local-completions uses (tokenizer_backend="remote").

  def tokenizer_info(self) -> dict:
    """A generated <|bos|> starts a new document: the end of this one."""
    bos = "<|bos|>"
    return {"bos_token": bos, "eos_token": bos, "pad_token": None, "model_max_length": self.context,
            "tokenizer_class": "lmtiny"}

  def tokenize(self, body) -> dict:
    """{"prompt": text, "add_special_tokens": false} -> {"tokens": ids}. Text is never parsed for
    chat tokens, except a prompt that is exactly one (how a client asks for its id)."""
    prompt = body.get("prompt") if isinstance(body, dict) else None
    if not isinstance(prompt, str):
      raise ApiError(400, f"prompt: must be a string, got {shown(prompt)}", "prompt")
    check_unicode(prompt, "prompt")
    specials = self.tok.special_ids
    ids = [specials[prompt]] if prompt in specials else self.tok.encode(prompt)
    if body.get("add_special_tokens") is True:
      ids = [self.tok.bos_id] + ids
    return {"tokens": ids, "count": len(ids), "max_model_len": self.context}

  def detokenize(self, body) -> dict:
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                               and 0 <= t < self.tok.vocab_size for t in tokens):
      raise ApiError(400, f"tokens: must be a list of token ids in [0, {self.tok.vocab_size})", "tokens")
    return {"prompt": self.tok.decode(tokens)}


class Choice:
  """One choice's text, tokens and end, as its tokens arrive."""

  def __init__(self, index: int, prompt: Prompt, tok, stop: Sequence[str]):
    self.index, self.prompt = index, prompt
    self.stream = TextStream(tok, stop)
    self.text, self.ids, self.logprobs, self.top = "", [], [], []
    self.reason: str | None = None

  def add(self, event: Tokens) -> str:
    self.ids += event.ids
    self.logprobs += event.logprobs
    self.top += event.top
    new = self.stream.add(event.ids)
    if self.stream.stopped:
      self.reason = "stop"
    self.text += new
    return new

  def end(self, reason: str) -> str:
    rest = self.stream.finish()
    self.text += rest
    self.reason = self.reason or reason
    return rest


class Run:
  """A request's jobs in flight (none for an echo of max_tokens 0: its choices are done at once)."""

  def __init__(self, service: Service, request: Request):
    self.service, self.request = service, request
    self.id = ("chatcmpl-" if request.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    self.created = int(time.time())
    s = request.settings
    self.choices = [Choice(p * s.n + j, prompt, service.tok, s.stop)
                    for p, prompt in enumerate(request.prompts) for j in range(s.n)]
    self._events: queue.Queue = queue.Queue()
    self.jobs = []
    for c in self.choices:
      if s.max_tokens == 0:  # an echo that only scores the prompt: done at once
        c.reason = "length"
      else:
        self.jobs.append(Job(c.prompt.ids, s.max_tokens, s.sampling, seed=s.seed, stream=c.index % s.n,
                             events=self._events, index=c.index))

  def events(self) -> Iterator[tuple[Choice, str, bool]]:
    """(choice, new text, whether the choice is done) until every choice is done."""
    left = sum(c.reason is None for c in self.choices)
    while left:
      job, event = self._events.get()
      choice = self.choices[job.index]
      if choice.reason is not None:  # ended by a stop string: what comes after is dropped
        continue
      if isinstance(event, Failed):
        self.cancel()
        raise ApiError(500, event.message)
      text = choice.add(event) if isinstance(event, Tokens) else choice.end(event.reason)
      if isinstance(event, Tokens) and choice.reason is not None:
        job.cancelled = True
      done = choice.reason is not None
      left -= done
      yield choice, text, done

  def finish(self) -> None:
    """Waits for every choice."""
    for _ in self.events():
      pass

  def cancel(self) -> None:
    for job in self.jobs:
      job.cancelled = True

  def usage(self) -> dict:
    prompt = sum(len(p.ids) for p in self.request.prompts)
    completion = sum(len(c.ids) for c in self.choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

  def lmtiny(self) -> dict:
    """The extension field: how the chat was fitted to the context."""
    return {"trimmed": self.request.trimmed, "unanswered": self.request.unanswered}

  def _head(self, kind: str) -> dict:
    return {"id": self.id, "object": kind, "created": self.created, "model": self.service.model}


# ---------------------------------------------------------------------------------------------
# Replies.


def chat_reply(run: Run) -> dict:
  run.finish()
  choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
              "finish_reason": c.reason} for c in run.choices]
  return {**run._head("chat.completion"), "choices": choices, "usage": run.usage(), "lmtiny": run.lmtiny()}


def chat_chunks(run: Run) -> Iterator[dict]:
  """chat.completion.chunk payloads: a role chunk per choice, its text, its finish_reason (with
  the `lmtiny` field), and usage last when asked for."""
  head = run._head("chat.completion.chunk")

  def chunk(index, delta, reason=None):
    return {**head, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]}

  for c in run.choices:
    yield chunk(c.index, {"role": "assistant", "content": ""})
  for c, text, done in run.events():
    if text:
      yield chunk(c.index, {"content": text})
    if done:
      yield {**chunk(c.index, {}, c.reason), "lmtiny": run.lmtiny()}
  if run.request.settings.include_usage:
    yield {**head, "choices": [], "usage": run.usage()}


def _token_texts(tok, before: Sequence[int], ids: Sequence[int]) -> list[str]:
  """Each id's own text, given the ids before it (a piece's leading space shows only after others)."""
  context, out = list(before[-TOKEN_TEXT_WINDOW:]), []
  for t in ids:
    out.append(_token_text(tok, context, t))
    context = (context + [t])[-TOKEN_TEXT_WINDOW:]
  return out


def _token_text(tok, context: Sequence[int], token: int) -> str:
  """The text a token adds after `context`; a token that adds none, or only part of a UTF-8
  character (a byte piece), is named by its piece (e.g. <0xE2>, <|assistant_end|>) so that
  alternatives stay apart."""
  head = tok.decode(list(context))
  text = tok.decode(list(context) + [token])
  text = text[len(head):] if text.startswith(head) else tok.decode([token])
  if text and "\ufffd" not in text:
    return text
  return tok.id_to_piece(token) if hasattr(tok, "id_to_piece") else f"<{token}>"


def _logprobs(tok, before: list[int], ids: list[int], logprobs: list, top: list, n: int, offset: int) -> dict:
  """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs (the n most likely, as
  {text: logprob}) and text_offset."""
  texts = _token_texts(tok, before, ids)
  tops, offsets = [], []
  for i, (text, alternatives) in enumerate(zip(texts, top)):
    context = (before + ids[:i])[-TOKEN_TEXT_WINDOW:]
    tops.append(None if alternatives is None or n == 0 else
                {_token_text(tok, context, t): lp for t, lp in alternatives[:n]})
    offsets.append(offset)
    offset += len(text)
  return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def _echo_logprobs(run: Run, prompt: Prompt) -> tuple[list, list]:
  """The shown prompt tokens' log-probabilities and alternatives (None for a first token that has
  nothing before it)."""
  scored = run.service.engine.score(prompt.ids)
  logprobs = [float(x) for x in scored.logprob]
  top = [list(zip(map(int, i), map(float, p))) for i, p in zip(scored.top_ids, scored.top_logprobs)]
  if len(prompt.shown) == len(prompt.ids):  # nothing before the first token
    return [None] + logprobs, [None] + top
  return logprobs, top


def text_reply(run: Run) -> dict:
  run.finish()
  request, tok = run.request, run.service.tok
  choices, scored = [], {}
  for c in run.choices:
    text = (c.prompt.text if request.echo else "") + c.text
    logprobs = None
    if request.logprobs is not None:
      ids, lps, top = list(c.ids), list(c.logprobs), list(c.top)
      before, offset = list(c.prompt.ids), len(c.prompt.text)
      if request.echo:
        key = id(c.prompt)
        scored[key] = scored.get(key) or _echo_logprobs(run, c.prompt)
        ids, lps, top = c.prompt.shown + ids, scored[key][0] + lps, scored[key][1] + top
        before, offset = c.prompt.ids[:len(c.prompt.ids) - len(c.prompt.shown)], 0
      logprobs = _logprobs(tok, before, ids, lps, top, request.logprobs, offset)
    choices.append({"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": c.reason})
  return {**run._head("text_completion"), "choices": choices, "usage": run.usage()}


def text_chunks(run: Run) -> Iterator[dict]:
  """text_completion payloads as the text arrives (the echoed prompt first), each choice's last
  with its finish_reason, and usage last when asked for."""
  head = run._head("text_completion")

  def chunk(index, text, reason=None):
    return {**head, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]}

  if run.request.echo:
    for c in run.choices:
      yield chunk(c.index, c.prompt.text, c.reason)
  for c, text, done in run.events():
    if text or done:
      yield chunk(c.index, text, c.reason if done else None)
  if run.request.settings.include_usage:
    yield {**head, "choices": [], "usage": run.usage()}
