"""Config -> tokenized train/validation sets: load, add the system prompt, split, tokenize, check.

Used by `loratune train`, `loratune prepare` and `loratune eval`, so all three see the same examples.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loratune.config import DataConfig
from loratune.data.conversation import Conversation
from loratune.data.sources import load_conversations
from loratune.data.templates import Template
from loratune.data.tokenize import TokenizedData, auto_max_length, encode, length_stats, tokenize_conversations
from loratune.errors import LoratuneError


@dataclass
class PreparedData:
    train: TokenizedData
    validation: TokenizedData | None
    train_conversations: list[Conversation]
    validation_conversations: list[Conversation]
    max_length: int
    stats: dict[str, Any] = field(default_factory=dict)


def load_splits(cfg: DataConfig, seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation) conversations, before tokenization."""
    if not cfg.path:
        raise LoratuneError("no training data given", key="data.path", hint="set data.path to a file or dataset name")
    train = load_conversations(cfg, cfg.path, cfg.split)
    validation: list[Conversation] = []
    if cfg.validation_path:
        validation = load_conversations(cfg, cfg.validation_path, cfg.validation_split or "train")
    elif cfg.validation_split:
        validation = load_conversations(cfg, cfg.path, cfg.validation_split)
    if cfg.val_fraction and not validation:
        shuffled = list(train)
        random.Random(seed).shuffle(shuffled)
        n_val = max(1, round(len(shuffled) * cfg.val_fraction))
        validation, train = shuffled[:n_val], shuffled[n_val:]
    if cfg.max_examples:
        train = train[: cfg.max_examples]
    if cfg.system_prompt:
        train = [c.with_system(cfg.system_prompt) for c in train]
        validation = [c.with_system(cfg.system_prompt) for c in validation]
    if not train:
        raise LoratuneError("the training set is empty after loading and filtering", file=cfg.path, key="data.path",
                            hint="check data.split, the slice and the filters (e.g. data.oasst1.lang)")
    return train, validation


def prepare(cfg: DataConfig, tokenizer: Any, template: Template, *, seed: int, model_max: int | None,
            log: Callable[[str], None] = lambda _: None) -> PreparedData:
    train_convs, val_convs = load_splits(cfg, seed)
    if cfg.max_length == "auto":
        lengths = [len(encode(c, template, tokenizer).input_ids) for c in train_convs]
        max_length = auto_max_length(lengths, model_max)
        log(f"data.max_length: auto -> {max_length} (p99 of {len(lengths)} examples, rounded up to 64)")
    else:
        max_length = cfg.max_length
        if model_max and max_length > model_max:
            raise LoratuneError(f"{max_length} is longer than the model's context ({model_max} tokens)",
                                key="data.max_length", hint=f"set data.max_length to at most {model_max} or auto")
    kw = dict(max_length=max_length, train_on_prompt=cfg.train_on_prompt, truncation=cfg.truncation)
    train = tokenize_conversations(train_convs, template, tokenizer, **kw)
    validation = tokenize_conversations(val_convs, template, tokenizer, **kw) if val_convs else None
    stats = {"train": length_stats([len(e.input_ids) for e in train.examples])}
    if validation:
        stats["validation"] = length_stats([len(e.input_ids) for e in validation.examples])
    return PreparedData(train, validation, train_convs, val_convs, max_length, stats)
