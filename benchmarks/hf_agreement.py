"""Logit agreement between lmtiny and transformers on the same weights, both directions.

  python benchmarks/hf_agreement.py [--run RUN]

Builds tiny random Llama/Qwen3 checkpoints with transformers (tied/untied, GQA/MHA), imports them
(lmtiny.interop.convert) and compares logits on a fixed batch; builds random lmtiny models in the
same four shapes, exports them and loads them with AutoModelForCausalLM; with --run, exports that
trained run too and compares greedy continuations. Prints max |diff| and max |diff| / max |logit|,
and whether import -> export reproduced every tensor bit for bit. float32 on CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import test_interop_convert as t  # noqa: E402  (the tests' checkpoint builders)
from lmtiny.corpus.embedded import iter_embedded_documents  # noqa: E402
from lmtiny.runs.directory import load_weights  # noqa: E402
from lmtiny.interop.convert import export_run, import_checkpoint  # noqa: E402
from lmtiny.interop.safetensors_io import read_checkpoint  # noqa: E402
from lmtiny.tokenizer import train_tokenizer  # noqa: E402


def agreement(ours, theirs) -> str:
  diff = float(np.abs(ours - theirs).max())
  return f"max abs {diff:.2e}, relative {diff / float(np.abs(theirs).max()):.2e}"


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run", default="", help="a trained Llama-compatible run to export and compare")
  args = p.parse_args()
  torch.set_num_threads(1)
  root = tempfile.mkdtemp(prefix="hf_agreement-")
  tok = train_tokenizer(iter_embedded_documents(60_000), 512, os.path.join(root, "tok"))
  print("import (HF checkpoint -> lmtiny):")
  for name in t.HF_VARIANTS:
    hf, hf_dir, run, out = t._hf_model(name), *(os.path.join(root, name + s) for s in ("", "_run", "_out"))
    hf.save_pretrained(hf_dir)
    with open(os.path.join(hf_dir, "tokenizer.model"), "wb") as f:
      f.write(tok.model_proto)
    import_checkpoint(hf_dir, run)
    loaded, params = load_weights(run)
    ours = np.asarray(loaded.model(params)(jnp.asarray(t.TOKENS)))
    export_run(run, out)
    a, b = read_checkpoint(hf_dir), read_checkpoint(out)
    bitwise = sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
    print(f"  {name:18s} {agreement(ours, t._hf_logits(hf, t.TOKENS))} | import->export bitwise: {bitwise}")
  print("export (lmtiny -> AutoModelForCausalLM):")
  shapes = {"llama_untied_gqa": dict(num_kv_heads=2), "llama_tied_mha": dict(tie_embeddings=True),
            "llama_untied_mha": dict(), "llama_tied_gqa": dict(num_kv_heads=2, tie_embeddings=True),
            "qwen3_qknorm_gqa": dict(num_kv_heads=2, qk_norm=True)}
  for name, kw in shapes.items():
    from pathlib import Path
    run, model = t._lmtiny_run(Path(tempfile.mkdtemp(dir=root)), tok, **kw)
    out = os.path.join(root, name + "_export")
    export_run(run.workdir, out)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    print(f"  {name:18s} {agreement(np.asarray(model(jnp.asarray(t.TOKENS))), t._hf_logits(hf, t.TOKENS))}")
  if args.run:
    run, params = load_weights(args.run)
    model, out = run.model(params), os.path.join(root, "run_export")
    export_run(args.run, out)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = [run.tokenizer.bos_id] + run.tokenizer.encode("def ")
    tokens = np.array([prompt + run.tokenizer.encode("fibonacci(n):\n    return")])
    ours, theirs = np.asarray(model(jnp.asarray(tokens))), t._hf_logits(hf, tokens)
    a, b = t._lmtiny_greedy(model, prompt, 24), t._hf_greedy(hf, prompt, 24)
    print(f"  {args.run} (step {run.step}): {agreement(ours, theirs)} | greedy 24 tokens equal: {a == b} "
          f"| {run.tokenizer.decode(prompt[1:] + a)!r}")


if __name__ == "__main__":
  main()
