"""LoRA targets per architecture on tiny in-process models (no downloads), and the LoRA options."""

from __future__ import annotations

import math

import pytest
import torch

from loratune.config import LoraConfig
from loratune.errors import LoratuneError
from loratune.models.inspect import count_lora
from loratune.models.lora import add_lora, count_parameters, resolve_targets

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COMMON = dict(vocab_size=96, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)


def tiny(arch: str):
    """A 2-layer random model of `arch`, built from its config class."""
    import transformers as tf

    torch.manual_seed(0)
    if arch == "gpt2":
        config = tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    elif arch == "gpt_neox":
        config = tf.GPTNeoXConfig(**COMMON, hidden_size=32, intermediate_size=64)
    elif arch == "phi":
        config = tf.PhiConfig(**COMMON, hidden_size=32, intermediate_size=64, partial_rotary_factor=0.5)
    else:
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[arch]
        config = cls(**COMMON, hidden_size=32, intermediate_size=64, num_key_value_heads=2)
    return tf.AutoModelForCausalLM.from_config(config)


EXPECTED = {
    "llama": LLAMA_TARGETS,
    "qwen2": LLAMA_TARGETS,
    "mistral": LLAMA_TARGETS,
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_auto_targets_per_architecture(arch):
    model = tiny(arch)
    targets = resolve_targets(model, LoraConfig())
    assert targets == EXPECTED[arch]
    peft_model = add_lora(model, LoraConfig(r=4, dropout=0.0), quantized=False, gradient_checkpointing=False)
    adapted = {n.rsplit(".", 1)[0] for n, _ in peft_model.named_modules() if n.endswith("lora_A")}
    # every layer's every target projection got an adapter, and nothing else did
    assert {n.rsplit(".", 1)[-1] for n in adapted} == set(targets)
    per_layer = {"gpt2": 4}.get(arch, len(targets))  # gpt2's c_proj exists in attention and MLP
    assert len(adapted) == 2 * per_layer
    trainable, _ = count_parameters(peft_model)
    assert trainable == count_lora(tiny(arch), LoraConfig(r=4), targets).trainable  # inspect's count from shapes
    ids = torch.arange(1, 25).reshape(2, 12)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)


def test_gpt2_conv1d_adapters_are_exact_at_init():
    """Conv1D stores [in, out]: with fan_in_fan_out set, a zero-B adapter leaves the logits untouched."""
    model = tiny("gpt2").eval()
    ids = torch.arange(1, 13).reshape(1, 12)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    peft_model = add_lora(model, LoraConfig(r=4, dropout=0.0), quantized=False, gradient_checkpointing=False)
    assert peft_model.peft_config["default"].fan_in_fan_out is True
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, before)


def test_unknown_architecture_falls_back_to_all_linear_but_head():
    model = tiny("llama")
    model.config.model_type = "brand_new_arch"
    assert resolve_targets(model, LoraConfig()) == sorted(LLAMA_TARGETS)


def test_all_linear_never_includes_the_head():
    for arch in ("phi", "gpt_neox"):
        targets = resolve_targets(tiny(arch), LoraConfig(target_modules="all-linear"))
        assert "lm_head" not in targets and "embed_out" not in targets and targets == sorted(EXPECTED[arch])


def test_explicit_list_and_unknown_name_lists_what_exists():
    model = tiny("phi")
    assert resolve_targets(model, LoraConfig(target_modules=["q_proj", "fc2"])) == ["q_proj", "fc2"]
    with pytest.raises(LoratuneError) as err:
        resolve_targets(model, LoraConfig(target_modules=["q_proj", "o_proj"]))
    assert str(err.value) == ("lora.target_modules: target module(s) o_proj not in this model "
                              "(linear layers here: dense, fc1, fc2, k_proj, q_proj, v_proj)")


def test_dora_rslora_and_modules_to_save():
    model = tiny("llama")
    cfg = LoraConfig(r=4, alpha=8, dropout=0.0, use_dora=True, use_rslora=True, modules_to_save=["lm_head"])
    peft_model = add_lora(model, cfg, quantized=False, gradient_checkpointing=False)
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert math.isclose(q_proj.scaling["default"], 8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r), not alpha / r
    magnitudes = [n for n, _ in peft_model.named_parameters() if "lora_magnitude_vector" in n]
    assert len(magnitudes) == 2 * len(LLAMA_TARGETS)
    head = [n for n, p in peft_model.named_parameters() if "lm_head" in n and p.requires_grad]
    assert head == ["base_model.model.lm_head.modules_to_save.default.weight"]
    trainable, _ = count_parameters(peft_model)
    assert trainable == count_lora(tiny("llama"), cfg, LLAMA_TARGETS).trainable
    assert trainable == 2 * sum(4 * (i + o) + o for i, o in [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64),
                                                              (32, 64), (64, 32)]) + 96 * 32
