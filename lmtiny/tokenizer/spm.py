"""The `Tokenizer` the rest of lmtiny uses: a lossless sentencepiece BPE model with chat tokens.

Fixed ids, the same in every lmtiny tokenizer whatever its vocab size:
  0        <unk>             (never produced: unknown characters fall back to UTF-8 bytes)
  1..9     the chat tokens, `<|bos|>` = 1 ... `<|output_end|>` = 9 (SPECIAL_TOKENS order);
           sentencepiece *control* symbols, so text never encodes to them: a user typing
           "<|bos|>" gets ordinary pieces, and decode renders them as ""
  10..31   newline pieces (sentencepiece user-defined symbols, matched longest first):
           "\\n", "\\n\\n", "\\n" + 1..16 spaces, "\\n" + 1..4 tabs. Newlines never merge
           with words, and a line break with its indentation costs one token
  32..287  the byte pieces <0x00>..<0xFF>
  288..    learned BPE pieces

Lossless: `decode(encode(s)) == s` for every str. The only character sentencepiece itself
cannot round trip is U+2581 ("▁", its stand-in for a space), so `encode` emits that one as its
three UTF-8 byte pieces.
"""
from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np
import sentencepiece as spm

from lmtiny.errors import UserError

SPECIAL_TOKENS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                  "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
                  "<|output_end|>")
UNK_ID = 0
FIRST_SPECIAL_ID = 1
NEWLINE_PIECES = (("\n", "\n\n") + tuple("\n" + " " * k for k in range(1, 17))
                  + tuple("\n" + "\t" * k for k in range(1, 5)))
NEWLINE_ID = 1 + len(SPECIAL_TOKENS)
FIRST_BYTE_ID = NEWLINE_ID + len(NEWLINE_PIECES)
NUM_RESERVED_IDS = FIRST_BYTE_ID + 256      # ids every tokenizer fixes before learned pieces
MODEL_FILE = "tokenizer.model"
VOCAB_FILE = "tokenizer.vocab"
TOKEN_BYTES_FILE = "token_bytes.npy"
REPORT_FILE = "report.json"
SPACE_SYMBOL = "\u2581"


class TokenizerError(UserError):
  """A user-fixable tokenizer problem (bad recipe, missing model, vocab too small)."""


class Tokenizer:
  """Encode / decode with fixed special ids; picklable (the pickle carries the model bytes)."""

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    for offset, token in enumerate(SPECIAL_TOKENS):
      if self._sp.piece_to_id(token) != FIRST_SPECIAL_ID + offset:
        raise TokenizerError(f"not an lmtiny tokenizer: {token} is not id "
                             f"{FIRST_SPECIAL_ID + offset}")
    self._space_bytes = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_SYMBOL.encode()]
    self._token_bytes = None
    self.hash = hashlib.sha256(self._proto).hexdigest()

  @classmethod
  def load(cls, path: str) -> Tokenizer:
    """Loads from a tokenizer directory (as `train_tokenizer` writes) or a .model file."""
    model = os.path.join(path, MODEL_FILE) if os.path.isdir(path) else path
    try:
      with open(model, "rb") as f:
        proto = f.read()
    except OSError as e:
      raise TokenizerError(f"{model}: cannot read tokenizer model ({e.strerror})") from None
    try:
      return cls(proto)
    except RuntimeError:
      raise TokenizerError(f"{model}: not a sentencepiece model") from None

  @property
  def model_proto(self) -> bytes:
    return self._proto

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def bos_id(self) -> int:
    return FIRST_SPECIAL_ID

  def special_id(self, name: str) -> int:
    """Id of a chat token by name, with or without the brackets: "user_start" or "<|user_start|>"."""
    token = name if name.startswith("<|") else f"<|{name}|>"
    if token not in SPECIAL_TOKENS:
      raise KeyError(f"unknown special token {name!r}")
    return FIRST_SPECIAL_ID + SPECIAL_TOKENS.index(token)

  @property
  def special_ids(self) -> dict[str, int]:
    return {t: FIRST_SPECIAL_ID + i for i, t in enumerate(SPECIAL_TOKENS)}

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(i)

  def piece_score(self, i: int) -> float:
    return self._sp.get_score(i)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no BOS). Special tokens are never produced."""
    if SPACE_SYMBOL not in text:
      return self._sp.encode(text)
    ids = []
    for k, part in enumerate(text.split(SPACE_SYMBOL)):
      if k:
        ids.extend(self._space_bytes)
      if part:
        ids.extend(self._sp.encode(part))
    return ids

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
    """Encodes many texts on `num_threads` C++ threads (0: all cores); same ids as `encode`."""
    texts = list(texts)
    out = self._sp.encode(texts, num_threads=num_threads or (os.cpu_count() or 1))
    for i, text in enumerate(texts):
      if SPACE_SYMBOL in text:
        out[i] = self.encode(text)
    return out

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; special ids decode to nothing."""
    return self._sp.decode([int(i) for i in ids])

  @property
  def token_bytes(self) -> np.ndarray:
    """int32[vocab]: UTF-8 bytes each id decodes to (byte pieces 1; <unk> and chat tokens 0)."""
    if self._token_bytes is None:
      sizes = np.zeros(self.vocab_size, np.int32)
      for i in range(self.vocab_size):
        if self._sp.is_byte(i):
          sizes[i] = 1
        elif not (self._sp.is_control(i) or self._sp.is_unknown(i)):
          sizes[i] = len(self._sp.id_to_piece(i).replace(SPACE_SYMBOL, " ").encode("utf-8"))
      sizes.setflags(write=False)
      self._token_bytes = sizes
    return self._token_bytes


  def __getstate__(self):
    return {"model_proto": self._proto}

  def __setstate__(self, state):
    self.__init__(state["model_proto"])

  def __repr__(self):
    return f"Tokenizer(vocab_size={self.vocab_size}, hash={self.hash[:12]})"
