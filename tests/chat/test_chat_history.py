"""Fitting a chat history into the context (lmtiny.tokenizer.fit_conversation): the same messages and ids as
dropping the oldest exchange and rendering again, with each message encoded about once."""
import numpy as np
import pytest

from chat_fixtures import make_tokenizer
from lmtiny.tokenizer import fit_conversation, render_for_completion, TokenizerError


class CountingTokenizer:
  """The tokenizer, counting encode calls and the characters they encode."""

  def __init__(self, tok):
    self.tok, self.calls, self.chars = tok, 0, 0

  def encode(self, text):
    self.calls += 1
    self.chars += len(text)
    return self.tok.encode(text)

  def __getattr__(self, name):
    return getattr(self.tok, name)


def _reference(tok, messages, context, max_new_tokens):
  """The quadratic definition: drop the oldest exchange, render everything again."""
  head = messages[:1] if messages and messages[0].get("role") == "system" else []
  turns = messages[len(head):]
  room = min(max_new_tokens, context // 2)
  ids = render_for_completion(tok, head + turns)
  while len(ids) > context - room and len(turns) > 2:
    turns = turns[2:]
    ids = render_for_completion(tok, head + turns)
  return head + turns, ids


WORDS = "the path join file name list dict open read write value key sort".split()


def _history(rng, exchanges, *, system=False, trailing_assistant=False):
  def text():
    return " ".join(rng.choice(WORDS, int(rng.integers(0, 12))))
  messages = [{"role": "system", "content": "Answer briefly. " + text()}] if system else []
  for _ in range(exchanges):
    messages += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
  if not trailing_assistant:
    messages.append({"role": "user", "content": text()})
  return messages


@pytest.fixture(scope="module")
def tok():
  return make_tokenizer()


def test_same_messages_and_ids_as_dropping_and_rendering_again(tok):
  rng = np.random.default_rng(0)
  cases = 0
  for exchanges in (0, 1, 2, 5, 12):
    for system in (False, True):
      for trailing_assistant in (False, True):
        if exchanges == 0 and trailing_assistant:
          continue
        messages = _history(rng, exchanges, system=system, trailing_assistant=trailing_assistant)
        for context, max_new in ((16, 4), (64, 12), (64, 64), (128, 30), (1024, 100)):
          assert fit_conversation(tok, messages, context, max_new) == _reference(tok, messages, context, max_new)
          cases += 1
  assert cases == 5 * 18


def test_a_long_history_is_encoded_about_once(tok):
  rng = np.random.default_rng(1)
  for system in (False, True):
    messages = _history(rng, 1000, system=system)
    counting = CountingTokenizer(tok)
    kept, ids = fit_conversation(counting, messages, 256, 64)
    head, tail = kept[:system], kept[system:]
    assert kept == head + messages[-len(tail):] and ids == render_for_completion(tok, kept)
    # It fits, and one more exchange would not.
    assert len(ids) <= 256 - 64 < len(render_for_completion(tok, head + messages[-len(tail) - 2:]))
    # Every message once, the kept ones once more, and a few first exchanges merged with the
    # system message; the reference encodes ~500x more (each drop renders the rest again).
    total = sum(len(m["content"]) for m in messages)
    assert counting.calls <= len(messages) + len(kept) + 10
    assert counting.chars <= total + sum(len(m["content"]) for m in kept) + 1000


def test_bad_conversations_still_raise(tok):
  with pytest.raises(TokenizerError, match="no messages"):
    fit_conversation(tok, [], 64, 8)
  with pytest.raises(TokenizerError, match="system message must be followed"):
    fit_conversation(tok, [{"role": "system", "content": "s"}], 64, 8)
