"""`train_tokenizer`: lossless sentencepiece BPE from an iterable of documents.

Settings and why:
  - identity normalisation, no dummy prefix, extra whitespace kept, whitespace-only pieces
    allowed, byte fallback: `decode(encode(s)) == s` and runs of spaces (code indentation) get
    their own pieces.
  - sentencepiece trains on lines, so documents are split at "\\n"; newline pieces are fixed
    user-defined symbols (ids 10..31, see core): "\\n", "\\n\\n" and "\\n" + indentation
    (1..16 spaces, 1..4 tabs), so newlines never merge into words and an indented line break
    costs one token (+8% bytes/token on code, and on hard-wrapped indented prose).
  - digits: `pairs` (default) lets pieces hold at most two digits, `single` splits every digit
    (sentencepiece's split_digits). Pairs are done by cutting digit runs into pairs with
    sentencepiece's training-only pretokenization delimiter, so no piece of 3+ digits exists.
  - split_by_unicode_script off by default: it keeps "'" apart from letters ("That's").
  - character_coverage < 1 leaves the rarest characters to byte fallback instead of spending
    vocabulary on them; the report counts how many training characters needed it.
Output, written atomically (built in a temp dir next to `out_dir`, then renamed): the model,
a vocab listing, `token_bytes.npy` and `report.json`.
"""
from __future__ import annotations

import io
import json
import os
import re
import time
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from lmtiny.fs.atomic import atomic_directory
from lmtiny.tokenizer.spm import (MODEL_FILE, NEWLINE_PIECES, NUM_RESERVED_IDS, REPORT_FILE, SPACE_SYMBOL,
                                   SPECIAL_TOKENS, TOKEN_BYTES_FILE, Tokenizer, TokenizerError, VOCAB_FILE)

DIGIT_MODES = ("pairs", "single")
MIN_VOCAB_SIZE = 512
MAX_SENTENCE_CHARS = 4096          # longer lines are cut at a space into training sentences
_PRETOKEN_DELIMITER = "\x1f"       # training-only cut mark (unit separator)
_DIGIT_RUN = re.compile(r"[0-9]{3,}")
_OUTPUT_FILES = (MODEL_FILE, VOCAB_FILE, TOKEN_BYTES_FILE, REPORT_FILE)


def check_vocab_size(vocab_size: int):
  if vocab_size % 128 or vocab_size < MIN_VOCAB_SIZE:
    raise TokenizerError(f"vocab_size {vocab_size}: must be a multiple of 128 and at least "
                         f"{MIN_VOCAB_SIZE}")


def _pair_digits(line: str) -> str:
  def cut(match):
    run = match.group()
    return _PRETOKEN_DELIMITER.join(run[i:i + 2] for i in range(0, len(run), 2))
  return _DIGIT_RUN.sub(cut, line)


