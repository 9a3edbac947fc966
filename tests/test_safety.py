"""Safety defaults (issue 8): nothing executed that should not be, no secret written or logged, nothing overwritten.

- weights load from safetensors only: a pickle-only folder is refused unless --allow-pickle (and with it, loads
  the same weights);
- trust_remote_code is off unless the config sets it: a model folder whose `auto_map` points at a local modelling
  file that writes a marker when imported is refused, and the marker is never written; with the switch on, the
  code runs (so the marker really would have told);
- `loratune serve` listens on 127.0.0.1 by default, limits request size (with or without Content-Length) and
  request rate, and never prints the API key or the hub token;
- `push` never writes the token into the repository folder or the run folder;
- a run folder is never overwritten: the same name gives `<name>-2` unless --overwrite, and --overwrite refuses to
  delete a folder that is not a run folder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from tests.conftest import REPO
from tests.test_bad_input import Env, pickle_only_model, remote_code_model, run_main

KEY = "sk-safety-SECRET-4242"
HUB_TOKEN = "hf_SAFETYsecretTOKEN0123456789abcdef"


@pytest.fixture()
def env(tmp_path, tiny_llama_dir, monkeypatch) -> Env:
    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LORATUNE_DATA_CACHE", str(tmp_path / "cache" / "datasets"))
    monkeypatch.chdir(tmp_path)
    return Env(tmp_path, tiny_llama_dir, tiny_llama_dir, monkeypatch)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[5, 6, 7, 8, 9]])).logits


# --- pickle weights ----------------------------------------------------------------------------------------------------
def test_pickle_weights_refused_by_default_and_load_with_allow_pickle(env: Env, capsys, monkeypatch):
    from loratune.config import ModelConfig, QuantizationConfig
    from loratune.errors import LoratuneError
    from loratune.models.load import load_model

    folder = pickle_only_model(env)
    assert not list(folder.glob("*.safetensors")) and (folder / "pytorch_model.bin").is_file()
    with pytest.raises(LoratuneError, match="only pickle weights"):
        load_model(ModelConfig(base=str(folder), device="cpu"), QuantizationConfig())
    loaded = load_model(ModelConfig(base=str(folder), device="cpu", allow_pickle=True), QuantizationConfig())
    reference = load_model(ModelConfig(base=str(env.model), device="cpu"), QuantizationConfig())
    torch.testing.assert_close(_logits(loaded.model), _logits(reference.model), rtol=0, atol=0)

    # the CLI switch reaches the loader: a 1-step run on the pickle-only folder trains with --allow-pickle
    config = env.config(model={"base": str(folder)}, training={"max_steps": 1})
    code, _, err = run_main(["train", str(config)], capsys, monkeypatch)
    assert code == 2 and "--allow-pickle" in err
    code, _, err = run_main(["train", str(config), "--allow-pickle"], capsys, monkeypatch)
    assert code == 0, err[-2000:]
    saved = yaml.safe_load((env.runs / "t" / "config.yaml").read_text())
    assert saved["model"]["allow_pickle"] is True  # recorded in the run, so eval/serve of it load the same way


# --- remote code ----------------------------------------------------------------------------------------------------------
def test_remote_code_is_not_executed_unless_the_config_says_so(env: Env, capsys, monkeypatch, tmp_path):
    from loratune.config import ModelConfig, QuantizationConfig
    from loratune.errors import LoratuneError
    from loratune.models.load import load_model

    marker = tmp_path / "remote-code-ran"
    folder = remote_code_model(env, marker)
    for argv in (["train", str(env.config(model={"base": str(folder)}))],  # training
                 ["inspect", str(folder)]):  # and inspect, which reads only config.json
        code, out, err = run_main(argv, capsys, monkeypatch)
        assert code == 2 and "trust_remote_code" in err and "Traceback" not in out + err, err
        assert not marker.exists(), f"{argv[0]} executed the model's own code"
    with pytest.raises(LoratuneError, match="model.trust_remote_code"):
        load_model(ModelConfig(base=str(folder), device="cpu"), QuantizationConfig())
    assert not marker.exists()

    # with the switch on, transformers imports the file: the marker would have caught an accidental execution
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    monkeypatch.syspath_prepend(str(tmp_path / "hf-modules"))
    try:
        load_model(ModelConfig(base=str(folder), device="cpu", trust_remote_code=True), QuantizationConfig())
    except LoratuneError:
        pass  # the toy modelling file need not load cleanly: what matters is that it ran
    assert marker.read_text() == "executed"


# --- the server -----------------------------------------------------------------------------------------------------------
def _listening_address(port: int) -> str:
    """The local address a LISTEN socket on `port` is bound to, from /proc/net/tcp (Linux)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, port_hex = fields[1].split(":")
        if int(port_hex, 16) == port and fields[3] == "0A":
            return socket.inet_ntoa(bytes.fromhex(address)[::-1])
    raise AssertionError(f"nothing listens on port {port}")


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc/net/tcp")
def test_serve_binds_loopback_and_never_logs_the_key_or_token(tiny_llama_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1",
           "LORATUNE_API_KEY": KEY, "HF_TOKEN": HUB_TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "loratune.cli", "serve", str(tiny_llama_dir), "--port", str(port),
                             "--model-name", "tiny", "--device", "cpu", "--max-tokens", "4"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[0][-2000:]
            assert time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert _listening_address(port) == "127.0.0.1"
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        for headers, status in (({"Authorization": f"Bearer {KEY}"}, 200), ({"Authorization": "Bearer sk-wrong"}, 401),
                                ({}, 401), ({"Authorization": f"Bearer {KEY}x"}, 401)):
            response = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
            assert response.status_code == status, response.text
            assert KEY not in response.text and HUB_TOKEN not in response.text
    finally:
        proc.terminate()
        log = proc.communicate(timeout=60)[0]
    assert "127.0.0.1" in log and "(API key required)" in log and " 401" in log  # uvicorn's access log is on
    assert KEY not in log and HUB_TOKEN not in log and "sk-wrong" not in log


def test_request_size_and_rate_limits(tiny_llama_dir):
    from starlette.testclient import TestClient

    from loratune.generate import load_for_inference
    from loratune.serve.api import Limits, build

    assert Limits().max_body_bytes == 1 << 20  # what `loratune serve` uses: 1 MiB
    im = load_for_inference(tiny_llama_dir, device="cpu")
    app = build(im, model_name="tiny", limits=Limits(rate_limit_per_minute=5, max_tokens=4))
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    big = json.dumps({**body, "messages": [{"role": "user", "content": "x" * (1 << 20)}]}).encode()
    with TestClient(app) as client:
        assert client.post("/v1/chat/completions", content=big).status_code == 413  # with Content-Length

        def chunked():  # no Content-Length: counted as it arrives
            for i in range(0, len(big), 65536):
                yield big[i:i + 65536]

        response = client.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
        # every request counts toward the per-client limit, refused ones too: 2 above + 3 here = 5 per minute
        statuses = [client.post("/v1/chat/completions", json=body).status_code for _ in range(3)]
        assert statuses == [200, 200, 200]
        limited = client.post("/v1/chat/completions", json=body)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"


# --- push -----------------------------------------------------------------------------------------------------------------
def test_push_never_writes_the_token(env: Env, capsys, monkeypatch):
    import huggingface_hub

    from loratune.config import load_config
    from loratune.train import train

    run = train(load_config(env.config(training={"max_steps": 1})), show_progress=False).run_dir
    seen: dict[str, str] = {}

    class FakeApi:  # the real code path (HfApi(token=...)), without a network
        def __init__(self, token=None, **kwargs):
            seen["token"] = token

        def create_repo(self, **kwargs):
            return None

        def upload_folder(self, **kwargs):
            seen["folder"] = kwargs["folder_path"]
            return type("Commit", (), {"commit_url": "https://huggingface.co/alice/tiny/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    code, out, err = run_main(["push", str(run), "--repo-id", "alice/tiny"], capsys, monkeypatch)
    assert code == 0, err
    assert seen["token"] == HUB_TOKEN and Path(seen["folder"]).is_dir()  # the token did reach the upload
    assert HUB_TOKEN not in out + err
    files = [p for p in [*run.rglob("*"), *Path(seen["folder"]).rglob("*")] if p.is_file()]
    assert len(files) > 10
    for path in files:
        assert HUB_TOKEN.encode() not in path.read_bytes(), path


# --- run folders ----------------------------------------------------------------------------------------------------------
def test_run_folders_are_never_overwritten_unless_asked(env: Env, capsys, monkeypatch):
    config = env.config(training={"max_steps": 1})
    for expected in ("t", "t-2"):
        code, _, err = run_main(["train", str(config)], capsys, monkeypatch)
        assert code == 0, err[-2000:]
        assert (env.runs / expected / "summary.json").is_file()
    (env.runs / "t" / "notes.txt").write_text("mine")
    code, _, err = run_main(["train", str(config), "--overwrite"], capsys, monkeypatch)
    assert code == 0, err[-2000:]
    assert sorted(p.name for p in env.runs.iterdir()) == ["t", "t-2"]  # replaced in place, no t-3
    assert not (env.runs / "t" / "notes.txt").exists() and (env.runs / "t" / "summary.json").is_file()
    assert yaml.safe_load((env.runs / "t" / "config.yaml").read_text())["output"]["overwrite"] is True


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    from loratune.errors import LoratuneError
    from loratune.runs import new_run_dir

    precious = tmp_path / "runs" / "thesis"
    precious.mkdir(parents=True)
    (precious / "chapter1.tex").write_text("years of work")
    with pytest.raises(LoratuneError, match="not a loratune run folder"):
        new_run_dir(tmp_path / "runs", "thesis", overwrite=True)
    assert (precious / "chapter1.tex").read_text() == "years of work"
    assert new_run_dir(tmp_path / "runs", "thesis") == tmp_path / "runs" / "thesis-2"
    (tmp_path / "runs" / "empty").mkdir()
    assert new_run_dir(tmp_path / "runs", "empty", overwrite=True) == tmp_path / "runs" / "empty"
