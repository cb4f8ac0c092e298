"""Chat server speed on this machine: time to first token and tokens/s with 1 and 4 concurrent chats.

  python benchmarks/serve.py --workdir RUN [--max-tokens 64] [--repeats 3] [--max-batch 4]
  python benchmarks/serve.py --config tiny       # random weights, the embedded corpus's tokenizer

Starts lmtiny's chat server in this process (port 0) and talks to it over HTTP like the page
does. Replies are greedy (temperature 0) and end early only if the model ends its turn; tokens/s
counts the tokens each reply really got. Two warm-up rounds per concurrency compile the programs
first. Prints medians over --repeats rounds: per-chat time
to first token (from sending the request to the first streamed text), per-chat decode tokens/s
(after the first token), and the server's total tokens/s over the round.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QUESTIONS = ["What does os.path.join do?", "Explain json.dumps.", "What is collections.OrderedDict?",
             "How do I call shutil.copyfile?"]


def _engine(args):
  from lmtiny.chat.server import ChatEngine
  from lmtiny.sampling import Sampler
  if args.workdir:
    from lmtiny.rundir import load_weights
    run, params = load_weights(args.workdir)
    model, tok, context = run.model(params), run.tokenizer, run.cfg.model.max_seq_len
  else:
    from flax import nnx
    from lmtiny import config as config_lib
    from lmtiny.data.dataset import load_data
    from lmtiny.model import Transformer
    cfg = config_lib.load_file(os.path.join(ROOT, "configs", f"{args.config}.py"))
    tok = load_data(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=cfg.train.seq_len).tokenizer
    model, context = Transformer(cfg.model, nnx.Rngs(0)), cfg.model.max_seq_len
  return ChatEngine(Sampler(model, chunk=4), tok, context, max_batch=args.max_batch, max_tokens=args.max_tokens)


def _chat(port: int, question: str, max_tokens: int, seed: int) -> dict:
  body = json.dumps({"messages": [{"role": "user", "content": question}], "temperature": 0.0,
                     "max_tokens": max_tokens, "seed": seed}).encode()
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
  start = time.perf_counter()
  conn.request("POST", "/chat/completions", body=body, headers={"Content-Type": "application/json"})
  response = conn.getresponse()
  first, done, buffer = None, None, b""
  while chunk := response.read1(4096):
    buffer += chunk
    while b"\n\n" in buffer:
      line, buffer = buffer.split(b"\n\n", 1)
      event = json.loads(line[6:])
      if "token" in event and first is None:
        first = time.perf_counter()
      done = event if "done" in event else done
  end = time.perf_counter()
  conn.close()
  first = first or end
  tokens = done["tokens"] if done else 0
  return {"ttft": first - start, "tokens": tokens, "decode_tps": (tokens - 1) / (end - first) if end > first else 0.0,
          "start": start, "end": end}


def _round(port: int, concurrency: int, max_tokens: int) -> list[dict]:
  results = [None] * concurrency
  barrier = threading.Barrier(concurrency)

  def client(i):
    barrier.wait()
    results[i] = _chat(port, QUESTIONS[i % len(QUESTIONS)], max_tokens, i)

  threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return results


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a run directory")
  source.add_argument("--config", help="a config name (random weights)")
  p.add_argument("--max-tokens", type=int, default=64)
  p.add_argument("--max-batch", type=int, default=4)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
  args = p.parse_args()
  import jax
  from lmtiny.chat.server import make_server
  server = make_server(_engine(args), port=0)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  port = server.server_address[1]
  print(f"{args.workdir or args.config} | {jax.devices()[0].platform} x{os.cpu_count()} cores | "
        f"max_tokens {args.max_tokens} | max_batch {args.max_batch}")
  for n in args.concurrency:
    for _ in range(2):  # warm-up: compiles the batch shapes this concurrency gives
      _round(port, n, args.max_tokens)
    ttft, tps, total = [], [], []
    for _ in range(args.repeats):
      results = _round(port, n, args.max_tokens)
      ttft += [r["ttft"] for r in results]
      tps += [r["decode_tps"] for r in results]
      span = max(r["end"] for r in results) - min(r["start"] for r in results)
      total.append(sum(r["tokens"] for r in results) / span)
    print(f"{n} concurrent chat(s): time to first token {1000 * statistics.median(ttft):.0f} ms (median, "
          f"max {1000 * max(ttft):.0f}) | per-chat decode {statistics.median(tps):.1f} tok/s | "
          f"server total {statistics.median(total):.1f} tok/s")
  server.shutdown()


if __name__ == "__main__":
  main()
