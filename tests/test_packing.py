"""Sample packing: one row with restarting position ids gives the padded batch's loss (attention never crosses an
example boundary), on the tiny Llama and Phi models with sdpa attention in fp32."""

from __future__ import annotations

import pytest
import torch

from loratune.data.batching import collate, n_target_tokens
from loratune.data.tokenize import IGNORE, Example
from loratune.training.loss import loss_sum

PAD = 3


def examples() -> list[Example]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (5, 17, 1, 9, 30):  # a one-token example too: its boundary is a repeated position 0
        ids = torch.randint(4, 200, (n,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * (n // 2) + ids[n // 2:]))
    return out


@pytest.fixture(scope="module", params=["llama", "phi"])
def tiny_model(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tests.conftest import save_tiny_model

    folder = save_tiny_model(tmp_path_factory.mktemp(f"pack-{request.param}"), request.param)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    assert model.config.use_cache  # the default: loss_sum must turn the cache off itself (see batching.py)
    return model.eval()


def test_packed_batch_format():
    a, b = Example([10, 11, 12], [IGNORE, 11, 12]), Example([20, 21], [20, 21])
    batch = collate([a, b], PAD, packing=True)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # b's first token is not predicted from a's last token.
    assert batch["labels"].tolist() == [[IGNORE, 11, 12, IGNORE, 21]]
    padded = collate([a, b], PAD, packing=False)
    assert padded["input_ids"].tolist() == [[10, 11, 12], [20, 21, PAD]]
    assert n_target_tokens(batch) == n_target_tokens(padded) == 3


@pytest.mark.parametrize("fast", [True, False], ids=["chunked-head", "full-logits"])
def test_packed_loss_equals_padded_loss(tiny_model, fast):
    exs = examples()
    with torch.no_grad():
        packed, n_packed = loss_sum(tiny_model, collate(exs, PAD, packing=True), fast=fast)
        padded, n_padded = loss_sum(tiny_model, collate(exs, PAD, packing=False), fast=fast)
    assert n_packed == n_padded == sum(len(e.input_ids) - len(e.input_ids) // 2 for e in exs) - 1
    assert abs(packed.item() - padded.item()) <= 1e-5 * abs(padded.item())


def test_packed_logits_equal_each_example_alone(tiny_model):
    """Stronger than the summed loss: every position's logits match the example run on its own."""
    exs = examples()
    with torch.no_grad():
        batch = collate(exs, PAD, packing=True)
        packed = tiny_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for ex in exs:
            alone = tiny_model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + len(ex.input_ids)], alone, rtol=1e-5, atol=1e-5)
            start += len(ex.input_ids)


def test_without_restarting_positions_attention_crosses_examples(tiny_model):
    """The check above has teeth: the same packed row with plain 0..T-1 positions changes the logits."""
    exs = examples()
    batch = collate(exs, PAD, packing=True)
    with torch.no_grad():
        right = tiny_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        wrong = tiny_model(input_ids=batch["input_ids"], use_cache=False).logits
    assert (right - wrong).abs().max().item() > 1e-3
