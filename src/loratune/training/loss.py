"""The causal-LM loss as a *sum* over answer tokens, so callers normalise by the true token count.

Returning a sum (not a mean per micro-batch) is what makes gradient accumulation exact: the loss of an
accumulated step is sum(all answer-token NLLs) / (answer tokens in all its micro-batches), the same number a
single big batch gives. Averaging per-micro-batch means over-weights short batches (the peer bug fixed in
transformers PR 34191).

Fast path (`training.fast_path`): run the decoder for hidden states, keep only positions that have a label, and
compute the output head + cross-entropy in chunks under activation checkpointing. Full [tokens x vocab] fp32
logits never exist: on Phi-2 (vocab 51,200) that is 200 KB per token, more than the rest of the activations.
With `speed.fused_cross_entropy` the chunks also compute their gradient in the forward pass
(`loratune.speed.cross_entropy`), so the head matmul is not recomputed in backward.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from loratune.data.tokenize import IGNORE

# Architectures whose logits are exactly lm_head(final hidden state): no soft-capping, scaling or extra norm.
PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gpt2", "gpt_neox", "olmo", "olmo2",
                    "stablelm", "starcoder2", "smollm3", "granite_no"}
CHUNK_TOKENS = 4096


def _inner_causal_lm(model: Any) -> Any:
    """The transformers *ForCausalLM under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base else model


def fast_path_supported(model: Any) -> bool:
    lm = _inner_causal_lm(model)
    return getattr(lm.config, "model_type", "") in PLAIN_HEAD_TYPES and hasattr(lm, "model") \
        and lm.get_output_embeddings() is not None


def _head_ce_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_head_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                      chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """sum CE(head(hidden), targets) computed chunk by chunk; each chunk's logits are recomputed in backward."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_head_ce_sum, head, h, t, use_reentrant=False)
        else:
            total = total + _head_ce_sum(head, h, t)
    return total


def loss_sum(model: Any, batch: dict[str, torch.Tensor], *, fast: bool = True) -> tuple[torch.Tensor, int]:
    """(sum of NLL over answer tokens, number of answer tokens) for one micro-batch already on the device.

    A model prepared by `loratune.speed.apply_speed` carries a plan: the forward then runs under its autocast,
    and the head + cross-entropy use the fused pass when the plan asks for it and the head is frozen.
    """
    from loratune.speed import pad_to_bucket, plan_of
    from loratune.speed.attention import segment_kwargs
    from loratune.speed.cross_entropy import head_is_frozen, linear_cross_entropy_sum

    plan = plan_of(model)
    if plan and plan.bucket_tokens:
        batch = pad_to_bucket(batch, plan.bucket_tokens)
    if plan and plan.dropout_seed is not None and model.training:
        from loratune.speed.dropout import next_seed

        next_seed(plan.dropout_seed)  # new dropout masks for this micro-batch (the same in its recomputation)
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = labels[:, 1:]
    keep = targets != IGNORE
    n = int(keep.sum())
    with plan.autocast() if plan else nullcontext():
        if fast and fast_path_supported(model):
            lm = _inner_causal_lm(model)
            if plan and "varlen_attention" in plan.applied:
                inputs.update(segment_kwargs(inputs))  # boundaries found once, outside any compiled layer
            with plan.offloading(model.training) if plan else nullcontext():
                hidden = lm.model(**inputs, use_cache=False).last_hidden_state
            selected = hidden[:, :-1][keep]
            head = lm.get_output_embeddings()
            if plan and plan.fused_cross_entropy and head_is_frozen(head):
                return linear_cross_entropy_sum(selected, head, targets[keep], plan.ce_chunk_tokens), n
            return chunked_head_loss(head, selected, targets[keep]), n
        with plan.offloading(model.training) if plan else nullcontext():
            logits = model(**inputs, use_cache=False).logits
    flat = logits[:, :-1][keep].float()
    return F.cross_entropy(flat, targets[keep], reduction="sum"), n
