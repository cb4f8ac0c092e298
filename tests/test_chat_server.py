"""The chat server over HTTP: streamed replies equal the sampler's, concurrent requests equal
sequential ones, bad requests get 4xx JSON, long chats lose their oldest turns, the page's
default reply limit is one the server accepts; `python -m lmtiny.serve` flag checks; and the page
end to end in headless Chromium."""
import http.client
import json
import re
import shutil
import threading

import numpy as np
import pytest
from flax import nnx

from chat_fixtures import chat_config, make_tokenizer
from lmtiny import serve
from lmtiny.chat.server import ChatEngine, make_server
from lmtiny.model import Transformer
from lmtiny.sampling import Sampler, SamplingParams
from lmtiny.tokenizer import render_for_completion

CONTEXT = 64


def _serve(context, **engine_kw):
  tok = make_tokenizer()
  cfg = chat_config(tok)
  cfg.model.max_seq_len = context
  sampler = Sampler(Transformer(cfg.model, nnx.Rngs(0)), chunk=4)  # as lmtiny.serve streams
  engine = ChatEngine(sampler, tok, context, max_batch=4, **engine_kw)
  server = make_server(engine, port=0, info={"step": 0})
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server, tok, sampler


@pytest.fixture(scope="module")
def served():
  server, tok, sampler = _serve(CONTEXT, max_tokens=12)
  yield server.server_address[1], tok, sampler
  server.shutdown()
  server.server_close()


@pytest.fixture(scope="module")
def served_256():
  """The README's demo shape: a 256-token context and lmtiny.serve's default --max-tokens 256."""
  server, tok, sampler = _serve(256)
  yield server.server_address[1], tok, sampler
  server.shutdown()
  server.server_close()


def _get(port, path):
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
  conn.request("GET", path)
  data = conn.getresponse().read().decode()
  conn.close()
  return data


def _post(port, body, raw=None):
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
  data = raw if raw is not None else json.dumps(body).encode()
  conn.request("POST", "/chat/completions", body=data, headers={"Content-Type": "application/json"})
  response = conn.getresponse()
  payload = response.read().decode()
  conn.close()
  if response.getheader("Content-Type") == "text/event-stream":
    events = [json.loads(chunk[6:]) for chunk in payload.split("\n\n") if chunk.startswith("data: ")]
    return response.status, events
  return response.status, json.loads(payload)


def _reply(events):
  return "".join(e.get("token", "") for e in events), events[-1]


def _expected(tok, sampler, messages, *, temperature, top_k, max_tokens, seed):
  ids = render_for_completion(tok, messages)
  out = sampler.generate([ids], max_new_tokens=max_tokens, sampling=SamplingParams(temperature, top_k, 1.0),
                         seed=0, rows=[seed], stop_ids=(tok.special_id("assistant_end"), tok.bos_id))
  return tok.decode(out.tokens[0])


def _chat(text):
  return [{"role": "user", "content": text}]


def test_stream_is_the_samplers_reply(served):
  port, tok, sampler = served
  for temperature, seed in ((0.0, 0), (0.9, 7)):
    body = dict(messages=_chat("What does os.path.join do?"), temperature=temperature, top_k=20,
                max_tokens=10, seed=seed)
    status, events = _post(port, body)
    text, done = _reply(events)
    assert status == 200 and done["done"] and len(events) > 2  # streamed in pieces
    assert text == _expected(tok, sampler, body["messages"], temperature=temperature, top_k=20,
                             max_tokens=10, seed=seed)
    assert done["tokens"] <= 10 and done["finish_reason"] in ("stop", "length") and done["trimmed"] == 0


