"""Tokenizer: lossless round trip, fixed special ids, token_bytes, pickling, training checks."""
import json
import os
import pickle
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtiny.corpus.embedded import iter_embedded_documents
from lmtiny.tokenizer import SPECIAL_TOKENS, spm, Tokenizer, TokenizerError, train_tokenizer
from lmtiny.tokenizer.compare import token_counter

CORPUS_CHARS = 300_000


@pytest.fixture(scope="module")
def corpus():
  return list(iter_embedded_documents(CORPUS_CHARS))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus):
  out = str(tmp_path_factory.mktemp("tok") / "tok1024")
  train_tokenizer(corpus, 1024, out)
  return out


@pytest.fixture(scope="module")
def tok(tok_dir):
  return Tokenizer.load(tok_dir)


TRICKY = ["", " ", "  \n\n\t\t  x", "def f():\n    return 1\n", "a\u2581b\u2581", "\u2581",
          "한국어 텍스트입니다", "emoji 😀👍🏽 and ZWJ 👩‍👩‍👧", "\x00\x01\x1b[31m\x7f", "\r\n\r\n",
          "\u00a0\u3000\u2028 odd spaces", "<|bos|><|user_start|>", "12345678901234567890",
          "trailing   ", "   leading", "\ufeffbom", "ǅ ﬁ Å Å"]  # last: un-normalised forms


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky_strings(tok, text):
  assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)
       | st.lists(st.sampled_from(["  ", "\t", "\n", " ", "😀", "한", "\u2581", "\x00", "9", "a",
                                   "<|bos|>", "é", "\r"]), max_size=40).map("".join))
def test_round_trip_property(tok, text):
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert not set(ids) & set(tok.special_ids.values())
  assert spm.UNK_ID not in ids


def test_fixed_ids_and_special_tokens_never_parsed(tok):
  assert tok.bos_id == 1 and tok.special_id("bos") == 1
  assert [tok.special_id(t) for t in SPECIAL_TOKENS] == list(range(1, 10))
  assert tok.special_id("<|output_end|>") == 9
  assert tok.id_to_piece(spm.NEWLINE_ID) == "\n" and tok.id_to_piece(spm.FIRST_BYTE_ID) == "<0x00>"
  typed = "".join(SPECIAL_TOKENS)
  ids = tok.encode(typed)
  assert not set(ids) & set(range(10)) and tok.decode(ids) == typed
  assert tok.decode([1, 2, 3]) == ""                            # control ids render as nothing
  with pytest.raises(KeyError):
    tok.special_id("eos")


def test_newline_pieces_take_the_indentation(tok):
  ids = tok.encode("if x:\n    y\n\n\tz\n")
  pieces = [tok.id_to_piece(i) for i in ids]
  assert "\n\u2581\u2581\u2581\u2581" in pieces and "\n\n" in pieces and "\n" in pieces
  assert [tok.id_to_piece(spm.NEWLINE_ID + k) for k in range(len(spm.NEWLINE_PIECES))] == [
      p.replace(" ", "\u2581") for p in spm.NEWLINE_PIECES]
  assert tok.token_bytes[tok.encode("\n" + " " * 16)].sum() == 17


def test_token_bytes_sum_to_utf8_length(tok):
  tb = tok.token_bytes
  assert tb.dtype == np.int32 and tb.shape == (tok.vocab_size,)
  assert (tb[:10] == 0).all() and (tb[spm.FIRST_BYTE_ID:spm.FIRST_BYTE_ID + 256] == 1).all()
  for text in TRICKY + ["Some English prose, with punctuation; and numbers 3.14159."]:
    ids = tok.encode(text)
    assert int(tb[ids].sum()) == len(tok.decode(ids).encode("utf-8"))
  ids = [tok.bos_id] + tok.encode("x y") + [tok.special_id("assistant_end")]
  assert int(tb[ids].sum()) == 3


