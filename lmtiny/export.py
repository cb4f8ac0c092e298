"""Export a run to a Hugging Face checkpoint: Llama (Qwen3 with QK-norm) for SwiGLU models,
transformers' NanoChat for nanochat's original GPT (configs/d12 ... d32), else lmtiny's own
modeling file, shipped in DIR (configs/tiny.py, the 38M designs, the 2026 recipe).

  python -m lmtiny.export --workdir RUN --out DIR [--step N] [--dtype float32|bfloat16|float16]

Writes DIR/config.json, model.safetensors, generation_config.json, tokenizer.json,
tokenizer.model, tokenizer_config.json (chat tokens as special tokens, chat template) and
special_tokens_map.json; `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` load them (with trust_remote_code=True when DIR holds
modeling_lmtiny.py, the architecture transformers lacks), and lmtiny_export.json
(the source run, step, dtype, architecture and the files it wrote), which marks DIR as an lmtiny
export. DIR is built in a temporary sibling and renamed into place, replacing an earlier lmtiny
export there as a whole (no stale file survives; an interruption or a full disk leaves it as it
was) when DIR holds nothing but what that export wrote. Any other non-empty DIR (a downloaded
model, an earlier export with your files in it), the run itself or a DIR holding a run is refused
with one line naming what is in the way, exit status 2, nothing touched; so is a DIR that cannot be written. A full disk is one line,
exit status 1. --dtype defaults to the source's dtype for an imported run, else float32; any
other than those three is refused (one line, exit status 2) before the weights are read.
"""
from __future__ import annotations

import argparse
import sys

from lmtiny import cli
from lmtiny.interop.convert import export_run


def run(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="python -m lmtiny.export", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="run directory written by lmtiny.train (or import_hf)")
  p.add_argument("--out", required=True, help="output directory for the Hugging Face checkpoint")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: see above)")
  args = p.parse_args(argv)
  s = export_run(args.workdir, args.out, args.step, args.dtype)
  remote = "".join(f", {name} (load with trust_remote_code=True)" for name in s["remote_code"])
  print(f"{args.workdir} step {s['step']} -> {args.out}: {s['architecture']}, {s['tensors']} tensors, "
        f"{s['bytes'] / 1e6:.1f} MB {s['dtype']}, tokenizer and chat template{remote}")
  return 0


def main(argv=None) -> int:
  return cli.run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  cli.exit_with(main)
