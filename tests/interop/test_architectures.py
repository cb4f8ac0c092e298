"""Every shipped config's architecture leaves lmtiny and comes back (lmtiny.interop.architectures):
shrunk through its config (layers, width, vocab, windows) with every architectural switch kept, a
randomly perturbed model exports, loads in transformers' AutoModelForCausalLM (NanoChat natively,
else the shipped modeling file with trust_remote_code) with lmtiny's logits to float32 rounding and
its greedy tokens on a chat prompt (and, for the 2026 recipe, the same reply through a
text-generation pipeline with the exported tokenizer and chat template), and export -> import ->
export writes the same tensors bit for bit."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from arch_fixtures import EXPECTED, random_model, small_config, VOCAB
from lm_fixtures import forward
from lmtiny import export, import_hf
from lmtiny.corpus.embedded import iter_embedded_documents
from lmtiny.interop.convert import export_model
from lmtiny.interop.safetensors_io import read_checkpoint
from lmtiny.model.sampling import Sampler, SamplingParams
from lmtiny.tokenizer import render_for_completion, train_tokenizer

torch = pytest.importorskip("torch")  # the "hf" extra: torch and transformers
transformers = pytest.importorskip("transformers")

TOKENS = np.array([[1, 300, 301, 12, 450, 77, 8, 9, 260, 33, 100, 500, 7, 19, 400, 3],
                   [1, 5, 17, 280, 281, 282, 40, 41, 42, 300, 311, 1, 66, 67, 68, 69]])
CHAT = [{"role": "user", "content": "What is a list?"}]
# Beyond the shipped architectures: tied embeddings (transformers ties lm_head to the table) and
# the other plain activations, GQA down to MQA, through both NanoChat and the shipped file.
VARIANTS = {"d12+tied+silu+mqa": ("d12", dict(tie_embeddings=True, activation="silu", num_kv_heads=1)),
            "tiny+tied+gelu": ("tiny", dict(tie_embeddings=True, activation="gelu"))}
CASES = {**{name: (name, {}) for name in EXPECTED}, **VARIANTS}
CLASSES = {**EXPECTED, "d12+tied+silu+mqa": "NanoChatForCausalLM", "tiny+tied+gelu": "LmtinyForCausalLM"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  torch.set_num_threads(1)
  return train_tokenizer(iter_embedded_documents(60_000), VOCAB, str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok):
  """name -> (lmtiny model, export directory, its architecture class as export_model reports it)."""
  root = tmp_path_factory.mktemp("arch")
  out = {}
  for name, (config, model_fields) in CASES.items():
    model = random_model(small_config(config, **model_fields))
    out[name] = (model, str(root / name), export_model(model, tok, str(root / name))["architecture"])
  return out


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


@pytest.mark.slow(seconds=4)
@pytest.mark.parametrize("name", sorted(CASES))
def test_exported_architecture_runs_in_transformers_with_lmtiny_logits_and_greedy_tokens(exported, name, tok):
  model, out, architecture = exported[name]
  assert architecture == CLASSES[name]
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
  assert type(hf).__name__ == CLASSES[name]
  ours, theirs = np.asarray(forward(model, jnp.asarray(TOKENS))), _hf_logits(hf, TOKENS)
  assert np.abs(ours - theirs).max() < 2e-5 * max(1.0, np.abs(ours).max())
  if architecture == "LmtinyForCausalLM":  # the shipped file's loss: next-token cross-entropy
    with torch.no_grad():
      loss = hf(torch.tensor(TOKENS), labels=torch.tensor(TOKENS)).loss.item()
    logp = ours - np.log(np.exp(ours).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp[:, :-1], TOKENS[:, 1:, None], -1).mean()
    assert abs(loss - want) < 1e-5 * want
  if architecture == "LlamaForCausalLM" or name in VARIANTS:
    return  # Llama's greedy tokens: tests/interop/test_convert.py
  prompt = render_for_completion(tok, CHAT)
  with torch.no_grad():
    hf_tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(prompt):].tolist()
  ours = Sampler(model).generate([prompt], max_new_tokens=8, sampling=SamplingParams(0.0)).tokens[0]
  assert hf_tokens == ours
  if name == "d12_2026":  # the shipped modeling file, the tokenizer and its chat template in one pipeline
    chat = transformers.pipeline("text-generation", model=out, trust_remote_code=True)
    reply = chat(CHAT, max_new_tokens=8, do_sample=False)[0]["generated_text"][-1]
    stops = [tok.special_id("assistant_end"), tok.bos_id]
    until_stop = next((ours[:i] for i, t in enumerate(ours) if t in stops), ours)
    assert reply == {"role": "assistant", "content": tok.decode(until_stop)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_import_export_is_bitwise(exported, name, tmp_path, capsys):
  _, out, architecture = exported[name]
  assert import_hf.main(["--hf", out, "--workdir", str(tmp_path / "run")]) == 0
  assert export.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "again")]) == 0
  assert f": {architecture}, " in capsys.readouterr().out
  a, b = read_checkpoint(out), read_checkpoint(str(tmp_path / "again"))
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape and a[key].tobytes() == b[key].tobytes(), key
  for f in ("config.json", "modeling_lmtiny.py"):
    assert os.path.exists(os.path.join(out, f)) == (f == "config.json" or architecture == "LmtinyForCausalLM")
    if os.path.exists(os.path.join(out, f)):
      assert open(os.path.join(out, f)).read() == open(tmp_path / "again" / f).read(), f

