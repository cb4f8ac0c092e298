"""Tokenizer: lossless sentencepiece BPE with fixed chat-token ids, its training and evaluation.

  tok = Tokenizer.load("tokenizer_dir")
  ids = tok.encode("text")                       # no BOS; tok.bos_id to prepend
  ids, mask = render_conversation(tok, messages)  # chat: loss only on assistant output
  train_tokenizer(documents, vocab_size=32768, out_dir="tokenizer_dir")
"""
from lmtiny.tokenizer.bpe import train_tokenizer
from lmtiny.tokenizer.chat import fit_conversation, render_conversation, render_for_completion
from lmtiny.tokenizer.spm import SPECIAL_TOKENS, Tokenizer, TokenizerError

__all__ = ["SPECIAL_TOKENS", "Tokenizer", "TokenizerError", "fit_conversation", "render_conversation",
           "render_for_completion", "train_tokenizer"]
