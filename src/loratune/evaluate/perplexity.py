"""Answer-only perplexity: the model's NLL of the reference answer given the prompt, in the run's own template.

Each conversation is tokenized exactly as training saw it (`data.tokenize.encode`: prompt and role headers carry
label -100, answer tokens and the end-of-turn token carry their ids), so the number is comparable with the
validation loss logged during training. The dataset perplexity is exp(total NLL / total answer tokens), the
token-weighted mean that training reports too; per-example sums are kept for the improved/regressed lists.

Examples are batched by length (longest first) so that padding, which costs compute but no loss, stays small.
On architectures whose logits are just the output head (`training.loss.fast_path_supported`), the head runs
only over answer positions, so [batch x length x vocab] logits never exist.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from loratune.data.batching import collate
from loratune.data.conversation import Conversation
from loratune.data.templates import Template
from loratune.data.tokenize import IGNORE, Example, encode
from loratune.training.loss import chunked_head_loss, fast_path_supported


@dataclass
class AnswerNLL:
    """Per-example summed NLL (nats) over answer tokens, and the number of those tokens."""

    nll: list[float]
    tokens: list[int]
    truncated: int = 0

    @property
    def perplexity(self) -> float:
        total = sum(self.tokens)
        return math.exp(sum(self.nll) / total) if total else float("nan")

    def example_perplexity(self, i: int) -> float:
        return math.exp(self.nll[i] / self.tokens[i]) if self.tokens[i] else float("nan")


def encode_for_eval(conversations: Sequence[Conversation], template: Template, tokenizer: Any,
                    max_length: int) -> tuple[list[Example], int]:
    """Tokenize each conversation; cut the longest at `max_length` (the model's context). Order is kept: an
    example cut down to no answer tokens stays in place with 0 tokens, so indices match the generations."""
    examples, truncated = [], 0
    for conv in conversations:
        ex = encode(conv, template, tokenizer)
        if len(ex.input_ids) > max_length:
            ex = Example(ex.input_ids[:max_length], ex.labels[:max_length], ex.origin, truncated=True)
            truncated += 1
        examples.append(ex)
    return examples, truncated


def _row_nll(model: Any, batch: dict[str, torch.Tensor], fast: bool) -> torch.Tensor:
    """Summed NLL over answer tokens for each row of a right-padded batch: shape [batch]."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if fast and fast_path_supported(model):
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = lm.model(**inputs, use_cache=False).last_hidden_state[:, :-1]
        head = lm.get_output_embeddings()
        return torch.stack([chunked_head_loss(head, hidden[i][keep[i]], targets[i][keep[i]])
                            for i in range(hidden.shape[0])])
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                          reduction="none")
    return nll.view(targets.shape).sum(dim=1)


def answer_nll(model: Any, examples: Sequence[Example], pad_id: int, *, batch_size: int = 16, device: Any = "cpu",
               fast: bool = True, on_batch: Callable[[int], None] | None = None) -> AnswerNLL:
    """Per-example summed answer NLL; `on_batch(n_examples)` after each batch drives a progress bar."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    nll = [0.0] * len(examples)
    tokens = [0] * len(examples)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = collate([examples[i] for i in chunk], pad_id, packing=False)
                counts = (batch["labels"][:, 1:] != IGNORE).sum(dim=1).tolist()
                sums = _row_nll(model, {k: v.to(device) for k, v in batch.items()}, fast).tolist()
                for i, s, n in zip(chunk, sums, counts):
                    nll[i], tokens[i] = float(s), int(n)
                if on_batch:
                    on_batch(len(chunk))
    finally:
        if was_training:
            model.train()
    return AnswerNLL(nll, tokens, sum(1 for ex in examples if ex.truncated))