def test_concurrent_requests_give_the_sequential_replies(served):
  port, _, _ = served
  # The stream test's settings, so the batch-1 programs are compiled already.
  bodies = [dict(messages=_chat(f"Question number {i}?" + " more" * i), temperature=0.9, top_k=20,
                 max_tokens=10, seed=i) for i in range(4)]
  sequential = [_reply(_post(port, b)[1])[0] for b in bodies]
  results = [None] * 4
  barrier = threading.Barrier(4)

  def client(i):
    barrier.wait()
    results[i] = _reply(_post(port, bodies[i])[1])[0]

  threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert results == sequential
  assert len(set(sequential)) == 4


def test_long_chats_lose_their_oldest_exchanges(served):
  port, tok, sampler = served
  long = "tell me about the standard library " * 3
  messages = []
  for i in range(4):
    messages += [{"role": "user", "content": f"{i} {long}"}, {"role": "assistant", "content": f"answer {i} {long}"}]
  messages += _chat("last question")
  status, events = _post(port, dict(messages=messages, temperature=0.0, max_tokens=8))
  text, done = _reply(events)
  assert status == 200 and done["trimmed"] >= 2 and done["trimmed"] % 2 == 0
  kept = messages[done["trimmed"]:]
  assert len(render_for_completion(tok, kept)) <= CONTEXT - 8 < len(render_for_completion(tok, messages[done["trimmed"] - 2:]))
  assert text == _expected(tok, sampler, kept, temperature=0.0, top_k=50, max_tokens=8, seed=0)


def test_the_pages_default_reply_limit_works_and_keeps_the_history(served_256):
  port, tok, sampler = served_256
  assert json.loads(_get(port, "/health")) == {"ok": True, "step": 0, "context": 256, "default_max_tokens": 255}
  page_max_tokens = int(re.search(r'id="max_tokens"[^>]* value="(\d+)"', _get(port, "/")).group(1))
  assert page_max_tokens == 255
  # A second turn as the page sends it (~40 tokens of history): nothing is left out, and the reply
  # runs until <|assistant_end|> or the context's end.
  messages = _chat("What does os.path.join do?") + [{"role": "assistant", "content": "It joins paths."}] + \
      _chat("And os.path.split?")
  ids = render_for_completion(tok, messages)
  status, events = _post(port, dict(messages=messages, temperature=0.0, max_tokens=page_max_tokens))
  text, done = _reply(events)
  assert status == 200 and done["trimmed"] == 0
  assert text == _expected(tok, sampler, messages, temperature=0.0, top_k=50, max_tokens=255, seed=0)
  assert done["tokens"] <= 256 - len(ids)
  assert (done["finish_reason"] == "length") == (len(ids) + done["tokens"] == 256)
  # An explicit limit past the context is still the client's error.
  status, payload = _post(port, dict(messages=messages, max_tokens=256))
  assert status == 400 and payload["error"].startswith("max_tokens=256: must be in [1, 255]")


def test_a_system_message_comes_first(served):
  port, tok, sampler = served
  messages = [{"role": "system", "content": "Answer briefly."}] + _chat("What does os.path.join do?")
  status, events = _post(port, dict(messages=messages, temperature=0.0, top_k=20, max_tokens=10))
  text, done = _reply(events)
  assert status == 200 and done["done"] and done["trimmed"] == 0
  assert text == _expected(tok, sampler, messages, temperature=0.0, top_k=20, max_tokens=10, seed=0)


@pytest.mark.parametrize("body, status, message", [
    (b"{nope", 400, "invalid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"messages": []}, 400, "messages: must be a non-empty list"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages\\[0\\]"),
    ({"messages": [{"role": "user", "content": 3}]}, 400, "messages\\[0\\]"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages\\[0\\]"),
    ({"messages": _chat("a") + [{"role": "system", "content": "s"}] + _chat("b")}, 400, "messages\\[1\\]"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]}, 400,
     'messages\\[1\\]: must be {"role": "user"'),
    ({"messages": [{"role": "system", "content": "s"}]}, 400, "last message must be the user's"),
    ({"messages": _chat("a") + [{"role": "assistant", "content": "b"}]}, 400, "last message must be the user's"),
    ({"messages": _chat("a"), "temperature": "hot"}, 400, "temperature: must be a number"),
    ({"messages": _chat("a"), "top_k": 2.5}, 400, "top_k: must be an integer"),
    ({"messages": _chat("a"), "max_tokens": CONTEXT}, 400, f"max_tokens={CONTEXT}"),
    ({"messages": _chat("word " * 200)}, 413, "context is 64"),
])
def test_bad_requests_get_a_4xx_json_error(served, body, status, message):
  port = served[0]
  got_status, payload = _post(port, None, raw=body if isinstance(body, bytes) else json.dumps(body).encode())
  assert got_status == status
  assert pytest.importorskip("re").search(message, payload["error"])


