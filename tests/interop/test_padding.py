"""The export's padding token (lmtiny.tokenizer.huggingface.PAD_ID, <unk>): the tokenizer pads a
batch with it, config.json and generation_config.json name the same id, and in transformers a
padded batch gives each row what it gives alone: the logits of a right-padded forward, the greedy
tokens of a left-padded generate; for Llama, NanoChat and the shipped modeling file (smear,
value embeddings, sliding windows). Skipped without the `hf` extra (torch and transformers)."""
import json
import os

import numpy as np
import pytest

from arch_fixtures import random_model, small_config
from chat_fixtures import make_tokenizer
from lmtiny.interop.convert import export_model
from lmtiny.tokenizer.huggingface import PAD_ID

torch = pytest.importorskip("torch")  # the "hf" extra: torch and transformers
transformers = pytest.importorskip("transformers")

TEXTS = ["def f", "The json module parses text into Python objects", "a = [1, 2"]
CLASSES = {"tiny_llama": "LlamaForCausalLM", "d12": "NanoChatForCausalLM", "d12_2026": "LmtinyForCausalLM"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  torch.set_num_threads(1)
  tok = make_tokenizer()
  root = tmp_path_factory.mktemp("padding")
  out = {}
  for name in CLASSES:
    export_model(random_model(small_config(name, vocab_size=tok.vocab_size, max_seq_len=64)), tok, str(root / name))
    out[name] = str(root / name)
  return tok, out


def test_the_pad_token_is_unk_everywhere_and_never_a_text_token(exports):
  tok, out = exports
  path = out["tiny_llama"]
  hf_tok = transformers.AutoTokenizer.from_pretrained(path)
  assert hf_tok.pad_token == "<unk>" and hf_tok.pad_token_id == PAD_ID == 0
  for name in ("config.json", "generation_config.json"):
    assert json.load(open(os.path.join(path, name)))["pad_token_id"] == PAD_ID, name
  assert PAD_ID not in {tok.bos_id, *tok.special_ids.values()}
  text = "".join(chr(c) for c in range(32, 0x3000, 7))  # far beyond the tokenizer's vocabulary: bytes, not <unk>
  assert PAD_ID not in tok.encode(text) and tok.decode(tok.encode(text)) == text
  batch = hf_tok(["a", "bcd efg"], padding=True)  # failed before: no pad token
  short = hf_tok("a")["input_ids"]
  assert batch["input_ids"][0][:len(short)] == short and set(batch["input_ids"][0][len(short):]) == {PAD_ID}
  assert batch["attention_mask"][0] == [1] * len(short) + [0] * (len(batch["input_ids"][0]) - len(short))


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_a_padded_batch_gives_each_row_its_own_logits_and_greedy_tokens(exports, name):
  _, out = exports
  hf = transformers.AutoModelForCausalLM.from_pretrained(out[name], trust_remote_code=True).eval()
  assert type(hf).__name__ == CLASSES[name] and hf.generation_config.pad_token_id == PAD_ID
  hf_tok = transformers.AutoTokenizer.from_pretrained(out[name])
  alone = [hf_tok(t, return_tensors="pt") for t in TEXTS]
  with torch.no_grad():
    batch = hf_tok(TEXTS, padding=True, return_tensors="pt")  # right-padded: the tokenizer's default
    assert (batch["input_ids"] == PAD_ID).any()
    logits = hf(**batch).logits
    for i, one in enumerate(alone):
      n = one["input_ids"].shape[1]
      np.testing.assert_allclose(logits[i, :n].numpy(), hf(**one).logits[0].numpy(), rtol=1e-4, atol=1e-4)
    hf_tok.padding_side = "left"  # for generate: every row's last prompt token at the end
    batch = hf_tok(TEXTS, padding=True, return_tensors="pt")
    width = batch["input_ids"].shape[1]
    together = hf.generate(**batch, max_new_tokens=6, do_sample=False)[:, width:].tolist()
    for row, one in zip(together, alone):
      own = hf.generate(**one, max_new_tokens=6, do_sample=False)[0, one["input_ids"].shape[1]:].tolist()
      assert row[:len(own)] == own and set(row[len(own):]) <= {PAD_ID}  # a row that stopped early: padded
