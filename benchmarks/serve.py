"""Chat server speed and robustness on this machine.

  python benchmarks/serve.py --workdir RUN [--max-tokens 64] [--repeats 3] [--max-batch 4]
  python benchmarks/serve.py --config tiny       # random weights, the embedded corpus's tokenizer
  python benchmarks/serve.py --config tiny --measure mixed history clients

Starts lmtiny's chat server in this process (port 0) and talks to it over HTTP like the page
does. --measure picks what is measured (default: speed):
  speed    time to first token and tokens/s with 1 and 4 concurrent chats (--concurrency). Replies
           are greedy (temperature 0) and end early only if the model ends its turn; tokens/s
           counts the tokens each reply really got. Two warm-up rounds per concurrency compile the
           programs first. Prints medians over --repeats rounds: per-chat time to first token,
           per-chat decode tokens/s (after the first token), the server's total tokens/s.
  mixed    one request, then 8 more one after another, each with a new temperature / top-k (as a
           user trying the page's controls): wall time, and the programs jax lowered and the
           seconds it spent compiling them.
  history  the time to fit a history of --exchanges exchanges (~36 bytes a message, as in the
           219 KB, 6,001-message report) into the context (the server's request parsing).
  clients  --clients simultaneous chats (one connection each, loopback): how many got 200 and
           503 (queue full, with Retry-After), how many failed (reset, no reply), the slowest.
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
  from lmtiny.model.sampling import Sampler
  if args.workdir:
    from lmtiny.runs.directory import load_weights
    run, params = load_weights(args.workdir)
    model, tok, context = run.model(params), run.tokenizer, run.cfg.model.max_seq_len
  else:
    from flax import nnx
    from lmtiny import config as config_lib
    from lmtiny.data.dataset import load_data
    from lmtiny.model.transformer import Transformer
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


MIXED = [(0.7, 40), (1.0, 50), (0.5, 20), (0.9, 0), (0.0, 50), (1.2, 100), (0.6, 10), (0.85, 30)]


def _listen_compiles():
  """Counts programs lowered and the seconds spent compiling them (jax's monitoring events)."""
  import jax
  tally = {"lowered": 0, "compile_s": 0.0}

  def listener(event, duration_secs, **kwargs):
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      tally["lowered"] += 1
    elif event == "/jax/core/compile/backend_compile_duration":
      tally["compile_s"] += duration_secs
  jax.monitoring.register_event_duration_secs_listener(listener)
  return tally


def _post(port: int, body: dict, timeout: float = 600) -> tuple:
  """(status, Retry-After, seconds) of one request read to its end; status "error: ..." when the
  connection failed."""
  start = time.perf_counter()
  try:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/chat/completions", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status, response.getheader("Retry-After"), time.perf_counter() - start
  except OSError as e:
    return f"error: {type(e).__name__}", None, time.perf_counter() - start


def measure_mixed(port: int, max_tokens: int) -> None:
  tally = _listen_compiles()
  messages = [{"role": "user", "content": QUESTIONS[0]}]
  start = time.perf_counter()
  _post(port, dict(messages=messages, temperature=0.8, top_k=50, max_tokens=max_tokens))
  first = time.perf_counter() - start
  print(f"mixed: first request (temperature 0.8, top-k 50) {first:.1f} s, {tally['lowered']} programs lowered, "
        f"{tally['compile_s']:.1f} s compiling")
  tally.update(lowered=0, compile_s=0.0)
  start = time.perf_counter()
  for temperature, top_k in MIXED:
    _post(port, dict(messages=messages, temperature=temperature, top_k=top_k, max_tokens=max_tokens))
  print(f"mixed: {len(MIXED)} requests with new temperature/top-k values {time.perf_counter() - start:.1f} s, "
        f"{tally['lowered']} programs lowered, {tally['compile_s']:.1f} s compiling")


def measure_history(engine, exchanges: int) -> None:
  messages = []
  for i in range(exchanges):
    messages += [{"role": "user", "content": f"question {i}: what does os.path.join do?"},
                 {"role": "assistant", "content": f"answer {i}: it joins path parts."}]
  messages.append({"role": "user", "content": "and os.path.split?"})
  size = len(json.dumps({"messages": messages}))
  start = time.perf_counter()
  request = engine.parse({"messages": messages, "max_tokens": 64})
  print(f"history: {len(messages)} messages ({size / 1000:.0f} KB) fitted in {time.perf_counter() - start:.3f} s "
        f"({request.trimmed} oldest left out, {len(request.ids)} prompt tokens)")


def measure_clients(port: int, clients: int, max_tokens: int, max_batch: int) -> None:
  _round(port, max_batch, max_tokens)  # warm-up: compiles the full batch's programs
  results = [None] * clients
  barrier = threading.Barrier(clients)
  body = dict(messages=[{"role": "user", "content": QUESTIONS[1]}], temperature=0.0, max_tokens=max_tokens)

  def client(i):
    barrier.wait()
    results[i] = _post(port, body, timeout=120)

  threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  ok = sum(r[0] == 200 for r in results)
  busy = sum(r[0] == 503 and r[1] is not None for r in results)
  failed = clients - ok - busy
  kinds = sorted({r[0] for r in results if r[0] not in (200, 503)}, key=str)
  print(f"clients: {clients} at once, {max_tokens} tokens each: {ok} got 200, {busy} got 503 with Retry-After, "
        f"{failed} failed{' (' + ', '.join(map(str, kinds)) + ')' if kinds else ''}; slowest "
        f"{max(r[2] for r in results):.1f} s")


def measure_speed(port: int, args) -> None:
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


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a run directory")
  source.add_argument("--config", help="a config name (random weights)")
  p.add_argument("--max-tokens", type=int, default=64)
  p.add_argument("--max-batch", type=int, default=4)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
  p.add_argument("--measure", nargs="+", choices=("speed", "mixed", "history", "clients"), default=["speed"])
  p.add_argument("--exchanges", type=int, default=1000, help="history: user/assistant exchanges")
  p.add_argument("--clients", type=int, default=100, help="clients: simultaneous chats")
  args = p.parse_args()
  import jax
  from lmtiny.chat.server import make_server
  engine = _engine(args)
  server = make_server(engine, port=0)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  port = server.server_address[1]
  print(f"{args.workdir or args.config} | {jax.devices()[0].platform} x{os.cpu_count()} cores | "
        f"max_tokens {args.max_tokens} | max_batch {args.max_batch}")
  for what in args.measure:
    if what == "speed":
      measure_speed(port, args)
    elif what == "mixed":
      measure_mixed(port, args.max_tokens)
    elif what == "history":
      measure_history(engine, args.exchanges)
    else:
      measure_clients(port, args.clients, args.max_tokens, args.max_batch)
  server.shutdown()


if __name__ == "__main__":
  main()