def training_sentences(doc: str) -> Iterator[str]:
  """A document as sentencepiece training sentences: its lines, long ones cut near a space."""
  for line in doc.split("\n"):
    while line:
      if len(line) <= MAX_SENTENCE_CHARS:
        piece, line = line, ""
      else:
        cut = line.rfind(" ", MAX_SENTENCE_CHARS // 2, MAX_SENTENCE_CHARS)
        cut = cut if cut > 0 else MAX_SENTENCE_CHARS
        piece, line = line[:cut], line[cut:]
      yield piece


def count_byte_fallback_chars(sentences: list[str], tok: Tokenizer) -> int:
  """Characters of `sentences` that have no piece of their own (so encode falls back to bytes)."""
  known = {tok.id_to_piece(i) for i in range(NUM_RESERVED_IDS, tok.vocab_size)}
  known = {p.replace(SPACE_SYMBOL, " ") for p in known if len(p) == 1} | {"\n"}
  unknown = re.compile("[^" + "".join(re.escape(c) for c in sorted(known)) + "]")
  return sum(len(unknown.findall(s)) for s in sentences)


def check_out_dir(out_dir: str) -> None:
  """An existing out_dir must be a tokenizer directory (replaced) or empty: checked before the
  (long) training and again before the result is written."""
  if os.path.isdir(out_dir):
    stray = set(os.listdir(out_dir)) - set(_OUTPUT_FILES)
    if stray:
      raise TokenizerError(f"{out_dir}: exists and holds other files ({sorted(stray)[0]}, ...); "
                           "choose a new --out")
  elif os.path.exists(out_dir):
    raise TokenizerError(f"{out_dir}: exists and is not a directory")


def _vocab_listing(tok: Tokenizer, sp_scores: list[float]) -> str:
  return "".join(f"{i}\t{json.dumps(tok.id_to_piece(i), ensure_ascii=False)}\t{s:g}\n"
                 for i, s in enumerate(sp_scores))


def _training_error(message: str, vocab_size: int) -> str:
  """sentencepiece's failure as one line a user can act on."""
  too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", message)
  if too_high:
    return (f"vocab_size {vocab_size}: the training text only supports {too_high.group(2)} "
            "pieces; give more text or a smaller vocab")
  too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
  if too_small:
    return (f"vocab_size {vocab_size}: too small for the {too_small.group(2)} pieces required "
            "(reserved ids + characters); raise it or lower character_coverage")
  lines = message.strip().splitlines() or ["unknown error"]
  return f"sentencepiece training failed for vocab_size {vocab_size}: {lines[-1]}"


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str, *, seed: int = 0,
                    num_threads: int = 2, digits: str = "pairs",
                    split_by_unicode_script: bool = False, character_coverage: float = 0.9999,
                    max_piece_length: int = 16, report_extra: dict | None = None,
                    verbose: bool = False) -> Tokenizer:
  """Trains a BPE tokenizer on documents and writes it to `out_dir`; returns it.

  Deterministic: the same documents, vocab size and options give byte-identical models.
  """
  check_vocab_size(vocab_size)
  if digits not in DIGIT_MODES:
    raise TokenizerError(f"digits {digits!r}: expected one of {', '.join(DIGIT_MODES)}")
  start = time.perf_counter()
  sentences, num_docs, num_chars = [], 0, 0
  for doc in texts:
    num_docs += 1
    num_chars += len(doc)
    sentences.extend(training_sentences(doc))
  if not sentences:
    raise TokenizerError("no training text: the sources produced no characters")
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=map(_pair_digits, sentences) if digits == "pairs" else iter(sentences),
        model_writer=model, model_type="bpe",
        vocab_size=vocab_size, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        control_symbols=list(SPECIAL_TOKENS),
        user_defined_symbols=[p.replace(" ", SPACE_SYMBOL) for p in NEWLINE_PIECES],
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, byte_fallback=True,
        split_digits=(digits == "single"), split_by_number=True,
        split_by_unicode_script=split_by_unicode_script,
        pretokenization_delimiter=_PRETOKEN_DELIMITER if digits == "pairs" else "",
        character_coverage=character_coverage, max_sentencepiece_length=max_piece_length,
        max_sentence_length=4 * MAX_SENTENCE_CHARS + 16, input_sentence_size=0,
        shuffle_input_sentence=False, num_threads=num_threads,
        minloglevel=0 if verbose else 2)
  except RuntimeError as e:
    raise TokenizerError(_training_error(str(e), vocab_size)) from None
  train_seconds = time.perf_counter() - start
  tok = Tokenizer(model.getvalue())
  fallback = count_byte_fallback_chars(sentences, tok)
  report = dict(
      vocab_size=vocab_size, seed=seed, digits=digits,
      split_by_unicode_script=split_by_unicode_script, character_coverage=character_coverage,
      max_piece_length=max_piece_length, documents=num_docs, characters=num_chars,
      training_sentences=len(sentences), byte_fallback_chars=fallback,
      byte_fallback_fraction=fallback / max(num_chars, 1), train_seconds=round(train_seconds, 2),
      hash=tok.hash, special_tokens={t: tok.special_id(t) for t in SPECIAL_TOKENS},
      **(report_extra or {}))
  check_out_dir(out_dir)  # an existing out_dir is replaced only when it is a tokenizer dir or empty
  with atomic_directory(out_dir, replace=True) as tmp_dir:
    with open(os.path.join(tmp_dir, MODEL_FILE), "wb") as f:
      f.write(tok.model_proto)
    scores = [tok.piece_score(i) for i in range(tok.vocab_size)]
    with open(os.path.join(tmp_dir, VOCAB_FILE), "w", encoding="utf-8") as f:
      f.write(_vocab_listing(tok, scores))
    np.save(os.path.join(tmp_dir, TOKEN_BYTES_FILE), tok.token_bytes)
    with open(os.path.join(tmp_dir, REPORT_FILE), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2, ensure_ascii=False)
      f.write("\n")
  return tok
