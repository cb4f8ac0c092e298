"""The chat page lmtiny.serve returns at `/`: one self-contained HTML file (no external assets).

It keeps the conversation in the page, sends it whole to POST /v1/chat/completions (OpenAI's
API, `stream: true` with usage), reads the server-sent chunks as they arrive (fetch + a stream
reader) and appends each delta's text to the reply; the status line shows the tokens (usage),
time to first token and tokens/s measured in the page, the finish reason and how many old
messages the server left out (the reply's `lmtiny.trimmed`). Controls: temperature, top-k, max
tokens, an API key field (only when the server needs one, `render_page(needs_key=True)`), Stop (aborts the request: the server stops
that reply, and the partial reply stays in the history; stopped before its first token, or failed,
the question is left out of the history, so no empty assistant turn is ever sent), New chat
(forgets the history).
`document.body.dataset.state` is "idle" or "generating" (the browser test waits on it).
The max-tokens field starts at the server's default reply limit (`render_page`), so an untouched
page always sends a value the server accepts. `favicon_ico()` is the icon at /favicon.ico, drawn
here (a 32x32 PNG inside an ICO container), so the page has no external or binary assets.
"""
import functools
import struct
import zlib

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lmtiny chat</title>
<link rel="icon" href="/favicon.ico">
<style>
  body { font-family: system-ui, sans-serif; margin: 0; display: flex; flex-direction: column; height: 100vh; }
  header { display: flex; gap: 1em; align-items: center; padding: .5em 1em; border-bottom: 1px solid #ddd;
           flex-wrap: wrap; font-size: .9em; }
  header label { display: flex; gap: .3em; align-items: center; }
  header input { width: 5em; }
  #log { flex: 1; overflow-y: auto; padding: 1em; }
  .message { max-width: 48em; margin: .4em auto; padding: .6em .9em; border-radius: .6em; white-space: pre-wrap; }
  .user { background: #e8f0fe; }
  .assistant { background: #f3f3f3; }
  .assistant.stopped::after { content: " [stopped]"; color: #999; }
  .unanswered { opacity: .55; }
  .user.unanswered::after { content: " [no reply: left out of the conversation]"; color: #999; }
  footer { display: flex; gap: .5em; padding: .6em 1em; border-top: 1px solid #ddd; }
  #input { flex: 1; resize: none; height: 3em; font: inherit; }
  #status { color: #777; font-size: .85em; padding: 0 1em .4em; min-height: 1.2em; }
</style></head>
<body data-state="idle">
<header>
  <strong>lmtiny chat</strong>
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.8"></label>
  <label>top-k <input id="top_k" type="number" min="0" step="1" value="50"></label>
  <label>max tokens <input id="max_tokens" type="number" min="1" max="$MAX" step="1" value="$DEFAULT"></label>
  <label$KEY_HIDDEN>API key <input id="api_key" type="password" autocomplete="off"></label>
  <button id="new">New chat</button>
</header>
<div id="log"></div>
<div id="status"></div>
<footer>
  <textarea id="input" placeholder="Ask something (Enter sends, Shift+Enter for a new line)"></textarea>
  <button id="send">Send</button>
  <button id="stop" disabled>Stop</button>
</footer>
<script>
const $ = (id) => document.getElementById(id);
let history = [];
let controller = null;

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "generating" : "idle";
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send() {
  const text = $("input").value;
  if (!text.trim() || controller) return;
  $("input").value = "";
  history.push({role: "user", content: text});
  const question = bubble("user", text);
  const reply = bubble("assistant", "");
  controller = new AbortController();
  setBusy(true);
  $("status").textContent = "waiting...";
  let done = null, usage = null, trimmed = 0, first = null, pieces = 0;
  const started = performance.now();
  try {
    const headers = {"Content-Type": "application/json"};
    if ($("api_key").value) headers["Authorization"] = "Bearer " + $("api_key").value;
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers, signal: controller.signal,
      body: JSON.stringify({messages: history, stream: true, stream_options: {include_usage: true},
                            temperature: Number($("temperature").value), top_k: Number($("top_k").value),
                            max_tokens: Number($("max_tokens").value), seed: Math.floor(Math.random() * 1e9)})});
    if (!response.ok) {
      const error = await response.json();
      throw new Error((error.error && error.error.message) || response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done: end} = await reader.read();
      if (end) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const line = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        if (chunk.lmtiny) trimmed = chunk.lmtiny.trimmed;
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) {
            if (first === null) first = performance.now();
            pieces += 1;
            reply.textContent += choice.delta.content;
            $("log").scrollTop = $("log").scrollHeight;
          }
          if (choice.finish_reason) done = choice.finish_reason;
        }
      }
    }
    const now = performance.now();
    const tokens = usage ? usage.completion_tokens : pieces;
    const rate = first !== null && now > first && tokens > 1 ? ((tokens - 1) / ((now - first) / 1000)).toFixed(1) : "-";
    const ttft = first !== null ? ((first - started) / 1000).toFixed(2) : "-";
    const left = trimmed ? ` | ${trimmed} oldest messages left out (context)` : "";
    $("status").textContent = done ? `${tokens} tokens | first token ${ttft}s | ${rate} tok/s | ${done}${left}` : "";
  } catch (e) {
    if (e.name === "AbortError") { reply.classList.add("stopped"); $("status").textContent = "stopped"; }
    else { $("status").textContent = "error: " + e.message; }
  }
  if (reply.textContent) {
    history.push({role: "assistant", content: reply.textContent});
  } else {
    // No text came back (an error, or Stop before the first token): forget the question, so the
    // roles keep alternating and no empty assistant turn is sent with the next one.
    history.pop();
    question.classList.add("unanswered");
    reply.classList.add("unanswered");
  }
  controller = null;
  setBusy(false);
  $("input").focus();
}

