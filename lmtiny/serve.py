"""python -m lmtiny.serve --workdir RUN [--port 8000] [--host 127.0.0.1] [--step N] [--max-batch 8]
    [--max-queue 64] [--max-tokens 256] [--chunk 4] [--api-key KEY] [--model NAME]

Serves the run over OpenAI's API at http://HOST:PORT/v1 (/v1/chat/completions, /v1/completions,
/v1/models; lmtiny.chat.server) and a chat page at http://HOST:PORT/. Requests are batched
continuously: up to --max-batch generate together in one preallocated KV cache, each joining at
the next decode call (every --chunk tokens) whatever its sampling settings, and leaving when done;
more than --max-queue waiting get 503 with Retry-After. Every program is compiled before the
server listens (the start-up line says how long it took), so no request waits for a compile.
--api-key makes /v1/* require `Authorization: Bearer KEY`; --model is the model's name in the API
(default: the run directory as given). RUN is any run directory: a base or SFT run, a merged
one, or a LoRA run (its adapters are folded into its base run's weights on load); without
--step, the newest checkpoint that loads (lmtiny.runs.directory.load_weights). Bad input: one
`error:` line, exit 2.
"""
from __future__ import annotations

import argparse
import sys

from lmtiny import cli
from lmtiny.chat.batching import BatchEngine
from lmtiny.chat.replies import Service
from lmtiny.chat.server import make_server
from lmtiny.model.sampling import Sampler, SamplingError
from lmtiny.runs.directory import load_weights


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m lmtiny.serve", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="run directory")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--max-batch", type=int, default=8, help="slots of the KV cache: sequences generated together")
  p.add_argument("--max-queue", type=int, default=64,
                 help="sequences that may wait for a slot; more get 503 with Retry-After")
  p.add_argument("--max-tokens", type=int, default=256,
                 help="default reply length limit of chat requests (at most the context - 1; the page starts with it)")
  p.add_argument("--chunk", type=int, default=4,
                 help="tokens decoded per call (and per streamed piece; at most the context)")
  p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/*")
  p.add_argument("--model", default=None, help="the model's name in the API (default: --workdir)")
  return p.parse_args(argv)


def _check(args) -> None:
  for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue), ("--max-tokens", args.max_tokens),
                      ("--chunk", args.chunk)):
    if value < 1:
      raise SamplingError(f"{flag}={value}: must be >= 1")
  if not 0 <= args.port <= 65535:
    raise SamplingError(f"--port={args.port}: must be in [0, 65535]")
  if args.api_key is not None and (not args.api_key or args.api_key != args.api_key.strip()):
    raise SamplingError("--api-key: must be non-empty, without leading or trailing spaces")


def run(argv: list[str]) -> int:
  args = parse_args(argv)
  _check(args)
  run, params = load_weights(args.workdir, args.step)
  tok = run.tokenizer
  # Decoding 4 tokens per call (not the sampler's default 16) streams text in smaller pieces.
  engine = BatchEngine(Sampler(run.model(params), chunk=args.chunk), max_batch=args.max_batch,
                       max_queue=args.max_queue, stop_ids=(tok.special_id("assistant_end"), tok.bos_id))
  service = Service(engine, tok, max_tokens=args.max_tokens, model=args.model or args.workdir)
  try:
    server = make_server(service, args.host, args.port, info={"workdir": args.workdir, "step": run.step},
                         api_key=args.api_key)
  except OSError as e:
    raise SamplingError(f"--port={args.port}: cannot listen on {args.host} ({e.strerror})") from None
  address = f"http://{args.host}:{server.server_address[1]}"
  print(f"{args.workdir}: step {run.step} | {args.max_batch} slots, compiled in {engine.compile_seconds:.1f} s | "
        f"OpenAI API at {address}/v1, chat at {address}/ (Ctrl-C stops)", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
  return 0


def main(argv=None) -> int:
  """`argv` without the program name, as argparse takes it."""
  return cli.run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  cli.exit_with(main)
