"""The chat page lmtiny.serve returns at `/`: one self-contained HTML file (no external assets).

It keeps the conversation in the page, sends it whole to POST /chat/completions, reads the
server-sent events as they arrive (fetch + a stream reader) and appends each piece of text to
the reply. Controls: temperature, top-k, max tokens, Stop (aborts the request: the server stops
that reply, and the partial reply stays in the history), New chat (forgets the history).
`document.body.dataset.state` is "idle" or "generating" (the browser test waits on it).
The max-tokens field starts at the server's default reply limit (`render_page`), so an untouched
page always sends a value the server accepts.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lmtiny chat</title>
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
  bubble("user", text);
  const reply = bubble("assistant", "");
  controller = new AbortController();
  setBusy(true);
  $("status").textContent = "waiting...";
  let done = null;
  try {
    const response = await fetch("/chat/completions", {
      method: "POST", headers: {"Content-Type": "application/json"}, signal: controller.signal,
      body: JSON.stringify({messages: history, temperature: Number($("temperature").value),
                            top_k: Number($("top_k").value), max_tokens: Number($("max_tokens").value),
                            seed: Math.floor(Math.random() * 1e9)})});
    if (!response.ok) {
      const error = await response.json();
      throw new Error(error.error || response.statusText);
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
        if (!line.startsWith("data: ")) continue;
        const event = JSON.parse(line.slice(6));
        if (event.token) { reply.textContent += event.token; $("log").scrollTop = $("log").scrollHeight; }
        if (event.error) throw new Error(event.error);
        if (event.done) done = event;
      }
    }
    const trimmed = done && done.trimmed ? ` | ${done.trimmed} oldest messages left out (context)` : "";
    $("status").textContent = done ? `${done.tokens} tokens | first token ${done.ttft_s}s | ` +
        `${done.tokens_per_s || "-"} tok/s | ${done.finish_reason}${trimmed}` : "";
  } catch (e) {
    if (e.name === "AbortError") { reply.classList.add("stopped"); $("status").textContent = "stopped"; }
    else { $("status").textContent = "error: " + e.message; }
  }
  if (reply.textContent || reply.classList.contains("stopped")) {
    history.push({role: "assistant", content: reply.textContent});
  } else {
    history.pop();  // nothing came back: forget the question so the roles keep alternating
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


def render_page(default_max_tokens: int, context: int) -> str:
  """The page with its max-tokens field set to the server's default, at most context - 1."""
  return PAGE.replace("$DEFAULT", str(default_max_tokens)).replace("$MAX", str(context - 1))
