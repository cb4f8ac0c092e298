"""An independent reference of nanochat's SFT data path (karpathy/nanochat at 92d63d4:
scripts/chat_sft.py, tasks/common.py, tasks/mmlu.py, tasks/gsm8k.py, tasks/smoltalk.py,
nanochat/tokenizer.py's render_conversation), written here from its description for the tests.

- A task's rows are read in the order np.random.default_rng(42).permutation(n) gives; a `stop`
  keeps the first `stop` of that order.
- A mixture lists (task, example) for every task in order, then random.Random(42).shuffle.
- MMLU: user "Multiple Choice question: Q\\n" + "- choice=L\\n" per choice + "\\nRespond only with the
  letter of the correct answer.", assistant the answer's letter.
- GSM8K: the answer split by re.split(r'(<<[^>]+>>)'); a `<<...>>` piece becomes a python part (the
  text before the last '=') and a python_output part (after it; the whole text and "" without '=');
  other pieces (empty ones too) are text parts.
- render: BOS (0); a leading system message is prepended to the first user message with "\\n\\n";
  user: user_start, text, user_end (all 0); assistant: assistant_start (0), then a string (1), or per
  part: text (1), python_start + code + python_end (1), output_start + output + output_end (0);
  assistant_end (1); ids and mask cut at 2048.
- rows: capacity T + 1; a buffer of 100 rendered conversations topped up before every choice;
  the longest that fits (strictly longer than the best so far, so the first of equals) goes in;
  when none fits the rest of the row is BOS with mask 0. inputs = row[:-1], targets = row[1:] with
  -1 where mask[1:] == 0 and from content_len - 1 on in a padded row.
"""
import random
import re

import numpy as np


def shuffled(n, stop=None):
  order = list(np.random.default_rng(42).permutation(n))
  return order if stop is None else order[:stop]


def mixture_pairs(lengths):
  pairs = []
  for t, n in enumerate(lengths):
    for i in range(n):
      pairs.append((t, i))
  random.Random(42).shuffle(pairs)
  return pairs


def mmlu(row):
  letters = ["A", "B", "C", "D"]
  text = "Multiple Choice question: " + row["question"] + "\n"
  for letter, choice in zip(letters, row["choices"]):
    text += "- " + choice + "=" + letter + "\n"
  text += "\nRespond only with the letter of the correct answer."
  return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": letters[row["answer"]]}]}


