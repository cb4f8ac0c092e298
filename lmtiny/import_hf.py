"""Import a local Hugging Face checkpoint (Llama, Qwen3, NanoChat, or an lmtiny export with its
modeling file) into an lmtiny run directory.

  python -m lmtiny.import_hf --hf DIR --workdir RUN

DIR holds config.json, model.safetensors (or model.safetensors.index.json and its shards) and a
tokenizer (tokenizer.model and/or tokenizer.json). RUN (new, or an empty directory) gets
config.json, a parameter checkpoint at step 0, the tokenizer (an lmtiny tokenizer.model stays
one; any other is wrapped from its tokenizer.json) and hf_import.json, built in a temporary
sibling and renamed into place, so an interrupted import leaves no RUN behind. Then
`python -m lmtiny.generate --workdir RUN --prompt ...` samples from it, its checkpoint initialises
SFT, and `python -m lmtiny.export` writes the same tensors back. Unsupported checkpoints (biases,
rope scaling, Llama's sliding windows, other activations, bad head counts, an lmtiny config.json
whose windows, value embeddings or backout lmtiny's model cannot hold) and malformed files (a
safetensors header or index that is not what the format says) are refused with one line naming
the file and field, exit status 2, before anything is written; so is a RUN whose directory
cannot be written.
"""
from __future__ import annotations

import argparse
import sys

from lmtiny import cli
from lmtiny.fs import outputs
from lmtiny.interop import convert


def run(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="python -m lmtiny.import_hf", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--hf", required=True, help="local Hugging Face checkpoint directory")
  p.add_argument("--workdir", required=True, help="new lmtiny run directory")
  args = p.parse_args(argv)
  # RUN is built in a temporary sibling and renamed into place: its parent must take new entries,
  # known before the checkpoint is read rather than after.
  outputs.check_output_parent(args.workdir, "--workdir")
  s = convert.import_checkpoint(args.hf, args.workdir)
  f = s["fields"]
  print(f"{args.hf} -> {args.workdir}: {s['model_type']}, {s['params'] / 1e6:.2f}M params ({s['dtype']}), "
        f"{f['num_layers']} layers x {f['d_model']}, {f['num_heads']} heads / {f['num_kv_heads']} kv, "
        f"{'tied' if f['tie_embeddings'] else 'untied'} embeddings, {s['tokenizer']}")
  return 0


def main(argv=None) -> int:
  return cli.run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  cli.exit_with(main)
