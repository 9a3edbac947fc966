"""speed.bucket_tokens: padding a packed row to a bucketed length changes neither the loss nor the LoRA gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from loratune.config import SpeedConfig
from loratune.data.batching import collate
from loratune.speed import apply_speed, pad_to_bucket
from loratune.speed.attention import segments_from_positions
from tests.test_speed_equivalence import examples, make_lora_model, our_loss_and_grads, rel


def test_pad_to_bucket_adds_one_ignored_segment():
    exs = examples(50, lengths=(5, 7))
    batch = collate(exs, 3, packing=True)
    padded = pad_to_bucket(batch, 8)
    assert padded["input_ids"].shape == (1, 16)
    assert padded["labels"][0, 12:].eq(-100).all() and padded["position_ids"][0, 12:].tolist() == [0, 1, 2, 3]
    assert segments_from_positions(padded["position_ids"]).offsets == (0, 5, 12, 16)
    assert pad_to_bucket(batch, 4) is batch  # already a multiple
    assert torch.equal(collate(exs, 3, packing=True)["input_ids"], batch["input_ids"])  # collate unchanged
    plain = collate(exs, 3, packing=False)
    assert pad_to_bucket(plain, 8) is plain  # padded batches are left alone


@pytest.mark.parametrize(("kind", "varlen"), [("tiny_phi_dir", True), ("tiny_llama_dir", False)])
def test_bucketed_loss_and_grads_equal_unbucketed(kind, varlen, request):
    model, loaded = make_lora_model(request.getfixturevalue(kind), checkpointing=True)
    bucketed = copy.deepcopy(model)
    apply_speed(model, SpeedConfig(compile="off", varlen_attention=varlen, cpu_bf16=False), device="cpu", dtype=torch.float32)
    plan = apply_speed(bucketed, SpeedConfig(compile="off", varlen_attention=varlen, bucket_tokens=32, cpu_bf16=False),
                       device="cpu", dtype=torch.float32)
    assert "bucket_32" in plan.applied
    exs = examples(model.config.vocab_size, lengths=(9, 40, 3, 22, 15))  # 89 tokens -> 96
    pad = loaded.tokenizer.pad_token_id
    loss, grads = our_loss_and_grads(model, exs, pad)
    b_loss, b_grads = our_loss_and_grads(bucketed, exs, pad)
    assert abs(b_loss - loss) / loss < 1e-5
    assert set(b_grads) == set(grads) and len(grads) > 0
    for name, g in grads.items():
        assert rel(b_grads[name], g) < 1e-5, (name, rel(b_grads[name], g))
