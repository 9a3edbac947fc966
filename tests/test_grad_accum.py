"""Gradient accumulation is exact: one batch of 8 and 4 accumulated micro-batches of 2 give the same loss and
LoRA gradients (fp32), on examples whose answer lengths differ a lot, padded and packed. The naive mean of
per-micro-batch means (the peer bug fixed in transformers PR 34191) visibly differs. Also the optimizer and
learning-rate schedules."""

from __future__ import annotations

import pytest
import torch

from loratune.config import LoraConfig, TrainingConfig
from loratune.data.batching import collate
from loratune.data.tokenize import IGNORE, Example
from loratune.models.lora import add_lora
from loratune.training.loop import accumulate
from loratune.training.loss import loss_sum
from loratune.training.optim import build_optimizer, build_scheduler

ANSWER_LENGTHS = [1, 2, 3, 40, 2, 60, 1, 25]  # uneven on purpose: short-answer micro-batches get over-weighted


def examples() -> list[Example]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i, answer in enumerate(ANSWER_LENGTHS):
        prompt = 5 + (i * 7) % 11
        ids = torch.randint(4, 200, (prompt + answer,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


@pytest.fixture()
def lora_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = add_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0), quantized=False, gradient_checkpointing=False)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would make every lora_A gradient zero: no teeth
            p.data.normal_(0, 0.05)
    return model


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("packing", [False, True])
def test_batch8_equals_batch2_times_accum4(lora_model, packing):
    data = examples()
    big_loss, _ = accumulate(lora_model, [collate(data, 3, packing=packing)], device="cpu", fast=True)
    big = lora_grads(lora_model)
    micro = [collate(data[i : i + 2], 3, packing=packing) for i in range(0, 8, 2)]
    acc_loss, _ = accumulate(lora_model, micro, device="cpu", fast=True)
    acc = lora_grads(lora_model)
    assert abs(big_loss - acc_loss) < 1e-5
    for name in big:
        assert torch.allclose(big[name], acc[name], rtol=1e-4, atol=1e-7), name
    assert min(g.abs().max().item() for g in big.values()) > 1e-5  # every LoRA matrix really gets a gradient

    # The naive recipe: each micro-batch's own mean, averaged over the 4 micro-batches.
    naive_loss = 0.0
    for batch in micro:
        s, n = loss_sum(lora_model, batch, fast=True)
        ((s / n) / len(micro)).backward()
        naive_loss += float(s / n) / len(micro)
    naive = lora_grads(lora_model)
    assert abs(naive_loss - big_loss) > 0.01
    rel = max(((naive[k] - big[k]).norm() / big[k].norm()).item() for k in big)
    assert rel > 0.05


def test_fast_path_equals_plain_logits_path(lora_model):
    data = examples()
    fast, _ = accumulate(lora_model, [collate(data, 3, packing=False)], device="cpu", fast=True)
    g_fast = lora_grads(lora_model)
    plain, _ = accumulate(lora_model, [collate(data, 3, packing=False)], device="cpu", fast=False)
    g_plain = lora_grads(lora_model)
    assert abs(fast - plain) < 1e-5
    assert all(torch.allclose(g_fast[k], g_plain[k], rtol=1e-4, atol=1e-7) for k in g_fast)


def lrs(scheduler_name: str, warmup: int, steps: int = 10) -> list[float]:
    model = torch.nn.Linear(2, 2)
    cfg = TrainingConfig(learning_rate=1.0, scheduler=scheduler_name, warmup_steps=warmup)
    opt = build_optimizer(model, cfg, "cpu")
    sched = build_scheduler(opt, cfg, steps)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_schedules_warm_up_then_decay():
    assert lrs("linear", 2)[:4] == pytest.approx([0.0, 0.5, 1.0, 0.875])
    assert lrs("constant", 2) == pytest.approx([0.0, 0.5] + [1.0] * 8)
    cosine = lrs("cosine", 2)
    assert cosine[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:])) and cosine[-1] < 0.05


def test_adamw_is_torch_and_bitsandbytes_needs_cuda():
    from loratune.errors import LoratuneError

    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, TrainingConfig(learning_rate=1e-3, weight_decay=0.01), "cpu")
    assert type(opt) is torch.optim.AdamW and opt.defaults["weight_decay"] == 0.01
    with pytest.raises(LoratuneError, match="training.optimizer: paged_adamw_8bit runs on CUDA only"):
        build_optimizer(model, TrainingConfig(optimizer="paged_adamw_8bit"), "cpu")
