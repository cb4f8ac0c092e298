"""Conversation rendering: ids and loss mask on worked examples; fitting a chat to the context."""
import pytest

from lmtiny.corpus.embedded import iter_embedded_documents
from lmtiny.tokenizer import (fit_conversation, render_conversation, render_for_completion, TokenizerError,
                              train_tokenizer)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  docs = list(iter_embedded_documents(100_000))
  return train_tokenizer(docs, 512, str(tmp_path_factory.mktemp("chat") / "tok"))


def test_worked_example_with_system_and_tools(tok):
  messages = [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "What is 2+2?"},
      {"role": "assistant", "content": [
          {"type": "text", "text": "Let me check."},
          {"type": "python", "text": "print(2+2)"},
          {"type": "python_output", "text": "4"},
          {"type": "text", "text": "It is 4."}]},
      {"role": "user", "content": "Thanks"},
      {"role": "assistant", "content": "You're welcome."},
  ]
  ids, mask = render_conversation(tok, messages, max_len=10_000)
  e = tok.encode
  # Ids 1..9 are <|bos|> <|user_start|> <|user_end|> <|assistant_start|> <|assistant_end|>
  # <|python_start|> <|python_end|> <|output_start|> <|output_end|>.
  expected = [
      ([1, 2], 0), (e("Be brief.\n\nWhat is 2+2?"), 0), ([3, 4], 0),
      (e("Let me check."), 1), ([6], 1), (e("print(2+2)"), 1), ([7], 1),
      ([8], 0), (e("4"), 0), ([9], 0),
      (e("It is 4."), 1), ([5], 1),
      ([2], 0), (e("Thanks"), 0), ([3, 4], 0),
      (e("You're welcome."), 1), ([5], 1),
  ]
  assert ids == [i for chunk, _ in expected for i in chunk]
  assert mask == [m for chunk, m in expected for _ in chunk]
  trained = tok.decode([i for i, m in zip(ids, mask) if m])
  assert trained == "Let me check.print(2+2)It is 4.You're welcome."


def test_truncation_keeps_ids_and_mask_aligned(tok):
  messages = [{"role": "user", "content": "hi " * 50}, {"role": "assistant", "content": "yo " * 50}]
  full_ids, full_mask = render_conversation(tok, messages, max_len=10_000)
  ids, mask = render_conversation(tok, messages, max_len=20)
  assert len(ids) == len(mask) == 20 and ids == full_ids[:20] and mask == full_mask[:20]


def test_special_text_in_messages_stays_text(tok):
  ids, _ = render_conversation(tok, [{"role": "user", "content": "<|assistant_end|>"},
                                    {"role": "assistant", "content": "<|bos|>"}])
  assert ids.count(5) == 1 and ids.count(1) == 1     # only the structural ones


@pytest.mark.parametrize("messages, message", [
    ([], "no messages"),
    ([{"role": "assistant", "content": "x"}], "message 0 has role 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected 'assistant'"),
    ([{"role": "system", "content": "s"}], "followed by a user"),
    ([{"role": "user", "content": "a"},
      {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], "unknown assistant part"),
])
def test_bad_conversations(tok, messages, message):
  with pytest.raises(TokenizerError, match=message):
    render_conversation(tok, messages)


def test_render_for_completion(tok):
  messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
  prompt = render_for_completion(tok, messages)
  assert prompt == [1, 2] + tok.encode("Hello") + [3, 4]
  assert render_for_completion(tok, messages[:1]) == prompt


def _exchanges(n, text):
  return [{"role": role, "content": f"{role} {i}: {text}"} for i in range(n) for role in ("user", "assistant")]


def test_fit_keeps_a_short_history_under_a_long_reply_limit(tok):
  # A reply limit of the whole context (255 of 256, the server's default) reserves only half of
  # it, so a short chat keeps its history; the reply stops at the context's end instead.
  messages = _exchanges(1, "What does os.path.join do?") + [{"role": "user", "content": "And split?"}]
  kept, ids = fit_conversation(tok, messages, 256, 255)
  assert 20 < len(ids) < 128 and kept == messages and ids == render_for_completion(tok, messages)


def test_fit_drops_the_oldest_exchanges_of_a_chat_that_does_not_fit(tok):
  messages = _exchanges(6, "tell me about the standard library") + [{"role": "user", "content": "last"}]
  context, max_new = 256, 255
  room = context // 2
  assert len(render_for_completion(tok, messages)) > context - room
  kept, ids = fit_conversation(tok, messages, context, max_new)
  k = len(messages) - len(kept)
  assert k > 0 and k % 2 == 0 and kept == messages[k:]  # whole exchanges, oldest first
  assert len(ids) <= context - room < len(render_for_completion(tok, messages[k - 2:]))
  # A leading system message stays while the exchanges after it are dropped.
  system = [{"role": "system", "content": "Be brief."}]
  kept, ids = fit_conversation(tok, system + messages, context, max_new)
  assert kept[0] == system[0] and kept[1:] == messages[len(messages) - len(kept) + 1:]
  assert ids == render_for_completion(tok, kept) and len(ids) <= context - room
  # A reply limit under half the context is reserved in full (so more history stays).
  kept, ids = fit_conversation(tok, messages, context, 100)
  k_small = len(messages) - len(kept)
  assert 0 < k_small < k and len(ids) <= context - 100 < len(render_for_completion(tok, messages[k_small - 2:]))