def test_saved_token_bytes_and_report(tok, tok_dir, corpus):
  np.testing.assert_array_equal(np.load(os.path.join(tok_dir, spm.TOKEN_BYTES_FILE)),
                                tok.token_bytes)
  report = json.load(open(os.path.join(tok_dir, spm.REPORT_FILE)))
  assert report["vocab_size"] == 1024 and report["hash"] == tok.hash
  assert report["characters"] == CORPUS_CHARS
  # Independent count: encode the corpus and count byte pieces that start a UTF-8 character.
  ids = np.concatenate([tok.encode(doc) for doc in corpus])
  byte_values = ids[(ids >= spm.FIRST_BYTE_ID) & (ids < spm.NUM_RESERVED_IDS)] - spm.FIRST_BYTE_ID
  expected = int(((byte_values & 0xC0) != 0x80).sum())
  assert report["byte_fallback_chars"] == expected > 0
  vocab_lines = open(os.path.join(tok_dir, spm.VOCAB_FILE), encoding="utf-8").read()
  assert vocab_lines.count("\n") == 1024


def test_encode_batch_matches_encode(tok, corpus):
  texts = corpus[:20] + TRICKY
  assert tok.encode_batch(texts, num_threads=2) == [tok.encode(t) for t in texts]
  long_text = "\n".join(corpus[:5])
  assert token_counter(tok)(long_text) == len(tok.encode(long_text))


def test_pickle_carries_the_model_not_a_path(tok, tok_dir, tmp_path):
  blob = pickle.dumps(tok)
  assert tok_dir.encode() not in blob
  clone = pickle.loads(blob)
  assert clone.hash == tok.hash and clone.encode("hello world") == tok.encode("hello world")


def test_hash_is_content_of_model_file(tok, tok_dir):
  import hashlib
  with open(os.path.join(tok_dir, spm.MODEL_FILE), "rb") as f:
    assert tok.hash == hashlib.sha256(f.read()).hexdigest()


def test_training_is_deterministic(corpus, tmp_path, tok, tok_dir):
  again = train_tokenizer(corpus, 1024, str(tmp_path / "again"))
  assert again.model_proto == tok.model_proto
  for name in (spm.MODEL_FILE, spm.VOCAB_FILE, spm.TOKEN_BYTES_FILE):
    assert open(tmp_path / "again" / name, "rb").read() == open(
        os.path.join(tok_dir, name), "rb").read()


def test_digit_pieces_hold_at_most_two_digits(tok, corpus, tmp_path):
  numbers = ["in 1984 and 2024, 31415926535 items cost 12,345.67"] * 200
  for digits, longest in (("pairs", 2), ("single", 1)):
    t = tok if digits == "pairs" else train_tokenizer(corpus[:10] + numbers, 512,
                                                      str(tmp_path / digits), digits=digits)
    learned = [t.id_to_piece(i) for i in range(spm.NUM_RESERVED_IDS, t.vocab_size)]
    runs = [len(r) for p in learned for r in re.findall(r"[0-9]+", p)]
    assert max(runs) == longest
    ids = t.encode("31415926535")
    assert max(len(t.id_to_piece(i)) for i in ids) <= longest


def test_vocab_size_checks(corpus, tmp_path):
  with pytest.raises(TokenizerError, match="multiple of 128"):
    train_tokenizer(corpus, 1000, str(tmp_path / "a"))
  with pytest.raises(TokenizerError, match="at least 512"):
    train_tokenizer(corpus, 384, str(tmp_path / "a"))
  many_chars = ["".join(chr(0x4E00 + i) for i in range(k, k + 50)) for k in range(0, 900, 50)]
  with pytest.raises(TokenizerError, match="vocab_size 512"):
    train_tokenizer(many_chars, 512, str(tmp_path / "a"), character_coverage=1.0)
  with pytest.raises(TokenizerError, match="only supports"):
    train_tokenizer(["tiny text"], 4096, str(tmp_path / "a"))
  assert not os.path.exists(tmp_path / "a")
  assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []   # no temp dirs left


def test_out_dir_rules(corpus, tmp_path):
  out = tmp_path / "out"
  train_tokenizer(corpus[:10], 512, str(out))
  train_tokenizer(corpus[:12], 512, str(out))      # re-training over a tokenizer dir is fine
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  with pytest.raises(TokenizerError, match="holds other files"):
    train_tokenizer(corpus[:10], 512, str(tmp_path / "mine"))
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_load_errors(tmp_path):
  with pytest.raises(TokenizerError, match="cannot read"):
    Tokenizer.load(str(tmp_path / "missing"))
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(TokenizerError, match="not a sentencepiece model"):
    Tokenizer.load(str(tmp_path / "junk.model"))
