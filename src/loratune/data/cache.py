"""The tokenized-dataset cache, and the on-disk format of a prepared dataset (`loratune prepare --out`).

Key: a SHA-256 over everything that changes the tokens: the data files' contents (or a hub name + pinned
revision), the data options (split, slices, field map, OASST1 options, system prompt, max_length, truncation,
train_on_prompt, validation split and seed), the template, and the tokenizer (name and a hash of its full
serialised vocabulary/merges/normaliser). File contents are hashed rather than trusting mtimes, so an edited file
can never be served stale tokens. A hub dataset without `data.revision` is not cached: we could not tell whether
the hub copy changed.

Layout of a prepared folder (the cache entry and `prepare --out` are the same format):
    meta.json            key, max_length, stats, dropped rows and why, truncation counts
    train.jsonl          one {"input_ids", "labels", "origin", "truncated"} per example
    validation.jsonl     the same, when there is validation data
    conversations.jsonl  the conversations behind them ({"split", "origin", "messages", "references"})
Folders are written through `atomic_path`, so an interrupted write leaves no entry at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from loratune.config import DataConfig
from loratune.data.conversation import Conversation, Message
from loratune.data.templates import Template
from loratune.data.tokenize import Example, TokenizedData
from loratune.runs import atomic_path

FORMAT_VERSION = 1  # bump when the tokenization or this layout changes: old entries then miss
_CHUNK = 1 << 20


def _file_digest(path: Path, h: Any) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)


def source_identity(cfg: DataConfig, path: str | None) -> str | None:
    """A content hash of a local file or folder, `hub:name@revision`, or None (not cacheable)."""
    if path is None:
        return ""
    p = Path(path).expanduser()
    h = hashlib.sha256()
    if p.is_file():
        _file_digest(p, h)
        return f"file:{h.hexdigest()}"
    if p.is_dir():
        for child in sorted(c for c in p.rglob("*") if c.is_file() and not c.name.startswith(".")):
            h.update(str(child.relative_to(p)).encode())
            _file_digest(child, h)
        return f"dir:{h.hexdigest()}"
    return f"hub:{path}@{cfg.revision}" if cfg.revision else None


def tokenizer_identity(tokenizer: Any) -> str:
    """Name + a hash of the whole fast-tokenizer JSON (vocab, merges, normaliser, added tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:  # slow tokenizers: the vocabulary and the special tokens
        body = json.dumps(sorted(tokenizer.get_vocab().items())) + json.dumps(tokenizer.special_tokens_map)
    digest = hashlib.sha256(body.encode()).hexdigest()
    return f"{getattr(tokenizer, 'name_or_path', '')}:{digest}"


def cache_key(cfg: DataConfig, tokenizer: Any, template: Template, *, seed: int, model_max: int | None) -> str | None:
    """The cache key, or None when the data cannot be identified (an unpinned hub dataset)."""
    train_id = source_identity(cfg, cfg.path)
    validation_id = source_identity(cfg, cfg.validation_path)
    if train_id is None or validation_id is None:
        return None
    options = cfg.model_dump(mode="json", exclude={"packing"})  # packing changes batches, not tokens
    parts = {"version": FORMAT_VERSION, "train": train_id, "validation": validation_id, "options": options,
             "seed": seed, "model_max": model_max, "template": template.to_dict(),
             "tokenizer": tokenizer_identity(tokenizer)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cache_dir(key: str) -> Path:
    """`$LORATUNE_DATA_CACHE/<key>`, by default `<loratune cache>/datasets/<key>`."""
    from loratune.models.load import cache_root

    root = os.environ.get("LORATUNE_DATA_CACHE")
    return (Path(root) if root else cache_root() / "datasets") / key


# --- reading and writing a prepared folder -------------------------------------------------------------------------------
def _write_examples(path: Path, data: TokenizedData) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in data.examples:
            f.write(json.dumps({"input_ids": ex.input_ids, "labels": ex.labels, "origin": ex.origin,
                                "truncated": ex.truncated}, ensure_ascii=False) + "\n")


def _read_examples(path: Path) -> list[Example]:
    with open(path, encoding="utf-8") as f:
        return [Example(r["input_ids"], r["labels"], r["origin"], r["truncated"]) for r in map(json.loads, f)]


def _conversation_record(split: str, c: Conversation) -> dict[str, Any]:
    messages = [{"role": m.role, "content": m.content, **({} if m.trainable else {"trainable": False})}
                for m in c.messages]
    return {"split": split, "origin": c.origin, "messages": messages, "references": c.references}


def save_prepared(folder: Path, *, key: str | None, max_length: int, stats: dict[str, Any],
                  train: TokenizedData, validation: TokenizedData | None, train_conversations: list[Conversation],
                  validation_conversations: list[Conversation], source_dropped: dict[str, list[str]],
                  extra_files: dict[str, Any] | None = None) -> Path:
    """Write a prepared folder atomically. `extra_files`: name -> callable(path) for report files."""
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        _write_examples(tmp / "train.jsonl", train)
        if validation is not None:
            _write_examples(tmp / "validation.jsonl", validation)
        with open(tmp / "conversations.jsonl", "w", encoding="utf-8") as f:
            for split, convs in (("train", train_conversations), ("validation", validation_conversations)):
                for c in convs:
                    f.write(json.dumps(_conversation_record(split, c), ensure_ascii=False) + "\n")
        meta = {"format": FORMAT_VERSION, "key": key, "max_length": max_length, "stats": stats,
                "source_dropped": source_dropped,
                "train": {"dropped": train.dropped, "n_truncated": train.n_truncated},
                "validation": ({"dropped": validation.dropped, "n_truncated": validation.n_truncated}
                               if validation is not None else None)}
        for name, write in (extra_files or {}).items():
            write(tmp / name)
        # meta.json last: a folder with meta.json is complete even if someone copies it by hand.
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return folder


def load_prepared(folder: Path) -> dict[str, Any] | None:
    """The parts of a prepared folder, or None if it is missing, incomplete or of another format version."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT_VERSION:
        return None
    train = TokenizedData(_read_examples(folder / "train.jsonl"), meta["train"]["dropped"],
                          meta["train"]["n_truncated"])
    validation = None
    if meta.get("validation") is not None:
        v = meta["validation"]
        validation = TokenizedData(_read_examples(folder / "validation.jsonl"), v["dropped"], v["n_truncated"])
    conversations: dict[str, list[Conversation]] = {"train": [], "validation": []}
    with open(folder / "conversations.jsonl", encoding="utf-8") as f:
        for record in map(json.loads, f):
            messages = [Message(m["role"], m["content"], m.get("trainable", True)) for m in record["messages"]]
            conversations[record["split"]].append(Conversation(messages, record["origin"], record["references"]))
    return {"meta": meta, "train": train, "validation": validation, "conversations": conversations}
