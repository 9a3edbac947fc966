"""The web chat page in headless Chromium (Debian's chromium driven by Playwright's Python package): a typed
question gets a streamed answer that grows chunk by chunk, the generation settings reach the API, and a
screenshot is saved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from loratune.generate import load_for_inference
from loratune.serve.api import BackgroundServer, build

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]


def _playwright():
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed and scripts/install-browser.sh could not install it (needs root + apt)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the `test` extra)")
    return sync_api.sync_playwright


@pytest.fixture(scope="module")
def ui_server(tiny_llama_dir, tmp_path_factory):
    # A random model may pick a stop token first and answer nothing; suppressing the special tokens (through the
    # folder's generation_config.json, as a real model folder would) makes every answer run to max_tokens.
    folder = tmp_path_factory.mktemp("ui-model") / "tiny"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps({"suppress_tokens": [0, 1, 2, 3], "pad_token_id": 3}))
    im = load_for_inference(folder, device="cpu")
    with BackgroundServer(build(im, model_name="tiny-ui", ui=True)) as srv:
        yield srv


def test_page_is_served_only_with_ui(tiny_llama_dir, ui_server):
    page = httpx.get(ui_server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for control in ('id="temperature"', 'id="top_p"', 'id="max_tokens"', 'id="system"', '"tiny-ui"'):
        assert control in page.text
    assert 'id="key-row" hidden' in page.text  # no API key on this server: no key field


def test_browser_chat_streams_an_answer(ui_server, tmp_path):
    sync_playwright = _playwright()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(ui_server.url + "/")
            page.fill("#system", "Answer briefly.")
            page.fill("#max_tokens", "24")
            page.eval_on_selector("#temperature", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }")
            # Record the answer's length at every DOM change, to see it grow while the stream arrives.
            page.evaluate("""() => { window.lengths = [];
                new MutationObserver(() => { const a = document.querySelector('.assistant');
                  if (a) window.lengths.push(a.textContent.length); })
                .observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true}); }""")
            page.fill("#prompt", "What is the capital of France?")
            page.press("#prompt", "Enter")
            page.wait_for_selector("#status[data-done='1']", timeout=60_000)
            answer = page.inner_text(".assistant")
            chunks = int(page.get_attribute("#status", "data-chunks"))
            lengths = page.evaluate("window.lengths")
            page.screenshot(path=str(tmp_path / "chat.png"))
        finally:
            browser.close()
    assert len(answer) > 0 and chunks >= 2  # several server-sent events arrived, not one response
    growing = [n for n in lengths if n > 0]
    assert len(set(growing)) >= 2 and growing == sorted(growing)  # the text grew over time, never shrank
    # The page sent its settings: the same request through the API gives the same greedy answer.
    api = httpx.post(ui_server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny-ui", "max_tokens": 24, "temperature": 0,
        "messages": [{"role": "system", "content": "Answer briefly."},
                     {"role": "user", "content": "What is the capital of France?"}]}).json()
    assert answer.strip() == api["choices"][0]["message"]["content"].strip()
    shot = tmp_path / "chat.png"
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
