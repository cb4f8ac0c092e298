"""Sample from a trained run: completions, or an interactive chat.

  python -m lmtiny.generate --workdir RUN --prompt "Once upon a time" [--step N]
      [--max-new-tokens 200] [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--seed 0]
      [--num-samples 1] [--stop STRING ...] [--quantize int8|int4 [--group-size N]]
  python -m lmtiny.generate --workdir RUN --chat      # reads user turns from stdin, one a line

Loads RUN/config.json, RUN/tokenizer.model and the newest checkpoint (or --step) onto one local
device, whatever mesh the run was trained on. Text goes to stdout as it is produced; speeds
(prefill and decode tokens/s, compile time) go to stderr. A completion prompt starts a document
(BOS + prompt) and ends at a generated BOS; chat ends a reply at <|assistant_end|> (or <|bos|>).
With --num-samples 1 the text streams token by token; with more, the samples decode as one
batch and each is printed when it finishes. In chat, "/clear" forgets the history and "/quit"
(or end of input) leaves; the oldest turns are dropped when the conversation outgrows the
context. Bad input prints one `error:` line and exits with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Iterable, TextIO

from lmtiny import cli
from lmtiny.sampling import SamplingError


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
                 help="weight-only quantization: int8 per output channel, int4 in groups (lmtiny.quant)")
  p.add_argument("--group-size", type=int, default=None,
                 help="input rows per scale (default: int8 0 = per channel, int4 64)")
  return p.parse_args(argv)


def sampling_params(args):
  """The sampling settings, with errors naming the flag."""
  from lmtiny.sampling import SamplingParams
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


# ---------------------------------------------------------------------------------------------
# The run directory.


@dataclasses.dataclass
class Run:
  workdir: str
  cfg: object        # the run's ConfigDict
  tokenizer: object  # lmtiny.tokenizer.Tokenizer
  step: int


def checkpoint_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps in RUN/checkpoints (orbax names them by step; unfinished ones
  carry a temporary suffix locally, or lack commit_success.txt on cloud storage)."""
  from etils import epath
  root = epath.Path(workdir) / "checkpoints"
  if not root.is_dir():
    return []
  cloud = "://" in workdir
  return sorted(int(p.name) for p in root.iterdir()
                if p.name.isdigit() and (p / "state").is_dir() and (not cloud or (p / "commit_success.txt").exists()))


def load_run(workdir: str, step: int | None = None) -> Run:
  """Config, tokenizer and checkpoint step of a run; raises SamplingError naming what is wrong."""
  import ml_collections
  from etils import epath
  from lmtiny import config as config_lib
  if not os.path.isdir(workdir) and "://" not in workdir:
    raise SamplingError(f"--workdir={workdir}: no such directory")
  steps = checkpoint_steps(workdir)
  if not steps:
    raise SamplingError(f"--workdir={workdir}: no checkpoint in {os.path.join(workdir, 'checkpoints')}")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise SamplingError(f"--step={step}: no such checkpoint in {workdir} (have {', '.join(map(str, steps))})")
  config_path = os.path.join(workdir, "config.json")
  try:
    cfg = ml_collections.ConfigDict(json.loads(epath.Path(config_path).read_text()))
    config_lib.validate_model(cfg.model)
  except (OSError, json.JSONDecodeError, AttributeError, KeyError) as e:
    raise SamplingError(f"{config_path}: cannot read the run's config ({e})") from None
  except config_lib.ConfigError as e:
    raise SamplingError(f"{config_path}: {e}") from None
  from lmtiny.interop.hf_tokenizer import load_run_tokenizer
  tokenizer = load_run_tokenizer(workdir)  # tokenizer.model, or hf_tokenizer/ of an imported model
  if tokenizer is None:
    raise SamplingError(f"{epath.Path(workdir) / 'tokenizer.model'}: missing (the run was trained without a tokenizer)")
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise SamplingError(f"{workdir}/tokenizer.model: {tokenizer.vocab_size} tokens, more than the model's "
                        f"vocab_size {cfg.model.vocab_size}")
  return Run(workdir, cfg, tokenizer, step)


def load_model(run: Run):
  """The run's Transformer with the checkpoint's parameters on the first local device."""
  import jax
  from flax import nnx
  from lmtiny.checkpoint import restore_params
  from lmtiny.model import abstract_model
  abstract = abstract_model(run.cfg.model)
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_params)
  params = restore_params(os.path.join(run.workdir, "checkpoints"), run.step, target)
  return nnx.merge(graphdef, params)


def load_usable_model(run: Run, explicit_step: bool = False, err: TextIO | None = None):
  """load_model at run.step or, when that checkpoint is corrupt and no --step was asked for, at
  the newest older one that loads (one warning line each; the run directory is left as it is,
  since a training run may be using it). SamplingError when none loads."""
  from lmtiny.chat.lora import load_model as load_any_model  # a LoRA run: adapters merged on load
  from lmtiny.checkpoint import describe_error
  err = err or sys.stderr
  steps = [run.step] if explicit_step else [s for s in reversed(checkpoint_steps(run.workdir)) if s <= run.step]
  failures = []
  for step in steps:
    try:
      model = load_any_model(dataclasses.replace(run, step=step))
    except Exception as e:  # pylint: disable=broad-except  (orbax, tensorstore, fingerprint mismatch)
      failures.append(f"step {step}: {describe_error(e)}")
      if not explicit_step:
        print(f"warning: {run.workdir}: checkpoint at step {step} is unusable ({describe_error(e)}); "
              "trying the previous one", file=err, flush=True)
      continue
    run.step = step
    return model
  raise SamplingError(f"--workdir={run.workdir}: no usable checkpoint ({'; '.join(failures)})")


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
  from lmtiny.sampling import TextStream
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
  from lmtiny.sampling import TextStream
  from lmtiny.tokenizer import fit_conversation
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
    sampling = sampling_params(args)
    run = load_run(args.workdir, args.step)
    if not args.chat:
      check_prompt_fits([run.tokenizer.bos_id] + run.tokenizer.encode(args.prompt), run, "--prompt")
    from lmtiny.sampling import Sampler
    model = load_usable_model(run, explicit_step=args.step is not None)
    if args.quantize != "none":
      from lmtiny.quant import param_bytes, quantize_model
      before = param_bytes(model)
      model = quantize_model(model, args.quantize, args.group_size)
      print(f"quantized {args.quantize}: parameters {before / 1e6:.1f} MB -> {param_bytes(model) / 1e6:.1f} MB",
            file=sys.stderr)
    sampler = Sampler(model)
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
  sys.exit(main())
