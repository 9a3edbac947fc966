"""Output head + cross-entropy in one pass per chunk, with the gradient computed in that same pass.

For each chunk of selected (labelled) positions: logits = hidden @ W^T + b in the compute dtype, upcast to fp32,
the loss sum from logsumexp, and, while the logits are still there, d(loss)/d(hidden) = (softmax - onehot) @ W.
Only that gradient ([tokens x hidden], the size of the input) is kept for backward: the [tokens x vocab] logits
exist for one chunk at a time and are never recomputed (the checkpointed chunk path in training/loss.py computes
the head matmul twice). This is the fused-linear-cross-entropy idea of Liger-Kernel and Apple's Cut Cross-Entropy,
in plain torch: the two matmuls already run at tensor-core speed, and what it saves is memory and one matmul.

Valid when the head's weight and bias are frozen (LoRA never adapts lm_head by default); otherwise callers use
the checkpointed path, which also produces weight gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk: int, weights: torch.Tensor | None) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        need_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        h_all = hidden.to(weight.dtype)
        for start in range(0, hidden.shape[0], chunk):
            h, t = h_all[start : start + chunk], targets[start : start + chunk]
            logits = F.linear(h, weight, bias).float()  # [c, V] fp32: the softmax needs the range
            # logsumexp by hand, in place: torch.logsumexp allocates two more [c, V] fp32 temporaries, and this
            # chunk's buffers are the peak of the whole step once the layer inputs are offloaded (speed.offload).
            picked = logits.gather(1, t[:, None]).squeeze(1)
            top = logits.amax(dim=-1)
            exp = logits.sub_(top[:, None]).exp_()
            norm = exp.sum(dim=-1)
            nll = top + norm.log() - picked
            w = None if weights is None else weights[start : start + chunk].to(nll.dtype)
            total += (nll if w is None else nll * w).sum()
            if need_grad:
                probs = exp.div_(norm[:, None])  # the softmax, in the same buffer
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                if w is not None:
                    probs.mul_(w[:, None])
                grad_hidden[start : start + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            del logits, exp
        if need_grad:
            ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                             chunk: int = 1024, weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum over rows of CE(head(hidden), targets) as fp32; hidden [N, H], targets [N] (valid class ids).

    `weights` [N] (bool or float) multiplies each row's loss and gradient: the CUDA-graph path (speed.graphs)
    computes every position and zeroes the ignored ones, where selecting them would give a data-dependent shape.
    """
    if hidden.shape[0] == 0:
        return hidden.sum(dtype=torch.float32) * 0.0
    # Under autocast the head would run in bf16 anyway; run it explicitly in the weight's dtype, outside autocast,
    # so the result does not depend on the caller's context.
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropySum.apply(hidden, head.weight, getattr(head, "bias", None), targets, chunk, weights)


def head_is_frozen(head: torch.nn.Module) -> bool:
    """The fused pass returns no weight gradient: only valid for a plain frozen Linear head."""
    if not isinstance(head, torch.nn.Linear):
        return False
    return not any(p.requires_grad for p in head.parameters())
