"""Tokenizers across the HF boundary: the exported lmtiny tokenizer, loaded by transformers'
AutoTokenizer, encodes, decodes and renders chats exactly like lmtiny; the HFTokenizer wrapper
gives lmtiny's interface over a tokenizer.json (same ids and byte counts as lmtiny's own model on
the converted tokenizer; exact byte counts on a GPT-2-style byte-level BPE), and an imported
checkpoint with such a tokenizer samples through the generate CLI."""
import os
import pickle
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")  # the "hf" extra: torch, transformers, tokenizers
from tokenizers import Tokenizer as TokenizersTokenizer, decoders, models, pre_tokenizers, trainers # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from lm_fixtures import ROOT
from lmtiny import generate, import_hf
from lmtiny.corpus.embedded import embedded_sample_texts, iter_embedded_documents
from lmtiny.runs.directory import load_run
from lmtiny.tokenizer import render_conversation, render_for_completion, SPECIAL_TOKENS, train_tokenizer
from lmtiny.tokenizer.huggingface import HFTokenizer, write_tokenizer

TEXTS = ["def f(x):\n    return x + 1\n", "Hello world, that's it.", " leading  spaces\n\n\tTab\n\t\tx",
         "émoji 🙂 中文 ñ", "x\n        y = [1, 22, 333]", "", " ", "\n\n\n", "a<b>c && d || e"]
CHATS = [
    [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A sequence.\n"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me run "},
                                       {"type": "python", "text": "print(2+2)"},
                                       {"type": "python_output", "text": "4\n"}, {"type": "text", "text": "It is 4."}]},
     {"role": "user", "content": "  and 3 + 3 ?"}, {"role": "assistant", "content": "6"}],
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return train_tokenizer(iter_embedded_documents(60_000), 512, str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
  out = tmp_path_factory.mktemp("hf_tok")
  write_tokenizer(str(out), tok, max_len=256)
  return AutoTokenizer.from_pretrained(str(out))


def _sample_texts():
  texts = list(TEXTS)
  for text in embedded_sample_texts(4000).values():
    texts.append(text[:4000].replace("\u2581", " "))  # HF reads U+2581 as sentencepiece's space
  return texts


def test_autotokenizer_encodes_and_decodes_like_lmtiny(tok, hf_tok):
  assert [hf_tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(1, 10))
  assert hf_tok.bos_token_id == tok.bos_id and hf_tok.eos_token_id == tok.special_id("assistant_end")
  for text in _sample_texts():
    ids = tok.encode(text)
    assert hf_tok.encode(text, add_special_tokens=False) == ids, text[:60]
    assert hf_tok(text).input_ids == [tok.bos_id] + ids  # a document starts with <|bos|>, as in training
    assert hf_tok.decode(ids) == text


def _ids(out):
  return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("chat", CHATS, ids=["plain", "system_tools_two_turns"])
def test_chat_template_renders_like_render_conversation(tok, hf_tok, chat):
  want, _ = render_conversation(tok, chat)
  assert _ids(hf_tok.apply_chat_template(chat, tokenize=True)) == want
  prompt = chat[:-1]
  assert _ids(hf_tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)) == \
      render_for_completion(tok, prompt)


def test_wrapper_over_the_converted_tokenizer_matches_lmtiny(tok, hf_tok):
  wrapped = HFTokenizer(hf_tok.backend_tokenizer.to_str(), bos_id=tok.bos_id)
  assert wrapped.vocab_size == tok.vocab_size
  assert (wrapped.token_bytes == tok.token_bytes).all()  # bits per byte count the same bytes
  for text in _sample_texts()[:12]:
    assert wrapped.encode(text) == tok.encode(text)
    assert wrapped.decode(wrapped.encode(text)) == text
  assert wrapped.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
  assert wrapped.special_id("assistant_end") == tok.special_id("assistant_end")
  assert pickle.loads(pickle.dumps(wrapped)).encode(TEXTS[0]) == tok.encode(TEXTS[0])


@pytest.fixture(scope="module")
def byte_level():
  """A GPT-2-style byte-level BPE (as SmolLM uses), trained here."""
  tk = TokenizersTokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tk.train_from_iterator(list(iter_embedded_documents(40_000)), trainer)
  return tk


def test_wrapper_counts_bytes_of_a_byte_level_bpe(byte_level):
  wrapped = HFTokenizer(byte_level.to_str(), bos_id=0)
  assert wrapped.token_bytes[0] == 0  # the special token
  for text in TEXTS + ["naïve café — ≤ 🙂"]:
    ids = wrapped.encode(text)
    assert wrapped.decode(ids) == text
    assert int(wrapped.token_bytes[ids].sum()) == len(text.encode())
  with pytest.raises(Exception, match="no <\\|assistant_end\\|> token"):
    wrapped.special_id("assistant_end")


@pytest.mark.slow(seconds=11)
def test_imported_byte_level_checkpoint_samples_through_generate(byte_level, tmp_path, capfd):
  hf_dir, run = tmp_path / "hf", str(tmp_path / "run")
  torch.manual_seed(0)
  cfg = LlamaConfig(vocab_size=byte_level.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
  LlamaForCausalLM(cfg).save_pretrained(str(hf_dir))
  byte_level.save(str(hf_dir / "tokenizer.json"))
  assert import_hf.main(["--hf", str(hf_dir), "--workdir", run]) == 0
  assert "HFTokenizer" in capfd.readouterr().out
  r = load_run(run)
  assert isinstance(r.tokenizer, HFTokenizer) and r.tokenizer.bos_id == 0
  assert os.path.exists(os.path.join(run, "hf_tokenizer", "tokenizer.json"))
  env = dict(os.environ, PYTHONPATH=ROOT)
  cli = [sys.executable, "-m", "lmtiny.generate", "--workdir", run, "--max-new-tokens", "5", "--temperature", "0"]
  proc = subprocess.run(cli + ["--prompt", "def f"], capture_output=True, text=True, env=env, timeout=240)
  assert proc.returncode == 0 and proc.stdout.startswith("def f") and "decode" in proc.stderr
  assert generate.main(["--workdir", run, "--chat"]) == 2
  assert "no <|assistant_end|> token" in capfd.readouterr().err
