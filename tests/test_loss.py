"""The answer-token loss: sums (not means), the chunked head path and the fused head + cross-entropy pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loratune.speed.cross_entropy import head_is_frozen, linear_cross_entropy_sum
from loratune.training.loss import chunked_head_loss


def _head(vocab: int, hidden: int, bias: bool, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=bias).double()
    head.requires_grad_(False)
    return head


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [7, 1024])
def test_fused_head_cross_entropy_equals_full_logits(bias, chunk):
    """Loss and d(loss)/d(hidden) of the fused pass equal F.cross_entropy on full fp64 logits (the fused pass
    computes its softmax in fp32: agreement to ~1e-6), with chunks that do not divide the token count."""
    head = _head(vocab=50, hidden=16, bias=bias)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(23, 16, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (23,), generator=g)
    ref = F.cross_entropy(head(hidden), targets, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref * 0.37, hidden)
    ours = linear_cross_entropy_sum(hidden, head, targets, chunk=chunk)
    (our_grad,) = torch.autograd.grad(ours * 0.37, hidden)  # the upstream gradient is applied in backward
    assert ours.dtype == torch.float32
    assert abs(float(ours) - float(ref)) / float(ref) < 1e-6
    torch.testing.assert_close(our_grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_fused_head_cross_entropy_without_grad_and_empty():
    head = _head(vocab=11, hidden=4, bias=True)
    hidden = torch.randn(5, 4, dtype=torch.float64)
    targets = torch.tensor([0, 3, 10, 2, 2])
    assert abs(float(linear_cross_entropy_sum(hidden, head, targets)) -
               float(F.cross_entropy(head(hidden), targets, reduction="sum"))) < 1e-5
    empty = linear_cross_entropy_sum(hidden[:0], head, targets[:0])
    assert float(empty) == 0.0


def test_chunked_head_loss_matches_full_logits_with_weight_gradients():
    """The checkpointed chunk path also trains the head (modules_to_save), so it must give weight gradients."""
    head = _head(vocab=30, hidden=8, bias=True)
    head.requires_grad_(True)
    hidden = torch.randn(19, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 30, (19,))
    ref = F.cross_entropy(head(hidden), targets, reduction="sum")
    ref_grads = torch.autograd.grad(ref, [hidden, head.weight, head.bias])
    ours = chunked_head_loss(head, hidden, targets, chunk=5)
    our_grads = torch.autograd.grad(ours, [hidden, head.weight, head.bias])
    assert abs(float(ours) - float(ref)) / float(ref) < 1e-6  # logits upcast to fp32, softmax in fp32
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_head_is_frozen_only_for_a_frozen_linear():
    head = _head(vocab=5, hidden=3, bias=False)
    assert head_is_frozen(head)
    head.weight.requires_grad_(True)
    assert not head_is_frozen(head)  # a trained head (modules_to_save) needs the path with weight gradients
    assert not head_is_frozen(torch.nn.Embedding(5, 3))
