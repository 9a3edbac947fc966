"""4-bit and 8-bit bases through bitsandbytes' CPU backend: the real QLoRA path, run for real."""

from __future__ import annotations

import pytest
import torch

from loratune.config import LoraConfig, ModelConfig, QuantizationConfig
from loratune.models.load import bnb_config, load_model
from loratune.models.lora import add_lora, count_parameters

pytest.importorskip("bitsandbytes")


@pytest.fixture(autouse=True)
def one_thread():
    """bitsandbytes' CPU 4-bit kernels slow down ~10x with 2 OpenMP threads on a busy 2-core machine (measured: NF4
    forward+backward of SmolLM2 on 16 tokens 50 s vs 0.5 s), so these tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _storage_bytes(p: torch.Tensor) -> torch.Tensor:
    # Packed 4-bit weights viewed as fp32 can contain NaN bit patterns, so compare raw bytes, not values.
    return p.detach().contiguous().view(torch.uint8).clone()


def _one_step(model, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    before = {n: _storage_bytes(p) for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    return loss.item(), before


def test_nf4_embedded_model_trains_only_lora(smollm2_dir):
    """Acceptance: NF4 base on the CPU, forward + backward + one AdamW step; only LoRA weights move."""
    loaded = load_model(ModelConfig(base=str(smollm2_dir), device="cpu"),
                        QuantizationConfig(bits=4, quant_type="nf4", double_quant=True))
    assert loaded.quantized and loaded.dtype is torch.float32
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit" and q_proj.weight.quant_state.quant_type == "nf4"
    model = add_lora(loaded.model, LoraConfig(r=8, dropout=0.0), quantized=True, gradient_checkpointing=True)
    trainable, total = count_parameters(model)
    assert trainable == 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192) + 2 * (576 + 1536) + (1536 + 576))
    assert total == 134_515_008 + trainable  # packed weights counted at their logical size

    ids = loaded.tokenizer("The capital of France is Paris. The capital of Italy is Rome.",
                           return_tensors="pt").input_ids[:, :16]
    loss, before = _one_step(model, ids)
    assert torch.isfinite(torch.tensor(loss)) and 0 < loss < 20
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], _storage_bytes(p))}
    lora = {n for n, p in model.named_parameters() if "lora_" in n}
    assert changed == lora  # every LoRA matrix moved (B from zero, A by AdamW), nothing else did
    assert len(lora) == 30 * 7 * 2


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_four_bit_types_and_storage_dtype(tiny_llama_dir, quant_type):
    loaded = load_model(ModelConfig(base=str(tiny_llama_dir), device="cpu"),
                        QuantizationConfig(bits=4, quant_type=quant_type, double_quant=False))
    weight = loaded.model.model.layers[0].mlp.up_proj.weight
    assert weight.quant_state.quant_type == quant_type
    # quant storage = compute dtype, so FSDP sees one dtype across packed and plain parameters
    assert weight.dtype is torch.float32 and weight.quant_state.shape == torch.Size([64, 32])
    model = add_lora(loaded.model, LoraConfig(r=4, dropout=0.0), quantized=True, gradient_checkpointing=False)
    loss, _ = _one_step(model, torch.arange(4, 36).reshape(2, 16))
    assert torch.isfinite(torch.tensor(loss))


def test_bf16_compute_on_cpu(tiny_llama_dir):
    """compute_dtype bf16 on the CPU: the 4-bit matmuls run in bf16 and training still works."""
    loaded = load_model(ModelConfig(base=str(tiny_llama_dir), device="cpu", dtype="bf16"),
                        QuantizationConfig(bits=4, compute_dtype="bf16"))
    layer = loaded.model.model.layers[0].self_attn.q_proj
    assert layer.compute_dtype is torch.bfloat16 and layer.weight.dtype is torch.bfloat16
    model = add_lora(loaded.model, LoraConfig(r=4, dropout=0.0), quantized=True, gradient_checkpointing=True)
    # k-bit preparation keeps the adapters (and norms) in fp32 for stable updates
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    loss, _ = _one_step(model, torch.arange(4, 36).reshape(2, 16))
    assert torch.isfinite(torch.tensor(loss))


def test_eight_bit_trains(tiny_llama_dir):
    loaded = load_model(ModelConfig(base=str(tiny_llama_dir), device="cpu"), QuantizationConfig(bits=8))
    assert type(loaded.model.model.layers[0].mlp.down_proj).__name__ == "Linear8bitLt"
    model = add_lora(loaded.model, LoraConfig(r=4, dropout=0.0), quantized=True, gradient_checkpointing=True)
    loss, before = _one_step(model, torch.arange(4, 36).reshape(2, 16))
    assert torch.isfinite(torch.tensor(loss))
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], _storage_bytes(p))}
    assert changed and all("lora_" in n for n in changed)


def test_bnb_config_fields():
    four = bnb_config(QuantizationConfig(bits=4, quant_type="fp4", double_quant=False, compute_dtype="bf16"),
                      torch.float32)
    assert (four.load_in_4bit, four.bnb_4bit_quant_type, four.bnb_4bit_use_double_quant) == (True, "fp4", False)
    assert four.bnb_4bit_compute_dtype is torch.bfloat16 and four.bnb_4bit_quant_storage is torch.bfloat16
    assert bnb_config(QuantizationConfig(bits=8), torch.float32).load_in_8bit
    assert bnb_config(QuantizationConfig(bits="none"), torch.float32) is None
