"""PNG plots people would rather look at than read: loss curves, length histograms, metric comparisons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loratune.runs import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve(records: list[dict[str, Any]], path: str | Path, title: str = "loss") -> Path:
    """Train loss per logged step and validation loss per evaluation, on one axis."""
    plt = _pyplot()
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", color="#1f77b4", linewidth=1.4)
    if val:
        ax.plot(*zip(*val), label="validation", color="#d62728", marker="o", linewidth=1.4)
        best = min(val, key=lambda sv: sv[1])
        ax.annotate(f"best {best[1]:.3f} @ {best[0]}", best, textcoords="offset points", xytext=(5, 8), fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, plt, path)


def histogram(values: list[int], path: str | Path, *, title: str, xlabel: str, marks: dict[str, float] | None = None) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.hist(values, bins=min(50, max(5, len(set(values)))), color="#4c72b0", alpha=0.85)
    for label, x in (marks or {}).items():
        ax.axvline(x, color="#d62728", linestyle="--", linewidth=1)
        ax.text(x, ax.get_ylim()[1] * 0.95, f" {label}", color="#d62728", fontsize=8, va="top")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, plt, path)


def bar_comparison(metrics: dict[str, dict[str, float]], path: str | Path, *, title: str) -> Path:
    """metrics: {metric: {model_label: value}} -> grouped bars."""
    plt = _pyplot()
    names = list(metrics)
    labels = sorted({label for m in metrics.values() for label in m})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4), dpi=110)
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [metrics[n].get(label, 0.0) for n in names], width=width, label=label)
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(names))])
    ax.set_xticklabels(names, rotation=20, ha="right")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
