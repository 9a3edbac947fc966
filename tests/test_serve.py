"""The OpenAI-compatible server, started for real on a free loopback port and driven with the official `openai`
client: chat, completion, streaming, batching, and every error status with OpenAI's error body."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from starlette.testclient import TestClient

from loratune.data.conversation import Message
from loratune.generate import SamplingSettings, generate_batch, load_for_inference
from loratune.serve.api import BackgroundServer, Limits, build

KEY = "sk-test-1234"
MODEL = "tiny"


@pytest.fixture(scope="module")
def tiny_im(tiny_chat_dir):
    return load_for_inference(tiny_chat_dir, device="cpu")


@pytest.fixture(scope="module")
def server(tiny_chat_dir):
    # The server gets its own model instance: the tests compare it with local generation on `tiny_im` from the
    # main thread, and two threads sharing one tokenizer (whose padding side generate_batch sets) would race.
    limits = Limits(max_body_bytes=64 * 1024, max_prompt_tokens=480, max_tokens=400)
    served = load_for_inference(tiny_chat_dir, device="cpu")
    app = build(served, model_name=MODEL, api_key=KEY, limits=limits, max_batch=8, max_wait_ms=100)
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(content: str, **kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **kw}


def test_chat_completion_matches_local_generation(client, tiny_im):
    response = client.chat.completions.create(**ask("What is 3 plus 4?", max_tokens=6))
    expected = generate_batch(tiny_im, [[Message("user", "What is 3 plus 4?")]], SamplingSettings(max_new_tokens=6))[0]
    assert response.choices[0].message.content.strip() == expected
    assert response.choices[0].finish_reason in ("length", "stop")
    prompt = tiny_im.template.prompt([Message("user", "What is 3 plus 4?")], tiny_im.tokenizer)
    assert response.usage.prompt_tokens == tiny_im.count_tokens(prompt)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert 1 <= response.usage.completion_tokens <= 6 and response.model == MODEL


def test_completion_raw_prompt_stream_equals_non_stream(client):
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8)
    assert whole.object == "text_completion" and whole.usage.prompt_tokens == len("Once upon a time")
    pieces = [c.choices[0].text for c in client.completions.create(model=MODEL, prompt="Once upon a time",
                                                                   max_tokens=8, stream=True)]
    assert "".join(pieces) == whole.choices[0].text


def test_streaming_chat_sends_role_then_deltas_then_finish(client):
    whole = client.chat.completions.create(**ask("Say hello", max_tokens=8)).choices[0].message.content
    chunks = list(client.chat.completions.create(**ask("Say hello", max_tokens=8), stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 2  # it really streamed: several events, not one blob
    assert "".join(deltas) == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= len(deltas) - 1


def test_stop_strings_cut_each_row_and_seeded_sampling_repeats(client):
    full = client.completions.create(model=MODEL, prompt="abc", max_tokens=12).choices[0].text
    visible = [i for i, ch in enumerate(full) if ch.isprintable() and ch != "\ufffd" and i > 0]
    assert visible, full
    cut = visible[len(visible) // 2]
    stopped = client.completions.create(model=MODEL, prompt="abc", max_tokens=12, stop=[full[cut]])
    assert stopped.choices[0].text == full[: full.index(full[cut])]
    assert stopped.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(**ask("Pick a word", max_tokens=8, temperature=1.0, seed=11))
               .choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_concurrent_requests_are_batched_and_answers_do_not_change(client, server, tiny_im):
    questions = [f"Question {i}: what is {i} times {i}?" for i in range(6)]
    before = httpx.get(server.url + "/health").json()
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda q: client.chat.completions.create(**ask(q, max_tokens=5)), questions))
    after = httpx.get(server.url + "/health").json()
    assert after["requests"] - before["requests"] == 6
    assert after["batches"] - before["batches"] < 6  # several requests shared a generate call
    alone = generate_batch(tiny_im, [[Message("user", q)] for q in questions], SamplingSettings(max_new_tokens=5),
                           batch_size=1)
    assert [a.choices[0].message.content.strip() for a in answers] == alone


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    before = httpx.get(server.url + "/health").json()["cancelled"]
    body = {**ask("Write a long story", max_tokens=400), "stream": True}  # seconds of work if nobody stops it
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk arrived; now hang up
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/health").json()["cancelled"] == before:
        assert time.monotonic() < deadline, "the abandoned row kept generating"
        time.sleep(0.05)


def test_bad_requests_answer_400_with_openai_error_body(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**ask("hi", max_tokens=-1))
    assert e.value.status_code == 400 and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**ask("hi", max_tokens=401))  # over the server's limit of 400
    assert "between 1 and 400" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[])
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**ask("hi", temperature=3.0))
    assert e.value.body["param"] == "temperature"
    raw = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": ', headers={"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"} and raw.json()["error"]["code"] == "invalid_json"


def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"


def test_size_limits_answer_413_and_context_overflow_400(client, server):
    big = httpx.post(server.url + "/v1/completions", content=b"x" * (65 * 1024),
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=MODEL, prompt="y" * 481, max_tokens=4)
    assert e.value.status_code == 413 and e.value.code == "prompt_too_long"
    with pytest.raises(openai.BadRequestError) as e:  # 470 tokens pass the prompt limit; + 64 exceed the 512 context
        client.completions.create(model=MODEL, prompt="y" * 470, max_tokens=64)
    assert e.value.code == "context_length_exceeded" and "context of 512 tokens" in e.value.message


def test_api_key_is_required_and_checked(server):
    # The client insists on a key, so strip the header on the wire: the server sees a request without one.
    strip = httpx.Client(event_hooks={"request": [lambda request: request.headers.pop("Authorization", None)]})
    no_key = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, http_client=strip)
    with pytest.raises(openai.AuthenticationError) as e:
        no_key.chat.completions.create(**ask("hi"))
    assert "missing API key" in e.value.message
    raw = httpx.get(server.url + "/v1/models")
    assert raw.status_code == 401 and raw.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(**ask("hi"))
    assert KEY not in e.value.message and "sk-wrong" not in e.value.message
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # health needs no key
    ok = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in ok.models.list()] == [MODEL]


def test_full_queue_and_rate_limit_answer_429(tiny_im):
    # No lifespan here (TestClient outside `with`): the worker never starts, so the queue cannot drain.
    full = TestClient(build(tiny_im, model_name=MODEL, max_queue=0))
    r = full.post("/v1/chat/completions", json=ask("hi", max_tokens=2))
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"] == "1"
    limited = TestClient(build(tiny_im, model_name=MODEL, limits=Limits(rate_limit_per_minute=2)))
    codes = [limited.post("/v1/chat/completions", json={"model": "other", "messages": []}).status_code
             for _ in range(3)]
    assert codes[:2] == [400, 400] and codes[2] == 429
    assert limited.get("/nope").json()["error"]["code"] == "not_found"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_runs_for_real(tiny_chat_dir):
    port = _free_port()
    env = {**os.environ, "LORATUNE_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "loratune.cli", "serve", str(tiny_chat_dir), "--port", str(port),
                             "--device", "cpu", "--model-name", MODEL], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        answer = client.chat.completions.create(**ask("hi", max_tokens=3))
        assert answer.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    assert KEY not in output  # the key is never printed or logged
    assert f"serving {MODEL} on http://127.0.0.1:{port}/v1 (API key required)" in output
