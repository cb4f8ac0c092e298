"""Conversations to token ids and a loss mask that trains only on what the assistant writes.

A conversation is a list of messages `{"role": ..., "content": ...}`: an optional "system"
message first (merged into the first user turn, as nanochat does), then "user" and "assistant"
turns alternating, starting with "user". An assistant's content is a string or a list of parts
`{"type": "text" | "python" | "python_output", "text": str}`.

Rendering, with the mask (1 = a target the model is trained to produce) under each piece:

  <|bos|> <|user_start|> user text <|user_end|> <|assistant_start|> reply <|assistant_end|>
     0          0            0          0               0              1          1
  inside a reply:  <|python_start|> code <|python_end|>   <|output_start|> output <|output_end|>
                          1           1        1                 0            0         0
Tool output comes from the tool, not the model, so it is never trained on. `mask[i]` belongs to
`ids[i]`: the loss on predicting token i counts iff mask[i] == 1.
"""
from __future__ import annotations

from typing import Sequence

from lmtiny.tokenizer.spm import Tokenizer, TokenizerError

_PART_TOKENS = {"python": ("python_start", "python_end", 1),
                "python_output": ("output_start", "output_end", 0)}


def _merged_turns(messages: Sequence[dict]) -> list[dict]:
  """Checks roles and merges a leading system message into the first user turn."""
  if not messages:
    raise TokenizerError("conversation: no messages")
  messages = list(messages)
  if messages[0].get("role") == "system":
    if len(messages) < 2 or messages[1].get("role") != "user":
      raise TokenizerError("conversation: a system message must be followed by a user message")
    merged = dict(messages[1], content=f"{messages[0]['content']}\n\n{messages[1]['content']}")
    messages = [merged] + messages[2:]
  for i, message in enumerate(messages):
    expected = "user" if i % 2 == 0 else "assistant"
    if message.get("role") != expected:
      raise TokenizerError(f"conversation: message {i} has role {message.get('role')!r}, "
                           f"expected {expected!r}")
  return messages


def _assistant_parts(content) -> list[dict]:
  if isinstance(content, str):
    return [{"type": "text", "text": content}]
  for part in content:
    if part.get("type") not in ("text", *_PART_TOKENS):
      raise TokenizerError(f"conversation: unknown assistant part type {part.get('type')!r}")
  return list(content)


def render_conversation(tok: Tokenizer, messages: Sequence[dict],
                        max_len: int = 2048) -> tuple[list[int], list[int]]:
  """Token ids of a conversation and their loss mask, both truncated to `max_len`."""
  ids, mask = [], []

  def add(new_ids, value):
    ids.extend(new_ids)
    mask.extend([value] * len(new_ids))

  add([tok.bos_id], 0)
  for message in _merged_turns(messages):
    if message["role"] == "user":
      if not isinstance(message["content"], str):
        raise TokenizerError("conversation: user content must be a string")
      add([tok.special_id("user_start")], 0)
      add(tok.encode(message["content"]), 0)
      add([tok.special_id("user_end")], 0)
      continue
    add([tok.special_id("assistant_start")], 0)
    for part in _assistant_parts(message["content"]):
      if part["type"] == "text":
        add(tok.encode(part["text"]), 1)
      else:
        start, end, value = _PART_TOKENS[part["type"]]
        add([tok.special_id(start)], value)
        add(tok.encode(part["text"]), value)
        add([tok.special_id(end)], value)
    add([tok.special_id("assistant_end")], 1)
  return ids[:max_len], mask[:max_len]


def render_for_completion(tok: Tokenizer, messages: Sequence[dict]) -> list[int]:
  """Prompt ids for sampling the next assistant reply: drops a trailing assistant message and
  ends with <|assistant_start|>."""
  messages = list(messages)
  if messages and messages[-1].get("role") == "assistant":
    messages = messages[:-1]
  ids, _ = render_conversation(tok, messages, max_len=1 << 62)
  return ids + [tok.special_id("assistant_start")]


_NO_LIMIT = 1 << 62


def _rendered_len(tok, messages: Sequence[dict]) -> int:
  """Tokens the messages add after <|bos|> (a trailing assistant message counted, if any)."""
  return len(render_conversation(tok, messages, max_len=_NO_LIMIT)[0]) - 1


def fit_conversation(tok: Tokenizer, messages: Sequence[dict], context: int,
                     max_new_tokens: int) -> tuple[list[dict], list[int]]:
  """The prompt for the next reply within a context of `context` tokens: the oldest exchanges
  (a user and an assistant message; a leading system message stays) are dropped until
  min(max_new_tokens, context // 2) new tokens fit after it. The cap keeps a long reply limit
  (up to the whole context) from costing the history; a reply that runs past the room left stops
  at the context's end. The last user message is always kept (the prompt may still be too long).
  Returns (messages kept, ids).

  Linear in the history's length: each exchange is rendered once and lengths are summed from the
  end (rendering is additive: <|bos|>, each message's ids, <|assistant_start|>; only a leading
  system message merges into the first kept user message, so that one is rendered per candidate
  start). Rendering the remaining conversation after every drop took 19 s for 2,000 messages."""
  messages = list(messages)
  head = messages[:1] if messages and messages[0].get("role") == "system" else []
  turns = messages[len(head):]
  limit = context - min(max_new_tokens, context // 2)
  # Exchanges of two messages (the last may be one); a trailing assistant message is not part of
  # the prompt (render_for_completion drops it), so it does not count.
  exchanges = [turns[i:i + 2] for i in range(0, len(turns), 2)]
  if exchanges and exchanges[-1][-1].get("role") == "assistant":
    exchanges[-1] = exchanges[-1][:1]
  lengths = [_rendered_len(tok, e) for e in exchanges]
  after = [0] * (len(exchanges) + 1)  # after[s]: tokens of exchanges s+1.. (all but the first kept)
  for s in range(len(exchanges) - 1, 0, -1):
    after[s - 1] = after[s] + lengths[s]
  start = 0
  while len(turns) - 2 * start > 2:  # as the reference: never drop the last two messages
    if 2 + after[start] <= limit:  # the first kept exchange may fit: render it (merged with the system message)
      first = _rendered_len(tok, head + exchanges[start]) if head else lengths[start]
      if 2 + first + after[start] <= limit:
        break
    start += 1
  kept = head + turns[2 * start:]
  return kept, render_for_completion(tok, kept)
