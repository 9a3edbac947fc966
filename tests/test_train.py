"""The training recipe end to end on tiny models: loss falls, the run folder is complete, and the saved
adapter reloaded with plain transformers + peft reproduces the in-memory model's logits."""

from __future__ import annotations

import json

import pytest
import torch

from loratune.train import train
from tests.conftest import tiny_run_config


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory):
    from tests.conftest import write_jsonl

    tmp = tmp_path_factory.mktemp("train")
    data = write_jsonl(tmp / "qa.jsonl")
    cfg = tiny_run_config(tiny_llama_dir, data, tmp / "runs", max_steps=12)
    return train(cfg, show_progress=False)


def test_loss_falls(trained):
    s = trained.summary
    assert s["final_loss"] < 0.8 * s["first_loss"], s


def test_run_folder_has_everything(trained):
    run = trained.run_dir
    for name in ("config.yaml", "template.json", "metrics.jsonl", "loss.png", "summary.json",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "checkpoints/last/state.json"):
        assert (run / name).exists(), name
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
    assert all(r["tokens_per_s"] > 0 for r in rows if "loss" in r)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_tokens"] > 0 and summary["wall_time_s"] > 0 and summary["peak_memory_gib"] > 0
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_adapter_reproduces_logits_with_plain_peft(trained, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 60, 70, 80, 90, 100, 7, 8]])
    trained.model.eval()
    with torch.no_grad():
        expected = trained.model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(base, trained.run_dir / "adapter").eval()
        got = reloaded(input_ids=ids).logits
    assert (got - expected).abs().max().item() < 1e-4
    # and the adapter really changed the model (the test has teeth)
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)(input_ids=ids).logits
    assert (plain - expected).abs().max().item() > 1e-3


def test_second_run_with_same_name_gets_new_folder(trained, tiny_llama_dir, qa_file):
    cfg = tiny_run_config(tiny_llama_dir, qa_file, trained.run_dir.parent, max_steps=1)
    again = train(cfg, show_progress=False)
    assert again.run_dir != trained.run_dir and again.run_dir.name == "t-2"
    assert (trained.run_dir / "adapter").exists()


def test_phi_model_trains_with_phi_targets(tiny_phi_dir, qa_file, tmp_path):
    cfg = tiny_run_config(tiny_phi_dir, qa_file, tmp_path, max_steps=2)
    result = train(cfg, show_progress=False)
    adapter_cfg = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert set(adapter_cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}
