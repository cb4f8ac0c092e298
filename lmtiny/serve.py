"""python -m lmtiny.serve --workdir RUN [--port 8000] [--host 127.0.0.1] [--step N] [--max-batch 4]
    [--max-queue 64]

Serves a chat page for the run at http://HOST:PORT/ (lmtiny.chat.server): several tabs at once,
replies streamed token by token, temperature / top-k / max-token controls (a new value compiles
nothing), stop and new chat. More than --max-queue requests waiting get 503 with Retry-After.
RUN is any run directory: a base or SFT run, a merged one, or a LoRA run (its adapters are
folded into its base run's weights on load); without --step, the newest checkpoint that loads
(lmtiny.runs.directory.load_weights). Bad input: one `error:` line, exit 2.
"""
from __future__ import annotations

import argparse
import sys

from lmtiny import cli
from lmtiny.chat.server import ChatEngine, make_server
from lmtiny.model.sampling import Sampler, SamplingError
from lmtiny.runs.directory import load_weights


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m lmtiny.serve", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="run directory")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--max-batch", type=int, default=4, help="requests generated together (1 = one at a time)")
  p.add_argument("--max-queue", type=int, default=64,
                 help="requests that may wait for generation; more get 503 with Retry-After")
  p.add_argument("--max-tokens", type=int, default=256,
                 help="default reply length limit (at most the context - 1; the page starts with it)")
  p.add_argument("--chunk", type=int, default=4, help="tokens decoded per call (and per streamed piece; at most the context)")
  return p.parse_args(argv)


def run(argv: list[str]) -> int:
  args = parse_args(argv)
  for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue), ("--max-tokens", args.max_tokens),
                      ("--chunk", args.chunk)):
    if value < 1:
      raise SamplingError(f"{flag}={value}: must be >= 1")
  if not 0 <= args.port <= 65535:
    raise SamplingError(f"--port={args.port}: must be in [0, 65535]")
  run, params = load_weights(args.workdir, args.step)
  context = run.cfg.model.max_seq_len
  # Decoding 4 tokens per call (not the sampler's default 16) streams text in smaller pieces.
  engine = ChatEngine(Sampler(run.model(params), chunk=args.chunk), run.tokenizer, context, max_batch=args.max_batch,
                      max_tokens=args.max_tokens, max_queue=args.max_queue)
  try:
    server = make_server(engine, args.host, args.port, info={"workdir": args.workdir, "step": run.step})
  except OSError as e:
    raise SamplingError(f"--port={args.port}: cannot listen on {args.host} ({e.strerror})") from None
  print(f"{args.workdir}: step {run.step} | chat at http://{args.host}:{server.server_address[1]}/ "
        "(Ctrl-C stops)", flush=True)
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
  sys.exit(main())