$("send").onclick = send;
$("stop").onclick = () => { if (controller) controller.abort(); };
$("new").onclick = () => {
  if (controller) controller.abort();
  history = []; $("log").innerHTML = ""; $("status").textContent = "new chat"; $("input").focus();
};
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
});
$("input").focus();
</script>
</body></html>
"""


def render_page(default_max_tokens: int, context: int, needs_key: bool = False) -> str:
  """The page with its max-tokens field set to the server's default, at most context - 1, and
  an API key field when the server needs one."""
  return (PAGE.replace("$DEFAULT", str(default_max_tokens)).replace("$MAX", str(context - 1))
          .replace("$KEY_HIDDEN", "" if needs_key else " hidden"))


ICON_SIZE = 32


def _icon_pixel(x: int, y: int) -> bytes:
  """RGBA of the icon: a blue speech bubble (rounded square and a tail) with three white dots."""
  def inside_rounded(x, y, x0, y0, x1, y1, r):
    cx, cy = min(max(x, x0 + r), x1 - r), min(max(y, y0 + r), y1 - r)
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
  px, py = x + 0.5, y + 0.5
  if any((px - cx) ** 2 + (py - 13) ** 2 <= 6.5 for cx in (9, 16, 23)):
    return b"\xff\xff\xff\xff"
  bubble = inside_rounded(px, py, 1, 2, 31, 24, 6)
  tail = 6 <= px <= 14 and 23 <= py <= 30 and px - 6 >= (py - 23) * 0.2 and px <= 14 - (py - 23)
  return b"\x1a\x73\xe8\xff" if bubble or tail else b"\x00\x00\x00\x00"


def _png(width: int, height: int, rgba_rows: list[bytes]) -> bytes:
  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  raw = b"".join(b"\x00" + row for row in rgba_rows)  # filter type 0 (none) on every row
  header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
          + chunk(b"IEND", b""))


@functools.lru_cache(maxsize=1)
def favicon_ico() -> bytes:
  """/favicon.ico: one 32x32 PNG image in an ICO container (every current browser reads it)."""
  rows = [b"".join(_icon_pixel(x, y) for x in range(ICON_SIZE)) for y in range(ICON_SIZE)]
  png = _png(ICON_SIZE, ICON_SIZE, rows)
  directory = struct.pack("<HHH", 0, 1, 1)  # reserved, type 1 = icon, one image
  entry = struct.pack("<BBBBHHII", ICON_SIZE, ICON_SIZE, 0, 0, 1, 32, len(png), 6 + 16)
  return directory + entry + png
