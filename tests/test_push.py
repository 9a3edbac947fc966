"""Hub publishing: the dry-run folder loads with plain transformers + peft (adapter) and plain transformers
(merged), the model card carries the run's facts, the upload goes through HfApi (mocked: no network), and the
token never lands in a file."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
import torch
import yaml
from typer.testing import CliRunner

from loratune.cli import app
from loratune.config import load_config
from loratune.errors import LoratuneError
from loratune.hub import model_card, push
from tests.conftest import tiny_run_config

runner = CliRunner()
FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefXYZ"


@pytest.fixture(scope="module")
def run_dir(tiny_llama_dir, tmp_path_factory):
    from loratune.train import train
    from tests.conftest import write_jsonl

    root = tmp_path_factory.mktemp("push")
    data = write_jsonl(root / "qa.jsonl")
    # A high learning rate so the adapter moves the logits clearly away from the base's.
    result = train(tiny_run_config(tiny_llama_dir, data, root / "runs", max_steps=3, learning_rate=5e-2),
                   show_progress=False)
    (result.run_dir / "eval").mkdir()
    (result.run_dir / "eval" / "metrics.json").write_text(json.dumps({"answer_ppl": 12.5, "exact_match": 0.25,
                                                                      "rouge": {"rougeL": 0.41}}))
    return result.run_dir


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits[0].float()


def test_dry_run_adapter_loads_with_plain_transformers_and_peft(run_dir, tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "repo"
    result = runner.invoke(app, ["push", str(run_dir), "--repo-id", "alice/tiny-lora", "--dry-run", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "dry run: nothing uploaded" in result.output
    assert {p.name for p in out.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json",
                                               "template.json", "README.md", "loratune_config.yaml", "loss.png"}
    assert not any(p.name.startswith(("optimizer", "scheduler", "rng")) for p in out.rglob("*"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    base_logits = _logits(base, tokenizer)
    tuned = PeftModel.from_pretrained(base, str(out))
    tuned_logits = _logits(tuned, tokenizer)
    assert (tuned_logits - base_logits).abs().max() > 1e-2  # the adapter is really in there
    from loratune.generate import load_for_inference

    ours = load_for_inference(run_dir, device="cpu")
    torch.testing.assert_close(tuned_logits, _logits(ours.model, ours.tokenizer))


def test_generate_command_on_a_run_folder_uses_base_plus_adapter(run_dir):
    from loratune.data.conversation import Message
    from loratune.generate import SamplingSettings, generate_batch, load_for_inference

    result = runner.invoke(app, ["generate", str(run_dir), "What is 2 plus 3?", "--max-new-tokens", "6",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    im = load_for_inference(run_dir, device="cpu")
    assert type(im.model).__name__.startswith("Peft") and im.template.name == "chatml"  # the run's own template
    expected = generate_batch(im, [[Message("user", "What is 2 plus 3?")]], SamplingSettings(max_new_tokens=6))[0]
    assert result.stdout.strip() == expected


def test_dry_run_merged_loads_with_plain_transformers(run_dir, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratune.generate import load_for_inference

    out = tmp_path / "merged"
    result = push(run_dir, "alice/tiny-merged", merged=True, dry_run=True, out=out)
    assert not result.uploaded and (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    merged_logits = _logits(merged, AutoTokenizer.from_pretrained(out))
    ours = load_for_inference(run_dir, device="cpu")
    reference = _logits(ours.model, ours.tokenizer)
    # bf16 weights: equal to base + adapter within bf16 rounding (~3 significant digits per weight, compounded
    # over the layers: a few percent of the logit scale), and much closer to it than the base without the adapter.
    merge_error = (merged_logits - reference).abs().max()
    assert merge_error < 0.05 * reference.abs().max()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    adapter_effect = (_logits(base, AutoTokenizer.from_pretrained(out)) - reference).abs().max()
    assert merge_error < 0.5 * adapter_effect
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "transformers"


def test_model_card_front_matter_and_sections(run_dir):
    cfg = load_config(run_dir / "config.yaml")
    card = model_card(run_dir, cfg, repo_id="alice/tiny-lora", merged=False)
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and "loratune" in meta["tags"] and meta["license"] == "other"
    assert "base_model" not in meta  # a local base has no hub id to point at
    summary = json.loads((run_dir / "summary.json").read_text())
    for section in ("## Data", "## Training configuration", "## Training summary", "## Evaluation"):
        assert section in card
    assert f"| steps | {summary['steps']} |" in card and "| lora.r | 8 |" in card
    assert "| rouge.rougeL | 0.41 |" in card and "| exact_match | 0.25 |" in card and "![loss curve](loss.png)" in card
    hub_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"base": "smollm2-135m-instruct"}),
                                     "data": cfg.data.model_copy(update={"path": "openai/gsm8k"})})
    meta = yaml.safe_load(model_card(run_dir, hub_cfg, repo_id="a/b", merged=False).split("---")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["openai/gsm8k"]


class FakeApi:
    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None):
        FakeApi.calls.append(("init", {"token": token}))

    def create_repo(self, **kw):
        FakeApi.calls.append(("create_repo", kw))

    def upload_folder(self, **kw):
        FakeApi.calls.append(("upload_folder", kw))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kw['repo_id']}/commit/abc"})()


def test_upload_uses_hfapi_with_env_token_and_never_writes_it(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.calls = []
    out = tmp_path / "upload"
    result = runner.invoke(app, ["push", str(run_dir), "--repo-id", "alice/tiny-lora", "--private", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "uploaded" in result.output and "https://huggingface.co/alice/tiny-lora/commit/abc" in result.output
    names = [name for name, _ in FakeApi.calls]
    assert names == ["init", "create_repo", "upload_folder"]
    assert FakeApi.calls[0][1] == {"token": FAKE_TOKEN}
    assert FakeApi.calls[1][1] == {"repo_id": "alice/tiny-lora", "repo_type": "model", "private": True, "exist_ok": True}
    assert FakeApi.calls[2][1]["folder_path"] == str(out) and FakeApi.calls[2][1]["repo_id"] == "alice/tiny-lora"
    for folder in (out, run_dir):
        for path in folder.rglob("*"):
            if path.is_file():
                assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_missing_token_bad_repo_id_and_refused_upload_are_one_line_errors(run_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # no cached login either
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(LoratuneError, match="no Hugging Face token found"):
        push(run_dir, "alice/x", out=tmp_path / "a")
    assert not (tmp_path / "a").exists()  # nothing built when it cannot be uploaded
    with pytest.raises(LoratuneError, match="not a Hub repository id"):
        push(run_dir, "not a repo", dry_run=True, out=tmp_path / "b")

    from huggingface_hub.errors import HfHubHTTPError

    class Refusing(FakeApi):
        def create_repo(self, **kw):
            import httpx

            response = httpx.Response(403, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
            raise HfHubHTTPError("403 Forbidden: you cannot write to alice", response=response)

    with pytest.raises(LoratuneError, match=r"the Hub refused the upload \(403\)") as e:
        push(run_dir, "alice/x", out=tmp_path / "c", api=Refusing())
    assert "\n" not in str(e.value)
