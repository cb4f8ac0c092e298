"""The spelling task (nanochat's SpellingBee): how many times does a letter occur in a word?

Items are built from an English word list (dwyl/english-words' words_alpha.txt, one word a line),
as nanochat builds its test split: item i draws from random.Random(10_000_000 + i) a word, then
with probability 0.9 one of its letters and otherwise any letter a-z, in nanochat's order of
draws, so the (word, letter, answer) items are nanochat's for the same list. The question's
wording is ours (a few phrasings, drawn after the letter). The reply is generative and scored as
GSM8K is: exact match of the number after `####` (lmtiny.tasks.gsm8k.extract_answer).

The list is read from DATA_DIR/words_alpha.txt, or downloaded once into ~/.cache/lmtiny.
"""
from __future__ import annotations

import os
import random
import string
import urllib.request
from urllib.parse import urlsplit

from lmtiny.corpus.hub import probe
from lmtiny.data.dataset import DEFAULT_CACHE_DIR
from lmtiny.fs.atomic import atomic_write
from lmtiny.tasks.gsm8k import extract_answer
from lmtiny.tasks.rows import EvalDataError, read_text

WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
WORD_LIST_FILE = "words_alpha.txt"
TEST_SEED_OFFSET = 10_000_000   # above the list's length: test items never share a seed with train ones
TEST_ITEMS = 256                # nanochat's chat_eval size
DOWNLOAD_SECONDS = 60
_PHRASINGS = ("How many {letter} are in the word {word}", "Count the letter {letter} in {word}",
              "How many times does {letter} occur in {word}", "In {word}, how many {letter} are there",
              "What is the number of {letter} in {word}", "{word}: how many {letter}")


def _reachable(url: str) -> str | None:
  """None if a connection to the URL's host (or the proxy urllib would use) opens, else why not."""
  parts = urlsplit(url)
  proxy = urllib.request.getproxies().get(parts.scheme)
  if proxy and not urllib.request.proxy_bypass(parts.hostname):
    proxy_parts = urlsplit(proxy if "://" in proxy else "http://" + proxy)
    return probe(proxy_parts.hostname, proxy_parts.port or 8080)
  return probe(parts.hostname, parts.port or 443)


def _download(path: str, flag: str) -> None:
  hint = f"point {flag} at a directory holding {WORD_LIST_FILE} (from {WORD_LIST_URL})"
  reason = _reachable(WORD_LIST_URL)
  if reason:
    raise EvalDataError(f"spelling: no network ({reason}); {hint}")
  try:
    with urllib.request.urlopen(WORD_LIST_URL, timeout=DOWNLOAD_SECONDS) as response:
      data = response.read()
  except OSError as e:
    raise EvalDataError(f"spelling: cannot download {WORD_LIST_URL} ({type(e).__name__}); {hint}") from None
  os.makedirs(os.path.dirname(path), exist_ok=True)
  atomic_write(path, data)


def load_words(data_dir: str | None = None, flag: str = "--data-dir", cache_dir: str = DEFAULT_CACHE_DIR) -> list[str]:
  """The word list: DATA_DIR/words_alpha.txt when `data_dir` is given, else the cached download."""
  if data_dir:
    path = os.path.join(os.path.expanduser(data_dir), WORD_LIST_FILE)
    if not os.path.exists(path):
      raise EvalDataError(f"{flag}={data_dir}: no {WORD_LIST_FILE} (the spelling task's word list)")
  else:
    path = os.path.join(os.path.expanduser(cache_dir), WORD_LIST_FILE)
    if not os.path.exists(path):
      _download(path, flag)
  words = [line.strip() for line in read_text(path).splitlines() if line.strip()]
  if not words:
    raise EvalDataError(f"{path}: no words")
  return words


def make_item(words: list[str], index: int) -> dict:
  """Test item `index`: {"question", "word", "letter", "answer"} (answer: the count, as text)."""
  rng = random.Random(TEST_SEED_OFFSET + index)
  word = rng.choice(words)
  letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
  phrasing = rng.choice(_PHRASINGS)
  quote = rng.choice(("", "'", '"'))
  question = phrasing.format(letter=f"{quote}{letter}{quote}", word=word) + rng.choice(("?", ""))
  return {"question": question, "word": word, "letter": letter, "answer": str(word.count(letter))}


def make_rows(words: list[str], n: int = TEST_ITEMS) -> list[dict]:
  return [make_item(words, i) for i in range(n)]


def messages(row: dict) -> list[dict]:
  return [{"role": "user", "content": row["question"]}]


def reward(reply: str, row: dict) -> float:
  """1 if the number after the reply's `####` is the count."""
  return float(extract_answer(reply) == row["answer"])