def gsm8k(row):
  parts = []
  for piece in re.split(r"(<<[^>]+>>)", row["answer"]):
    if piece.startswith("<<") and piece.endswith(">>"):
      inside = piece[2:-2]
      if "=" in inside:
        cut = inside.rfind("=")
        code, out = inside[:cut], inside[cut + 1:]
      else:
        code, out = inside, ""
      parts.append({"type": "python", "text": code})
      parts.append({"type": "python_output", "text": out})
    else:
      parts.append({"type": "text", "text": piece})
  return {"messages": [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": parts}]}


def smoltalk(row):
  return {"messages": row["messages"]}


def render(tok, conversation, max_tokens=2048):
  messages = [dict(m) for m in conversation["messages"]]
  if messages[0]["role"] == "system":
    messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
    messages = messages[1:]
  s = tok.special_id
  ids, mask = [tok.bos_id], [0]
  for i, m in enumerate(messages):
    assert m["role"] == ("user" if i % 2 == 0 else "assistant")
    if m["role"] == "user":
      body = [s("user_start")] + tok.encode(m["content"]) + [s("user_end")]
      ids += body
      mask += [0] * len(body)
      continue
    ids.append(s("assistant_start"))
    mask.append(0)
    content = m["content"]
    if isinstance(content, str):
      content = [{"type": "text", "text": content}]
    for part in content:
      enc = tok.encode(part["text"])
      if part["type"] == "text":
        ids += enc
        mask += [1] * len(enc)
      elif part["type"] == "python":
        ids += [s("python_start")] + enc + [s("python_end")]
        mask += [1] * (len(enc) + 2)
      else:
        ids += [s("output_start")] + enc + [s("output_end")]
        mask += [0] * (len(enc) + 2)
    ids.append(s("assistant_end"))
    mask.append(1)
  return ids[:max_tokens], mask[:max_tokens]


def sft_batches(dataset, render_fn, bos, batch_size, seq_len, buffer_size=100, rank=0, world=1):
  """Endless (inputs, targets) int64 arrays, as chat_sft's generator yields them."""
  capacity = seq_len + 1
  buffer, cursor = [], rank
  while True:
    rows, masks, lengths = [], [], []
    for _ in range(batch_size):
      row, mrow, content = [], [], None
      while len(row) < capacity:
        while len(buffer) < buffer_size:
          buffer.append(render_fn(dataset[cursor]))
          cursor = (cursor + world) % len(dataset)
        room = capacity - len(row)
        pick, pick_len = -1, 0
        for i, (ids, _) in enumerate(buffer):
          if pick_len < len(ids) <= room:
            pick, pick_len = i, len(ids)
        if pick < 0:
          content = len(row)
          row += [bos] * room
          mrow += [0] * room
          break
        ids, m = buffer.pop(pick)
        row += ids
        mrow += m
      rows.append(row)
      masks.append(mrow)
      lengths.append(capacity if content is None else content)
    rows, masks = np.array(rows, np.int64), np.array(masks, np.int64)
    inputs, targets = rows[:, :-1], rows[:, 1:].copy()
    targets[masks[:, 1:] == 0] = -1
    for r, n in enumerate(lengths):
      if n < capacity:
        targets[r, n - 1:] = -1
    yield inputs, targets


def sft_epoch(dataset, render_fn, batch_size, seq_len, grad_accum, warmdown_ratio=0.5, final_lr_frac=0.0,
              buffer_size=100, rank=0, world=1):
  """nanochat's one-epoch SFT (--num-iterations=-1) as one rank runs it: the progress its optimizer
  step s reads, one per trained step. Its generator counts `consumed` (rank, plus world per
  conversation placed) and, once a batch has been built, sets approx_progress = consumed / size and
  last_step when consumed >= size; the loop fetches the next micro-batch after each forward/backward,
  takes progress = max(progress, approx_progress), and checks last_step before each step."""
  capacity = seq_len + 1
  state = {"buffer": [], "cursor": rank, "consumed": rank, "approx": 0.0, "last": False}

  def next_batch():
    buffer = state["buffer"]
    for _ in range(batch_size):
      row = 0
      while row < capacity:
        while len(buffer) < buffer_size:
          buffer.append(len(render_fn(dataset[state["cursor"]])[0]))
          state["cursor"] = (state["cursor"] + world) % len(dataset)
        room = capacity - row
        pick, pick_len = -1, 0
        for i, n in enumerate(buffer):
          if pick_len < n <= room:
            pick, pick_len = i, n
        if pick < 0:
          break
        row += buffer.pop(pick)
        state["consumed"] += world
    state["approx"] = state["consumed"] / len(dataset)
    if state["consumed"] >= len(dataset):
      state["last"] = True

  progress, trained = 0.0, []
  next_batch()  # the loop's first prefetch
  while not state["last"]:
    for _ in range(grad_accum):
      next_batch()  # after each micro-step's forward/backward
      progress = max(progress, state["approx"])
    trained.append(progress)
  return trained


def lr_multiplier(progress, warmdown_ratio=0.5, final_lr_frac=0.0, warmup_ratio=0.0):
  """chat_sft.py's get_lr_multiplier."""
  if progress < warmup_ratio:
    return (progress + 1e-8) / warmup_ratio
  if progress <= 1.0 - warmdown_ratio:
    return 1.0
  decay = (progress - (1.0 - warmdown_ratio)) / warmdown_ratio
  return (1 - decay) * 1.0 + decay * final_lr_frac
