"""Continuous batching under load: lmtiny.serve's OpenAI API with 1, 8, 32 ... concurrent clients.

  python benchmarks/serve_load.py --config tiny [--clients 1 8 32] [--max-batch 32] [--max-tokens 64]
  python benchmarks/serve_load.py --workdir RUN

Starts the server in this process (port 0; the engine compiles everything first). For each client
count N it measures, as medians over --repeats rounds (after one warm-up round):
  engine  N jobs submitted to the engine at once (no HTTP): the tokens they got over the wall
          time, i.e. what the model and the batching give;
  http    N simultaneous streamed chat requests (temperature 1, a different seed each,
          `stream_options.include_usage`), each client on its own connection and thread, all in
          one client process (spawned, so that it does not share this one's interpreter lock):
          time to first token and decode tokens/s per request (after its first token), the total
          (completion tokens of the round over its wall time), and the engine's mean busy slots
          per decode step.
With random weights a reply can end early (a sampled <|assistant_end|> or <|bos|>): the counts are
the tokens really generated.
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lmtiny.chat.batching import BatchEngine, Job, Tokens  # noqa: E402
from lmtiny.chat.replies import Service  # noqa: E402
from lmtiny.chat.server import make_server  # noqa: E402
from lmtiny.model.sampling import Sampler, SamplingParams  # noqa: E402


def _model(args):
  if args.workdir:
    from lmtiny.runs.directory import load_weights
    run, params = load_weights(args.workdir)
    return run.model(params), run.tokenizer
  from flax import nnx
  from lmtiny import config as config_lib
  from lmtiny.data.dataset import load_data
  from lmtiny.model.transformer import Transformer
  cfg = config_lib.load_file(os.path.join(ROOT, "configs", f"{args.config}.py"))
  tok = load_data(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=cfg.train.seq_len).tokenizer
  return Transformer(cfg.model, nnx.Rngs(0)), tok


def _request(port: int, i: int, max_tokens: int) -> dict:
  body = json.dumps({"messages": [{"role": "user", "content": f"Question {i}: what does os.path.join do?"}],
                     "max_tokens": max_tokens, "temperature": 1.0, "seed": i, "stream": True,
                     "stream_options": {"include_usage": True}}).encode()
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
  start = time.perf_counter()
  conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
  response = conn.getresponse()
  first, tokens, buffer = None, 0, b""
  while chunk := response.read1(65536):
    buffer += chunk
    while b"\n\n" in buffer:
      line, buffer = buffer.split(b"\n\n", 1)
      if line == b"data: [DONE]":
        continue
      event = json.loads(line[6:])
      if first is None and any(c["delta"].get("content") for c in event["choices"]):
        first = time.perf_counter()
      if event.get("usage"):
        tokens = event["usage"]["completion_tokens"]
  end = time.perf_counter()
  conn.close()
  first = first or end
  return {"start": start, "end": end, "ttft": first - start, "tokens": tokens,
          "decode_tps": (tokens - 1) / (end - first) if end > first and tokens > 1 else 0.0}


def _round(port: int, clients: int, max_tokens: int, offset: int) -> list[dict]:
  results = [None] * clients
  barrier = threading.Barrier(clients)

  def client(i):
    barrier.wait()
    results[i] = _request(port, offset + i, max_tokens)

  threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return results


def _engine_round(engine, tok, n: int, max_tokens: int, offset: int) -> float:
  """Tokens per second of n jobs submitted together straight to the engine."""
  jobs = [Job([tok.bos_id] + tok.encode(f"Question {offset + i}: what does os.path.join do?"), max_tokens,
              SamplingParams(1.0, 0, 1.0), seed=offset + i) for i in range(n)]
  start, got = time.perf_counter(), 0
  engine.submit(jobs)
  for job in jobs:
    while True:
      _, event = job.events.get()
      if not isinstance(event, Tokens):
        break
      got += len(event.ids)
  return got / (time.perf_counter() - start)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a run directory")
  source.add_argument("--config", help="a config name (random weights)")
  p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
  p.add_argument("--max-batch", type=int, default=32)
  p.add_argument("--max-tokens", type=int, default=64)
  p.add_argument("--chunk", type=int, default=4)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  import jax
  model, tok = _model(args)
  engine = BatchEngine(Sampler(model, chunk=args.chunk), max_batch=args.max_batch, max_queue=4 * max(args.clients),
                       stop_ids=(tok.special_id("assistant_end"), tok.bos_id))
  server = make_server(Service(engine, tok, max_tokens=args.max_tokens), port=0)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  port = server.server_address[1]
  print(f"{args.workdir or args.config} | {jax.devices()[0].platform} x{os.cpu_count()} cores | max_batch "
        f"{args.max_batch} | chunk {args.chunk} | max_tokens {args.max_tokens} | compiled in "
        f"{engine.compile_seconds:.1f} s")
  seed = 0
  clients = multiprocessing.get_context("spawn").Pool(1)
  for n in args.clients:
    engine_tps = []
    for _ in range(args.repeats + 1):
      engine_tps.append(_engine_round(engine, tok, n, args.max_tokens, seed))
      seed += n
    clients.apply(_round, (port, n, args.max_tokens, seed))  # warm-up round (caches, threads)
    seed += n
    ttft, tps, total, busy = [], [], [], []
    for _ in range(args.repeats):
      calls, tokens = engine.decode_calls, engine.decode_tokens
      results = clients.apply(_round, (port, n, args.max_tokens, seed))
      seed += n
      ttft += [r["ttft"] for r in results]
      tps += [r["decode_tps"] for r in results]
      span = max(r["end"] for r in results) - min(r["start"] for r in results)
      total.append(sum(r["tokens"] for r in results) / span)
      busy.append((engine.decode_tokens - tokens) / max(1, (engine.decode_calls - calls) * engine.chunk))
    print(f"{n:4d} clients: engine {statistics.median(engine_tps[1:]):7.1f} tok/s | http: first token "
          f"{1000 * statistics.median(ttft):5.0f} ms (median, max {1000 * max(ttft):.0f}) | per request "
          f"{statistics.median(tps):6.1f} tok/s | total {statistics.median(total):7.1f} tok/s | busy slots per "
          f"step {statistics.median(busy):.1f}")
  clients.close()
  server.shutdown()


if __name__ == "__main__":
  main()
