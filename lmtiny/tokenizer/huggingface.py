"""Tokenizers across the Hugging Face boundary.

Export: `tokenizer_json` turns an lmtiny sentencepiece model into a `tokenizers` tokenizer.json
that encodes identically (tokenizer.model is written too, for sentencepiece-based tools);
tokenizer_config.json adds BOS by `tok(text)` (lmtiny documents start with <|bos|>), the nine chat
tokens as special tokens at their fixed ids 1..9, and a Jinja chat template that renders like
`lmtiny.tokenizer.render_conversation`. Two differences are inherent to HF: special tokens typed
inside text are parsed as special tokens, and a literal U+2581 in text reads as a space.

Import: a checkpoint whose tokenizer.model is an lmtiny tokenizer comes back as one. Any other
tokenizer (GPT-2 style byte-level BPE as in SmolLM, a Llama sentencepiece) is kept as its
tokenizer.json and wrapped by `HFTokenizer`, which offers what generate and the trainer use:
encode, encode_batch, decode, bos_id, vocab_size, token_bytes, special_id, hash.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Sequence

import numpy as np
from etils import epath

from lmtiny.fs.atomic import atomic_write, atomic_write_json
from lmtiny.tokenizer.spm import (MODEL_FILE, NEWLINE_ID, NEWLINE_PIECES, SPACE_SYMBOL, SPECIAL_TOKENS,
                                   Tokenizer, TokenizerError, UNK_ID)

HF_TOKENIZER_DIR = "hf_tokenizer"  # in a run directory: tokenizer.json + lmtiny.json (bos id)
# The export's padding token: <unk>, which the tokenizer never produces (unknown characters fall
# back to bytes), so no lmtiny document or conversation holds it as an input or a target. What HF
# does with the pad id (attention mask 0, labels -100 in its collators, an attention mask inferred
# from input_ids != pad, nn.Embedding's padding_idx that never updates that row) therefore never
# touches a real token; <|bos|> (every document's first token, a generation stop) or
# <|assistant_end|> (a trained target) would.
PAD_ID = UNK_ID

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\n\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '<|user_start|>' + ns.system + message['content'] + '<|user_end|>' -}}{%- set ns.system = '' -%}"
    "{%- else -%}{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}")


def tokenizer_json(tokenizer: Tokenizer) -> dict:
  """A `tokenizers` tokenizer.json that encodes exactly like the sentencepiece model.

  Sentencepiece BPE merges the adjacent pair whose result scores highest: here, merges ranked by
  the merged piece's score, for every split of every learned piece into two vocabulary pieces.
  Spaces become U+2581 in a normalizer (no dummy prefix), so the newline pieces, which
  sentencepiece matches before BPE (leftmost, longest), are added tokens matched on normalized
  text with their own ids. Unknown characters fall back to byte pieces; <|bos|> is prepended by
  the post-processor (as lmtiny documents start)."""
  sp = tokenizer._sp  # pylint: disable=protected-access
  n = tokenizer.vocab_size
  vocab = {sp.id_to_piece(i): i for i in range(n)}
  newline_ids = set(range(NEWLINE_ID, NEWLINE_ID + len(NEWLINE_PIECES)))
  learned = [i for i in range(n) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or i in newline_ids)]
  learned_ids, merges = set(learned), []
  for i in sorted(learned, key=lambda i: (-sp.get_score(i), i)):
    piece = sp.id_to_piece(i)
    splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
    found = [(vocab[a], vocab[b], a, b) for a, b in splits if vocab.get(a) in learned_ids and vocab.get(b) in learned_ids]
    merges.extend([a, b] for _, _, a, b in sorted(found))

  def added(i, special):
    return {"id": i, "content": sp.id_to_piece(i), "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": not special, "special": special}
  bos = sp.id_to_piece(tokenizer.bos_id)
  bos_piece = {"SpecialToken": {"id": bos, "type_id": 0}}
  return {
      "version": "1.0", "truncation": None, "padding": None,
      "added_tokens": [added(UNK_ID, True)] + [added(tokenizer.special_id(t), True) for t in SPECIAL_TOKENS]
                      + [added(i, False) for i in sorted(newline_ids)],
      "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": SPACE_SYMBOL},
      "pre_tokenizer": None,
      "post_processor": {"type": "TemplateProcessing",
                         "single": [bos_piece, {"Sequence": {"id": "A", "type_id": 0}}],
                         "pair": [bos_piece, {"Sequence": {"id": "A", "type_id": 0}}, bos_piece,
                                  {"Sequence": {"id": "B", "type_id": 1}}],
                         "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}}},
      "decoder": {"type": "Sequence", "decoders": [
          {"type": "Replace", "pattern": {"String": SPACE_SYMBOL}, "content": " "},
          {"type": "ByteFallback"}, {"type": "Fuse"}]},
      "model": {"type": "BPE", "dropout": None, "unk_token": sp.id_to_piece(UNK_ID), "continuing_subword_prefix": None,
                "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                "vocab": vocab, "merges": merges},
  }


def write_tokenizer(out_dir: str, tokenizer: Tokenizer, max_len: int) -> None:
  """tokenizer.json (what AutoTokenizer loads), tokenizer.model (for sentencepiece-based tools such
  as llama.cpp's converter), tokenizer_config.json and special_tokens_map.json."""
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  atomic_write(out / MODEL_FILE, tokenizer.model_proto)
  atomic_write(out / "tokenizer.json", json.dumps(tokenizer_json(tokenizer), ensure_ascii=False).encode())
  specials = {"bos_token": "<|bos|>", "eos_token": "<|assistant_end|>", "unk_token": "<unk>",
              "pad_token": tokenizer.id_to_piece(PAD_ID)}
  extra = [t for t in SPECIAL_TOKENS if t not in specials.values()]
  atomic_write_json(out / "tokenizer_config.json", dict(
      specials, tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True, add_eos_token=False,
      clean_up_tokenization_spaces=False, model_max_length=max_len, extra_special_tokens=extra,
      chat_template=CHAT_TEMPLATE))
  atomic_write_json(out / "special_tokens_map.json", dict(specials, additional_special_tokens=extra))


# ---------------------------------------------------------------------------------------------
# Wrapping a Hugging Face tokenizer.


@functools.cache
def _byte_decoder() -> dict[str, int]:
  """GPT-2's byte-level alphabet: the printable character standing for each byte."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


class HFTokenizer:
  """lmtiny's Tokenizer interface over a `tokenizers` tokenizer.json (no BOS added by encode)."""

  def __init__(self, tokenizer_json: str, bos_id: int):
    from tokenizers import Tokenizer as TokenizersTokenizer
    self._json = tokenizer_json
    self._tk = TokenizersTokenizer.from_str(tokenizer_json)
    self._bos_id = int(bos_id)
    self._token_bytes = None
    self.hash = hashlib.sha256(tokenizer_json.encode()).hexdigest()

  @classmethod
  def load(cls, directory) -> HFTokenizer:
    directory = epath.Path(directory)
    info = json.loads((directory / "lmtiny.json").read_text())
    return cls((directory / "tokenizer.json").read_text(), info["bos_id"])

  def save(self, directory) -> None:
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "tokenizer.json", self._json.encode())
    atomic_write_json(directory / "lmtiny.json", {"bos_id": self._bos_id})

  @property
  def vocab_size(self) -> int:
    return self._tk.get_vocab_size(with_added_tokens=True)

  @property
  def bos_id(self) -> int:
    return self._bos_id

  def special_id(self, name: str) -> int:
    token = name if name.startswith("<|") else f"<|{name}|>"
    i = self._tk.token_to_id(token)
    if i is None:
      raise TokenizerError(f"this tokenizer has no {token} token (not an lmtiny chat tokenizer); "
                           "use --prompt completions")
    return i

  def id_to_piece(self, i: int) -> str:
    return self._tk.id_to_token(i)

  def encode(self, text: str) -> list[int]:
    return self._tk.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
    return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tk.decode([int(i) for i in ids], skip_special_tokens=True)

  @property
  def token_bytes(self) -> np.ndarray:
    """int32[vocab]: UTF-8 bytes each id stands for (special tokens 0), for bits per byte."""
    if self._token_bytes is None:
      byte_level = "ByteLevel" in json.dumps(json.loads(self._json).get("decoder"))
      special = {i for i, t in self._tk.get_added_tokens_decoder().items() if t.special}
      table, sizes = _byte_decoder(), np.zeros(self.vocab_size, np.int32)
      for i in range(self.vocab_size):
        piece = self._tk.id_to_token(i)
        if i in special or piece is None:
          continue
        if byte_level:
          sizes[i] = sum(1 if c in table else len(c.encode()) for c in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
          sizes[i] = 1
        else:
          sizes[i] = len(piece.replace("\u2581", " ").encode())
      sizes.setflags(write=False)
      self._token_bytes = sizes
    return self._token_bytes


  def __getstate__(self):
    return {"tokenizer_json": self._json, "bos_id": self._bos_id}

  def __setstate__(self, state):
    self.__init__(state["tokenizer_json"], state["bos_id"])

  def __repr__(self):
    return f"HFTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, hash={self.hash[:12]})"


def _special_token_id(hf_config: dict, name: str) -> int | None:
  """config.json's {name}_token_id (the first, when it is a list)."""
  if hf_config.get(f"{name}_token_id") is not None:
    value = hf_config[f"{name}_token_id"]
    return int(value[0] if isinstance(value, list) else value)
  return None


def import_tokenizer(hf_dir: str, hf_config: dict):
  """The checkpoint's tokenizer: an lmtiny `Tokenizer` when tokenizer.model is one, else an
  HFTokenizer (from tokenizer.json, or converted from a sentencepiece model by transformers)."""
  model_path = os.path.join(hf_dir, MODEL_FILE)
  if os.path.exists(model_path):
    try:
      return Tokenizer.load(model_path)
    except TokenizerError:
      pass  # a sentencepiece model with other ids: wrap it like any HF tokenizer
  json_path = os.path.join(hf_dir, "tokenizer.json")
  if os.path.exists(json_path):
    with open(json_path) as f:
      text = f.read()
  elif os.path.exists(model_path):
    try:
      from transformers import AutoTokenizer
    except ImportError:
      raise TokenizerError(f"{model_path}: converting this sentencepiece tokenizer needs transformers "
                           "(pip install -e '.[hf]')") from None
    text = AutoTokenizer.from_pretrained(hf_dir).backend_tokenizer.to_str()
  else:
    raise TokenizerError(f"{hf_dir}: no tokenizer.model or tokenizer.json")
  bos = _special_token_id(hf_config, "bos")
  if bos is None:  # e.g. Qwen: documents are separated by the end-of-text token instead
    bos = _special_token_id(hf_config, "eos")
  if bos is None:
    raise TokenizerError(f"{hf_dir}/config.json: neither bos_token_id nor eos_token_id is set")
  return HFTokenizer(text, bos)


def save_run_tokenizer(workdir: str, tokenizer) -> None:
  if isinstance(tokenizer, Tokenizer):
    atomic_write(epath.Path(workdir) / MODEL_FILE, tokenizer.model_proto)
  else:
    tokenizer.save(epath.Path(workdir) / HF_TOKENIZER_DIR)


def load_run_tokenizer(workdir: str):
  """The tokenizer of a run directory (tokenizer.model, or hf_tokenizer/ for an imported model);
  None when it has neither."""
  root = epath.Path(workdir)
  if (root / MODEL_FILE).exists():
    return Tokenizer((root / MODEL_FILE).read_bytes())
  if (root / HF_TOKENIZER_DIR / "tokenizer.json").exists():
    return HFTokenizer.load(root / HF_TOKENIZER_DIR)
  return None
