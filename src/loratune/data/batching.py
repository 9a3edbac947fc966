"""Data order and batches: a seeded, resumable schedule of micro-batches, padded or packed.

The schedule is a pure function of (number of examples, batch size, seed, epoch), so a resumed run recomputes
exactly the same order from the step number alone: no sampler state to save.

Packing (`data.packing: true`, the default) concatenates a micro-batch's examples into one row without padding.
Position ids restart at 0 for each example, and the attention never crosses an example boundary
(transformers builds a block-diagonal causal mask from restarting position ids for sdpa/eager, and flash
attention uses them as varlen boundaries). No padded token is computed at all.

A packed batch must be run with `use_cache=False` (as `training.loss.loss_sum` does): transformers 5 looks for
packed sequences only when there is no KV cache, and with the config's default `use_cache=True` the model makes an
empty cache first, so the mask silently becomes one causal mask across all examples (logits off by up to 7.8 on
the tiny test model). tests/test_packing.py checks packed == padded (loss) and packed == alone (logits).
"""

from __future__ import annotations

import math

import torch

from loratune.data.tokenize import IGNORE, Example


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = epoch_order(n, seed, epoch)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def schedule(n: int, batch_size: int, grad_accum: int, seed: int, *, epochs: float, max_steps: int | None):
    """Yield (step, epoch, [micro-batch indices] * grad_accum) for every optimizer step, from step 1."""
    per_epoch = math.ceil(n / batch_size)
    total_micro = max_steps * grad_accum if max_steps else max(grad_accum, round(epochs * per_epoch))
    total_steps = max_steps or max(1, total_micro // grad_accum)
    step, epoch, window = 1, 0, []
    while step <= total_steps:
        for mb in micro_batches(n, batch_size, seed, epoch):
            window.append(mb)
            if len(window) == grad_accum:
                yield step, epoch, window
                window = []
                step += 1
                if step > total_steps:
                    return
        epoch += 1


def total_steps(n: int, batch_size: int, grad_accum: int, *, epochs: float, max_steps: int | None) -> int:
    if max_steps:
        return max_steps
    per_epoch = math.ceil(n / batch_size)
    return max(1, max(grad_accum, round(epochs * per_epoch)) // grad_accum)


def collate(examples: list[Example], pad_id: int, *, packing: bool) -> dict[str, torch.Tensor]:
    """Padded: [B, T] right-padded with attention_mask. Packed: [1, sum(T_i)] with restarting position_ids."""
    if packing:
        ids = [t for ex in examples for t in ex.input_ids]
        labels: list[int] = []
        for ex in examples:
            # The first token of each packed example must not be predicted from the previous example's last.
            labels.extend([IGNORE, *ex.labels[1:]])
        positions = [p for ex in examples for p in range(len(ex.input_ids))]
        return {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]),
        }
    longest = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels_t = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[i, :n] = torch.tensor(ex.input_ids)
        labels_t[i, :n] = torch.tensor(ex.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels_t, "attention_mask": mask}


def n_target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss: labels shifted by one (the first position predicts nothing)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def n_real_tokens(batch: dict[str, torch.Tensor]) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())
