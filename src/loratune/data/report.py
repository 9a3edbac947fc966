"""The data report people read before training: `data_report.md` and the token-length histogram PNG.

It says how many records became examples, what was dropped or truncated and why (with the first few origins, so
each can be looked up), the length statistics, and one rendered example with its masked tokens shown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loratune.data.tokenize import TokenizedData, render_mask
from loratune.plots import histogram

STAT_KEYS = ("count", "min", "mean", "p50", "p90", "p95", "p99", "max")
SHOWN_ORIGINS = 3
SHOWN_EXAMPLE_CHARS = 4000


def length_histogram(lengths: list[int], path: Path, *, max_length: int, title: str) -> Path:
    """Tokens per example, with the p50 / p99 / max_length lines marked."""
    import numpy as np

    marks: dict[str, float] = {}
    if lengths:
        marks = {f"p50 {np.percentile(lengths, 50):.0f}": float(np.percentile(lengths, 50))}
        p99 = float(np.percentile(lengths, 99))
        if abs(max_length - p99) > 0.08 * max_length:  # labels of lines this close would print over each other
            marks[f"p99 {p99:.0f}"] = p99
    marks[f"max_length {max_length}"] = max_length
    return histogram(lengths, path, title=title, xlabel="tokens per example", marks=marks)


def _drop_lines(dropped: dict[str, list[str]]) -> list[str]:
    lines = []
    for reason, origins in sorted(dropped.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(f"`{o}`" for o in origins[:SHOWN_ORIGINS])
        more = f" and {len(origins) - SHOWN_ORIGINS} more" if len(origins) > SHOWN_ORIGINS else ""
        lines.append(f"- {len(origins)} × {reason}: {shown}{more}")
    return lines


def render_report(*, config_path: str, data_path: str | None, template_name: str, max_length: int,
                  max_length_setting: Any, stats: dict[str, dict[str, Any]], train: TokenizedData,
                  validation: TokenizedData | None, n_train_conversations: int, n_validation_conversations: int,
                  source_dropped: dict[str, list[str]], tokenizer: Any, seconds: float, from_cache: bool) -> str:
    """The Markdown text of data_report.md."""
    how = "auto: p99 rounded up to a multiple of 64" if max_length_setting == "auto" else "from the config"
    trained = sum(ex.n_trainable for ex in train.examples)
    total = sum(len(ex.input_ids) for ex in train.examples)
    lines = [
        f"# Data report: {config_path}",
        "",
        f"- source: `{data_path}`",
        f"- template: `{template_name}`",
        f"- max_length: {max_length} ({how})",
        f"- prepared in {seconds:.1f} s" + (" (tokenized cache hit)" if from_cache else ""),
        "",
        "## Counts",
        "",
        "| | conversations | examples | truncated | dropped |",
        "|---|---:|---:|---:|---:|",
        f"| train | {n_train_conversations} | {len(train.examples)} | {train.n_truncated} | "
        f"{sum(len(v) for v in train.dropped.values())} |",
    ]
    if validation is not None:
        lines.append(f"| validation | {n_validation_conversations} | {len(validation.examples)} | "
                     f"{validation.n_truncated} | {sum(len(v) for v in validation.dropped.values())} |")
    lines += [
        "",
        f"Trainable (answer) tokens: {trained:,} of {total:,} ({100 * trained / max(total, 1):.1f}%).",
        "",
        "## Skipped while loading (before tokenization)",
        "",
        *(_drop_lines(source_dropped) or ["- none"]),
        "",
        "## Dropped or truncated at tokenization",
        "",
        *(_drop_lines({**train.dropped, **({f"validation: {k}": v for k, v in validation.dropped.items()}
                                           if validation is not None else {})}) or ["- nothing dropped"]),
        f"- {train.n_truncated} training examples truncated to {max_length} tokens (kept: the answer is cut short "
        "but its first tokens are still trained)",
        "",
        "## Length statistics (tokens per example, after truncation)",
        "",
        "| split | " + " | ".join(STAT_KEYS) + " |",
        "|---|" + "---:|" * len(STAT_KEYS),
    ]
    for split, values in stats.items():
        if values:
            lines.append(f"| {split} | " + " | ".join(str(values.get(k, "")) for k in STAT_KEYS) + " |")
    lines += ["", "![token lengths](lengths.png)", ""]
    if train.examples:
        example = train.examples[0]
        shown = render_mask(example, tokenizer)
        if len(shown) > SHOWN_EXAMPLE_CHARS:
            shown = shown[:SHOWN_EXAMPLE_CHARS] + " ..."
        lines += [
            "## One training example",
            "",
            f"From `{example.origin}`: {len(example.input_ids)} tokens, {example.n_trainable} trained. "
            "Masked (prompt) tokens are in ⟦brackets⟧; everything else carries the loss.",
            "",
            "```text",
            shown.replace("```", "ˋˋˋ"),
            "```",
            "",
        ]
    return "\n".join(lines)
