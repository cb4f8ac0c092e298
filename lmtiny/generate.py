"""Sample from a trained run: completions, or an interactive chat.

  python -m lmtiny.generate --workdir RUN --prompt "Once upon a time" [--step N]
      [--max-new-tokens 200] [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--seed 0]
      [--num-samples 1] [--stop STRING ...] [--quantize int8|int4 [--group-size N]]
  python -m lmtiny.generate --workdir RUN --chat      # reads user turns from stdin, one a line

Loads RUN/config.json, RUN/tokenizer.model and the newest usable checkpoint (or --step) onto one
local device, whatever mesh the run was trained on (lmtiny.runs.directory.load_weights: a LoRA run's
adapters are folded into its base run's weights). Text goes to stdout as it is produced; speeds
(prefill and decode tokens/s, compile time) go to stderr. A completion prompt starts a document
(BOS + prompt) and ends at a generated BOS; chat ends a reply at <|assistant_end|> (or <|bos|>).
With --num-samples 1 the text streams token by token; with more, the samples decode as one
batch and each is printed when it finishes. In chat, "/clear" forgets the history and "/quit"
(or end of input) leaves; the oldest turns are dropped when the conversation outgrows the
context. Bad input prints one `error:` line and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Iterable, TextIO

from lmtiny import cli
from lmtiny.model.quant import check_flags
from lmtiny.model.sampling import Sampler, SamplingError, SamplingParams, TextStream
from lmtiny.runs.directory import load_run, load_weights, Run
from lmtiny.tokenizer import fit_conversation


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m lmtiny.generate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="run directory written by lmtiny.train")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  mode = p.add_mutually_exclusive_group(required=True)
  mode.add_argument("--prompt", help="text to continue")
  mode.add_argument("--chat", action="store_true", help="interactive chat on stdin/stdout")
  p.add_argument("--max-new-tokens", type=int, default=200)
  p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=50, help="0 = off")
  p.add_argument("--top-p", type=float, default=0.95, help="in (0, 1]; 1 = off")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--num-samples", type=int, default=1, help="completions of the prompt, as one batch")
  p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
  p.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                 help="weight-only quantization: int8 per output channel, int4 in groups (lmtiny.model.quant)")
  p.add_argument("--group-size", type=int, default=None,
                 help="input rows per scale (default: int8 0 = per channel, int4 64)")
  return p.parse_args(argv)


def sampling_params(args):
  """The sampling settings, with errors naming the flag."""
  if args.max_new_tokens < 1:
    raise SamplingError(f"--max-new-tokens={args.max_new_tokens}: must be >= 1")
  if args.num_samples < 1:
    raise SamplingError(f"--num-samples={args.num_samples}: must be >= 1")
  if not args.chat and not args.prompt:
    raise SamplingError("--prompt: empty; give some text to continue (or use --chat)")
  try:
    return SamplingParams(args.temperature, args.top_k, args.top_p)
  except SamplingError as e:
    raise SamplingError(f"--{e}".replace("_", "-", 1)) from None


def check_prompt_fits(ids: list[int], run: Run, what: str) -> None:
  context = run.cfg.model.max_seq_len
  if len(ids) >= context:
    raise SamplingError(f"{what}: {len(ids)} tokens, but the model's context is {context} tokens "
                        f"(model.max_seq_len in {run.workdir}/config.json), leaving no room to generate")


# ---------------------------------------------------------------------------------------------
# The two modes.


def _speeds(gen, batch: int) -> str:
  def rate(tokens, seconds):
    return f"{tokens:,} tokens in {seconds:.3f} s ({tokens / max(seconds, 1e-9):,.0f} tok/s)"
  text = (f"prefill {rate(gen.prefill_tokens, gen.prefill_seconds)} | decode "
          f"{rate(gen.decode_tokens, gen.decode_seconds)} | batch {batch}")
  return text + (f" | compiled in {gen.compile_seconds:.1f} s" if gen.compile_seconds else "")


def complete(sampler, run: Run, prompt: str, sampling, args, out: TextIO = sys.stdout,
             err: TextIO = sys.stderr) -> list[str]:
  """Continuations of `prompt`, streamed to `out`; returns them."""
  tok = run.tokenizer
  ids = [tok.bos_id] + tok.encode(prompt)
  check_prompt_fits(ids, run, "--prompt")
  n = args.num_samples
  streams = [TextStream(tok, args.stop) for _ in range(n)]
  if n == 1:
    out.write(prompt)
    out.flush()

  def on_tokens(row, new_ids):
    text = streams[row].add(new_ids)
    if n == 1 and text:
      out.write(text)
      out.flush()
    return streams[row].stopped

  def on_finish(row):
    rest = streams[row].finish()
    if n == 1:
      out.write(rest + "\n")
    else:
      out.write(f"--- sample {row + 1} ---\n{prompt}{streams[row].text}\n")
    out.flush()

  gen = sampler.generate([ids] * n, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                         stop_ids=(tok.bos_id,), on_tokens=on_tokens, on_finish=on_finish, warmup=True)
  texts = [stream.text for stream in streams]
  print(_speeds(gen, n), file=err)
  return texts


def chat(sampler, run: Run, sampling, args, lines: Iterable[str], out: TextIO = sys.stdout,
         err: TextIO = sys.stderr) -> list[dict]:
  """A conversation: each line of `lines` is a user turn; replies stream to `out`. Returns the
  history (list of messages)."""
  tok = run.tokenizer
  stop_ids = (tok.special_id("assistant_end"), tok.bos_id)
  context = run.cfg.model.max_seq_len
  history: list[dict] = []
  for turn, line in enumerate(lines):
    text = line.rstrip("\n")
    command = text.strip()
    if not command:
      continue
    if command in ("/quit", "/exit"):
      break
    if command == "/clear":
      history = []
      print("(history cleared)", file=out, flush=True)
      continue
    history.append({"role": "user", "content": text})
    history, ids = fit_conversation(tok, history, context, args.max_new_tokens)  # oldest turns go first
    if len(ids) >= context:
      history.pop()
      print(f"error: message: {len(ids)} tokens with the chat tokens, but the model's context is "
            f"{context} tokens; send something shorter", file=err, flush=True)
      continue
    stream = TextStream(tok, args.stop)
    out.write("assistant: ")
    out.flush()

    def on_tokens(row, new_ids):
      out.write(stream.add(new_ids))
      out.flush()
      return stream.stopped

    gen = sampler.generate([ids], max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed + turn,
                           stop_ids=stop_ids, on_tokens=on_tokens, warmup=True)
    out.write(stream.finish() + "\n")
    out.flush()
    history.append({"role": "assistant", "content": stream.text})
    print(_speeds(gen, 1), file=err, flush=True)
  return history


def _stdin_lines(interactive: bool):
  if not interactive:
    yield from sys.stdin
    return
  while True:
    try:
      yield input("you> ") + "\n"
    except EOFError:
      return


def run(argv: list[str]) -> int:
  args = parse_args(argv)
  try:
    check_flags(args.quantize, args.group_size)
    sampling = sampling_params(args)
    run = load_run(args.workdir, args.step)
    if not args.chat:
      check_prompt_fits([run.tokenizer.bos_id] + run.tokenizer.encode(args.prompt), run, "--prompt")
    run, params = load_weights(run, quantize=args.quantize, group_size=args.group_size)
    sampler = Sampler(run.model(params))
    print(f"{args.workdir}: step {run.step}, {run.cfg.model.num_layers} layers x {run.cfg.model.d_model}, "
          f"context {run.cfg.model.max_seq_len}", file=sys.stderr)
    if args.chat:
      chat(sampler, run, sampling, args, _stdin_lines(sys.stdin.isatty()))
    else:
      complete(sampler, run, args.prompt, sampling, args)
  except KeyboardInterrupt:
    print(file=sys.stderr)
  return 0


def main(argv=None) -> int:
  """`argv` without the program name, as argparse takes it."""
  return cli.run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  cli.exit_with(main)