def test_other_paths_and_methods(served):
  port = served[0]
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
  for method, path, status in (("GET", "/nope", 404), ("GET", "/chat/completions", 405), ("POST", "/x", 404)):
    conn.request(method, path, body=b"{}" if method == "POST" else None)
    response = conn.getresponse()
    assert response.status == status and "error" in json.loads(response.read())
  conn.request("GET", "/health")
  assert json.loads(conn.getresponse().read()) == {"ok": True, "step": 0, "context": CONTEXT, "default_max_tokens": 12}
  conn.request("GET", "/")
  page = conn.getresponse().read().decode()
  assert "/chat/completions" in page and 'id="stop"' in page
  assert f'id="max_tokens" type="number" min="1" max="{CONTEXT - 1}" step="1" value="12"' in page
  conn.close()


@pytest.mark.parametrize("flag, value, message", [
    ("--max-tokens", "0", "--max-tokens=0: must be >= 1"),
    ("--chunk", "0", "--chunk=0: must be >= 1"),
    ("--max-batch", "-1", "--max-batch=-1: must be >= 1"),
    ("--port", "70000", "--port=70000: must be in [0, 65535]"),
])
def test_serve_rejects_bad_flags_before_loading(tmp_path, capsys, flag, value, message):
  # The run directory does not exist: a flag that got past the checks would fail on it instead.
  assert serve.main(["--workdir", str(tmp_path / "missing"), flag, value]) == 2
  assert capsys.readouterr().err == f"error: {message}\n"


def _chromium():
  return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium chromium-driver)")
def test_page_in_headless_chromium(served):
  webdriver = pytest.importorskip("selenium.webdriver")
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  port, tok, sampler = served
  options = webdriver.ChromeOptions()
  options.binary_location = _chromium()
  for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
    options.add_argument(flag)
  driver_path = shutil.which("chromedriver")
  service = webdriver.ChromeService(executable_path=driver_path) if driver_path else None
  driver = webdriver.Chrome(options=options, service=service)
  try:
    driver.get(f"http://127.0.0.1:{port}/")
    wait = WebDriverWait(driver, 60)
    for name, value in (("temperature", "0"), ("max_tokens", "8")):
      box = driver.find_element(By.ID, name)
      box.clear()
      box.send_keys(value)

    def ask(text):
      driver.find_element(By.ID, "input").send_keys(text)
      driver.find_element(By.ID, "send").click()
      wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle"
                 and "tok/s" in d.find_element(By.ID, "status").text)
      return driver.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1].get_attribute("textContent")

    first = ask("Hello there")
    history = _chat("Hello there")
    assert first == _expected(tok, sampler, history, temperature=0.0, top_k=50, max_tokens=8, seed=0)
    second = ask("And now?")  # the page sends the whole conversation
    history += [{"role": "assistant", "content": first}] + _chat("And now?")
    assert len(driver.find_elements(By.CSS_SELECTOR, ".message")) == 4
    assert second == _expected(tok, sampler, history, temperature=0.0, top_k=50, max_tokens=8,
                                       seed=0)
    driver.find_element(By.ID, "new").click()
    assert driver.find_elements(By.CSS_SELECTOR, ".message") == []
    assert driver.find_element(By.ID, "stop").get_attribute("disabled") is not None
  finally:
    driver.quit()
