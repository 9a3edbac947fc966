"""`loratune inspect`: module tree, targets, parameter counts and the memory estimate, all on the meta device."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from loratune.config import LoraConfig
from loratune.errors import LoratuneError
from loratune.models.inspect import (
    GIB,
    estimate_memory,
    hf_config_for,
    inspect_model,
    meta_model,
    module_tree,
    quantized_bytes_per_param,
)
from loratune.models.lora import add_lora, count_parameters, resolve_targets

PHI2 = dict(model_type="phi", architectures=["PhiForCausalLM"], vocab_size=51200, hidden_size=2560,
            intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
            max_position_embeddings=2048, partial_rotary_factor=0.4, hidden_act="gelu_new", tie_word_embeddings=False)


@pytest.fixture()
def phi2_config_dir(tmp_path):
    """Phi-2's published config and nothing else: no weights, no tokenizer."""
    (tmp_path / "config.json").write_text(json.dumps(PHI2))
    return tmp_path


def test_phi2_from_config_only_needs_no_memory(phi2_config_dir):
    report = inspect_model(str(phi2_config_dir), LoraConfig(r=16), batch_size=4, seq_len=512, bits=4, dtype="bf16")
    assert report.counts.total == 2_779_683_840  # Phi-2's 2.7B parameters, counted from shapes only
    per_layer = 4 * 16 * (2560 + 2560) + 16 * (2560 + 10240) * 2
    assert report.counts.trainable == 32 * per_layer == 23_592_960
    assert report.targets == ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
    lines = [(r.pattern, r.kind, r.shape, r.targeted) for r in report.rows]
    assert ("model.layers.{0..31}.self_attn.dense", "Linear", "2560->2560", True) in lines
    assert ("model.layers.{0..31}.mlp.fc1", "Linear", "2560->10240", True) in lines
    assert ("lm_head", "Linear", "2560->51200", False) in lines
    assert len(report.rows) < 20  # compact: one line per pattern, not 32 x 10 modules
    est, no_ckpt = report.estimate, report.estimate_no_ckpt
    assert 1.9 < est.weights / GIB < 2.4 and est.activations < no_ckpt.activations / 10
    assert est.lora_params == est.lora_grads == 23_592_960 * 4 and est.optimizer == 2 * est.lora_params


def test_meta_model_holds_no_storage(phi2_config_dir):
    model = meta_model(hf_config_for(str(phi2_config_dir)))
    assert all(p.is_meta for p in model.parameters())


def test_weight_bytes_follow_the_bit_width(tiny_llama_dir):
    model = meta_model(hf_config_for(str(tiny_llama_dir)))
    targets = resolve_targets(model, LoraConfig())
    kw = dict(batch_size=1, seq_len=8, gradient_checkpointing=True)
    linear = 2 * (32 * 32 * 2 + 32 * 16 * 2 + 32 * 64 * 3)  # q,o 32x32; k,v 32x16; gate,up,down 32x64
    other = 260 * 32 * 2 + 32 * 5  # embeddings + head (never quantized), 5 norms
    full = estimate_memory(model, LoraConfig(), targets, bits="none", dtype=torch.bfloat16, **kw)
    assert full.weights == (linear + other) * 2
    four = estimate_memory(model, LoraConfig(), targets, bits=4, dtype=torch.bfloat16, **kw)
    # k-bit preparation upcasts the unquantized rest to fp32
    assert four.weights == int(32 * 32 * quantized_bytes_per_param(4)) * 4 + int(
        32 * 16 * quantized_bytes_per_param(4)) * 4 + int(32 * 64 * quantized_bytes_per_param(4)) * 6 + other * 4
    eight = estimate_memory(model, LoraConfig(), targets, bits=8, dtype=torch.bfloat16, **kw)
    assert four.weights < eight.weights and quantized_bytes_per_param(4, double_quant=False) == 0.5625


def test_counts_match_the_real_peft_model(tiny_phi_dir):
    from transformers import AutoModelForCausalLM

    cfg = LoraConfig(r=8, use_dora=True)
    report = inspect_model(str(tiny_phi_dir), cfg, bits="none")
    real = add_lora(AutoModelForCausalLM.from_pretrained(str(tiny_phi_dir)), cfg, quantized=False,
                    gradient_checkpointing=False)
    trainable, total = count_parameters(real)
    assert report.counts.trainable == trainable and report.counts.total == total - trainable


def test_estimate_is_close_to_measured_cpu_peak_without_checkpointing(tiny_llama_dir):
    """Activations of the tiny model in fp32 on the CPU, measured by the autograd saved-tensor hooks (exact bytes
    kept for backward) against the estimate's activation term."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    lora = LoraConfig(r=8, dropout=0.0)
    targets = resolve_targets(model, lora)
    est = estimate_memory(meta_model(model.config), lora, targets, batch_size=2, seq_len=64, bits="none",
                          dtype=torch.float32, gradient_checkpointing=False, fast_loss=False)
    peft_model = add_lora(model, lora, quantized=False, gradient_checkpointing=False).train()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):  # every tensor autograd keeps for backward, by storage (views counted once)
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.arange(2 * 64).reshape(2, 64) % 250 + 4
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = peft_model(input_ids=ids).logits
    weights = {p.untyped_storage().data_ptr() for p in peft_model.parameters()}
    activations = sum(n for ptr, n in saved.items() if ptr not in weights)
    vocab_part = 2 * 64 * logits.shape[-1] * 4  # the logits tensor itself, counted in the estimate's logits term
    measured = activations - vocab_part
    print(f"activations: estimated {est.activations} bytes, measured {measured} bytes")
    assert 0.85 < est.activations / measured < 1.3, (est.activations, measured)  # measured ratio 1.15


def test_inspect_cli_on_a_config_folder(phi2_config_dir):
    from loratune.cli import app

    result = CliRunner().invoke(app, ["inspect", str(phi2_config_dir), "--r", "8", "--bits", "8", "--batch-size", "2",
                                      "--seq-len", "256", "--target-modules", "q_proj,fc2"])
    assert result.exit_code == 0, result.output
    assert "model.layers.{0..31}.self_attn.q_proj" in result.output and "[LoRA]" in result.output
    assert "LoRA targets: q_proj 2560->2560, fc2 10240->2560" in result.output
    assert "8-bit weights" in result.output and "total" in result.output


def test_inspect_bad_inputs(tmp_path, phi2_config_dir):
    from loratune.cli import app

    with pytest.raises(LoratuneError, match="model path not found"):
        inspect_model(str(tmp_path / "missing"), LoraConfig())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LoratuneError, match="has no config.json"):
        inspect_model(str(empty), LoraConfig())
    with pytest.raises(LoratuneError, match=r"o_proj not in this model \(linear layers here: dense, fc1"):
        inspect_model(str(phi2_config_dir), LoraConfig(target_modules=["o_proj"]))
    with pytest.raises(LoratuneError, match="cannot load someone/not-cached"):  # conftest sets HF_HUB_OFFLINE=1
        inspect_model("someone/not-cached", LoraConfig())
    result = CliRunner().invoke(app, ["inspect", str(phi2_config_dir), "--bits", "3"])
    assert result.exit_code != 0 and 'unknown bit width "3"' in str(result.exception)


def test_module_tree_folds_indices():
    layers = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Linear(4, 8) for _ in range(3)])})
    rows = module_tree(layers, [])
    assert [(r.pattern, r.shape, r.count) for r in rows] == [("layers.{0..2}", "4->8", 3)]
