"""Config -> tokenized train/validation sets: load, add the system prompt, split, tokenize, check.

Used by `loratune train`, `loratune prepare` and `loratune eval`, so all three see the same examples. With
`cache=True` the tokenized result is stored under a hash of everything that shapes it (see `cache.py`) and
reused by the next run with the same data, template, tokenizer and limits.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratune.config import Config, DataConfig
from loratune.data import cache as data_cache
from loratune.data.conversation import Conversation
from loratune.data.sources import load_conversations
from loratune.data.templates import Template, resolve_template
from loratune.data.tokenize import (
    TokenizedData,
    auto_max_length,
    check_trainable,
    encode,
    length_stats,
    preflight,
    tokenize_conversations,
)
from loratune.errors import LoratuneError


@dataclass
class PreparedData:
    train: TokenizedData
    validation: TokenizedData | None
    train_conversations: list[Conversation]
    validation_conversations: list[Conversation]
    max_length: int
    stats: dict[str, Any] = field(default_factory=dict)
    source_dropped: dict[str, list[str]] = field(default_factory=dict)  # skipped by loaders: reason -> origins
    cache_key: str | None = None
    from_cache: bool = False


def load_splits(cfg: DataConfig, seed: int,
                dropped: dict[str, list[str]] | None = None) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation) conversations, before tokenization."""
    if not cfg.path:
        raise LoratuneError("no training data given", key="data.path", hint="set data.path to a file or dataset name")
    train = load_conversations(cfg, cfg.path, cfg.split, dropped)
    validation: list[Conversation] = []
    if cfg.validation_path:
        validation = load_conversations(cfg, cfg.validation_path, cfg.validation_split or "train", dropped)
    elif cfg.validation_split:
        validation = load_conversations(cfg, cfg.path, cfg.validation_split, dropped)
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
            log: Callable[[str], None] = lambda _: None, cache: bool = False) -> PreparedData:
    """Load, tokenize and check the data; fails loudly on any example with no answer tokens (see
    `tokenize.check_trainable`). With `cache`, reuse or store the result in the tokenized-dataset cache."""
    key = data_cache.cache_key(cfg, tokenizer, template, seed=seed, model_max=model_max) if cache else None
    if key is not None:
        hit = data_cache.load_prepared(data_cache.cache_dir(key))
        if hit is not None:
            log(f"data: tokenized cache hit ({data_cache.cache_dir(key)})")
            meta = hit["meta"]
            return PreparedData(hit["train"], hit["validation"], hit["conversations"]["train"],
                                hit["conversations"]["validation"], meta["max_length"], meta["stats"],
                                meta["source_dropped"], key, from_cache=True)
    source_dropped: dict[str, list[str]] = {}
    train_convs, val_convs = load_splits(cfg, seed, source_dropped)
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
    check_trainable(train, where=cfg.path or "data")
    validation = tokenize_conversations(val_convs, template, tokenizer, **kw) if val_convs else None
    if validation is not None:
        check_trainable(validation, where=cfg.validation_path or cfg.path or "data")
    stats = {"train": length_stats([len(e.input_ids) for e in train.examples])}
    if validation:
        stats["validation"] = length_stats([len(e.input_ids) for e in validation.examples])
    data = PreparedData(train, validation, train_convs, val_convs, max_length, stats, source_dropped, key)
    if key is not None:
        try:
            save(data, data_cache.cache_dir(key))
        except OSError as e:  # a read-only or full cache disk must not stop training; it only costs speed
            log(f"[yellow]data: could not write the tokenized cache ({e}); continuing without it[/]")
    return data


def save(data: PreparedData, folder: Path, extra_files: dict[str, Any] | None = None) -> Path:
    return data_cache.save_prepared(
        folder, key=data.cache_key, max_length=data.max_length, stats=data.stats, train=data.train,
        validation=data.validation, train_conversations=data.train_conversations,
        validation_conversations=data.validation_conversations, source_dropped=data.source_dropped,
        extra_files=extra_files)


# --- `loratune prepare` -------------------------------------------------------------------------------------------------
def load_tokenizer_only(cfg: Config) -> tuple[Any, str | None, int | None]:
    """(tokenizer, model_type, context length) without loading any weights: preparing data needs no model."""
    from transformers import AutoConfig

    from loratune.models.load import context_length, load_tokenizer, resolve_base

    source = resolve_base(cfg.model)
    tokenizer = load_tokenizer(source, cfg.model)
    try:
        hf_config = AutoConfig.from_pretrained(source, revision=cfg.model.revision,
                                               trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError):  # a tokenizer-only folder: no architecture default, no context cap
        return tokenizer, None, None
    return tokenizer, getattr(hf_config, "model_type", None), context_length(hf_config)


def run_prepare(cfg: Config, out: Path, *, config_path: str, log: Callable[[str], None] = lambda _: None) -> Path:
    """Load, render, tokenize, check and write `out/` (a prepared folder + data_report.md + lengths.png)."""
    from loratune.data.report import length_histogram, render_report

    start = time.perf_counter()
    tokenizer, model_type, model_max = load_tokenizer_only(cfg)
    template = resolve_template(cfg.data.template, tokenizer, model_type, log=log)
    data = prepare(cfg.data, tokenizer, template, seed=cfg.training.seed, model_max=model_max, log=log, cache=True)
    preflight(data.train, tokenizer, where=cfg.data.path or "data")
    lengths = [len(e.input_ids) for e in data.train.examples]
    report = render_report(
        config_path=config_path, data_path=cfg.data.path, template_name=template.name, max_length=data.max_length,
        max_length_setting=cfg.data.max_length, stats=data.stats, train=data.train, validation=data.validation,
        n_train_conversations=len(data.train_conversations),
        n_validation_conversations=len(data.validation_conversations), source_dropped=data.source_dropped,
        tokenizer=tokenizer, seconds=time.perf_counter() - start, from_cache=data.from_cache)
    extra = {
        "data_report.md": lambda p: p.write_text(report, encoding="utf-8"),
        "lengths.png": lambda p: length_histogram(lengths, p, max_length=data.max_length,
                                                  title=f"{Path(cfg.data.path or 'data').name}: tokens per training example"),
        "template.json": lambda p: p.write_text(json.dumps(template.to_dict(), indent=2)),
    }
    return save(data, out, extra)
