"""The chat page served at `/` by `loratune serve --ui`: one self-contained HTML file (no CDN, no build step,
works offline) that streams answers from `/v1/chat/completions` and exposes the generation settings.

A page of our own instead of Gradio: a few kilobytes, no extra dependency, same origin as the API (so no CORS
and the same API key), and it speaks exactly the OpenAI streaming format the server already emits.
"""

from __future__ import annotations

import html
import json

from loratune.generate import SamplingSettings

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>loratune chat: __TITLE__</title>
<style>
  :root { font-family: system-ui, sans-serif; color: #1d2433; background: #f4f6fa; }
  body { margin: 0; display: flex; height: 100vh; } [hidden] { display: none !important; }
  aside { width: 250px; padding: 16px; background: #fff; border-right: 1px solid #dde2ec; overflow-y: auto; }
  aside h1 { font-size: 16px; margin: 0 0 4px; } aside .model { font-size: 12px; color: #5a6478; word-break: break-all; }
  label { display: block; font-size: 12px; margin-top: 12px; color: #3b4459; }
  input, textarea { width: 100%; box-sizing: border-box; font: inherit; font-size: 13px; padding: 5px;
                    border: 1px solid #c7cedb; border-radius: 4px; }
  main { flex: 1; display: flex; flex-direction: column; }
  #log { flex: 1; overflow-y: auto; padding: 16px 24px; }
  .msg { max-width: 760px; margin: 8px 0; padding: 8px 12px; border-radius: 8px; white-space: pre-wrap; }
  .user { background: #dbe7ff; margin-left: auto; } .assistant { background: #fff; border: 1px solid #dde2ec; }
  .error { background: #ffe3e3; color: #8a1c1c; }
  form { display: flex; gap: 8px; padding: 12px 24px; background: #fff; border-top: 1px solid #dde2ec; }
  #prompt { flex: 1; resize: none; height: 44px; }
  button { padding: 0 16px; border: 0; border-radius: 4px; background: #2f6fed; color: #fff; font-size: 14px; }
  button:disabled { background: #9db7ef; } #status { font-size: 12px; color: #5a6478; margin-top: 16px; }
</style></head>
<body>
<aside>
  <h1>loratune chat</h1><div class="model">__TITLE__</div>
  <label>System prompt<textarea id="system" rows="4" placeholder="optional"></textarea></label>
  <label>Temperature <span id="temperature-v"></span>
    <input id="temperature" type="range" min="0" max="2" step="0.05" value="__TEMPERATURE__"></label>
  <label>Top p <span id="top_p-v"></span><input id="top_p" type="range" min="0.05" max="1" step="0.05" value="__TOP_P__"></label>
  <label>Max tokens<input id="max_tokens" type="number" min="1" max="__MAX_LIMIT__" value="__MAX_TOKENS__"></label>
  <label id="key-row" __KEY_HIDDEN__>API key<input id="api_key" type="password" autocomplete="off"></label>
  <label><button id="reset" type="button" style="height:28px;background:#5a6478">New conversation</button></label>
  <div id="status" data-chunks="0">ready</div>
</aside>
<main>
  <div id="log"></div>
  <form id="form"><textarea id="prompt" placeholder="Ask something (Enter sends, Shift+Enter: new line)"></textarea>
    <button id="send" type="submit">Send</button></form>
</main>
<script>
const MODEL = __MODEL_JSON__;
const $ = (id) => document.getElementById(id);
let history = [];
for (const id of ["temperature", "top_p"]) {
  const show = () => { $(id + "-v").textContent = $(id).value; };
  $(id).addEventListener("input", show); show();
}
function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role; div.textContent = text;
  $("log").appendChild(div); $("log").scrollTop = $("log").scrollHeight;
  return div;
}
$("reset").onclick = () => { history = []; $("log").innerHTML = ""; $("status").textContent = "ready"; };
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
$("form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text) return;
  $("prompt").value = ""; $("send").disabled = true;
  history.push({role: "user", content: text});
  bubble("user", text);
  const out = bubble("assistant", ""); out.id = "answer-" + history.length;
  const messages = [...history];
  const system = $("system").value.trim();
  if (system) messages.unshift({role: "system", content: system});
  const headers = {"Content-Type": "application/json"};
  if ($("api_key").value) headers["Authorization"] = "Bearer " + $("api_key").value;
  const body = {model: MODEL, messages, stream: true, temperature: parseFloat($("temperature").value),
                top_p: parseFloat($("top_p").value), max_tokens: parseInt($("max_tokens").value, 10)};
  let chunks = 0, answer = "";
  const status = $("status");
  status.textContent = "generating...";
  try {
    const response = await fetch("/v1/chat/completions", {method: "POST", headers, body: JSON.stringify(body)});
    if (!response.ok) {
      const err = await response.json().catch(() => ({error: {message: response.statusText}}));
      throw new Error(response.status + ": " + err.error.message);
    }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const line = buffer.slice(0, cut).trim(); buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message);
        const delta = event.choices[0] && event.choices[0].delta.content;
        if (delta) {
          chunks += 1; answer += delta; out.textContent = answer;
          status.dataset.chunks = chunks; status.textContent = chunks + " chunks";
          $("log").scrollTop = $("log").scrollHeight;
        }
      }
    }
    history.push({role: "assistant", content: answer});
    status.textContent = "done: " + chunks + " chunks"; status.dataset.done = "1";
  } catch (err) {
    out.className = "msg error"; out.textContent = String(err.message || err);
    history.pop(); status.textContent = "error";
  } finally {
    $("send").disabled = false; $("prompt").focus();
  }
});
</script>
</body></html>
"""


def chat_page(model_name: str, *, needs_key: bool, defaults: SamplingSettings, max_tokens: int) -> str:
    """The page with the served model's name and default settings filled in."""
    values = {
        "__TITLE__": html.escape(model_name),
        "__MODEL_JSON__": json.dumps(model_name).replace("<", "\\u003c"),  # cannot close the <script> element
        "__TEMPERATURE__": f"{defaults.temperature:g}",
        "__TOP_P__": f"{defaults.top_p:g}",
        "__MAX_TOKENS__": str(min(defaults.max_new_tokens, max_tokens)),
        "__MAX_LIMIT__": str(max_tokens),
        "__KEY_HIDDEN__": "" if needs_key else "hidden",
    }
    page = _PAGE
    for placeholder, value in values.items():
        page = page.replace(placeholder, value)
    return page
