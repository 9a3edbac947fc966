"""The evaluation report: metrics side by side, relative change, bar charts, and the examples that changed most.

Everything lands in one folder, written atomically as a whole (a crash leaves the previous report, never half a
new one):
    metrics.json        per-model metrics, relative change, data and settings
    predictions.jsonl   every example: prompt, references, each model's answer, perplexity and scores
    metrics.png         answer metrics (0-100) per model;   perplexity.png: answer perplexity per model
    report.md           the table, the charts and the 10 most improved / regressed examples
    report.html         the same, self-contained (charts inlined as base64), to open or mail as one file

The first model is the one evaluated, the second (if any) the comparison; "change" is evaluated vs compared.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loratune.evaluate.metrics import ALL_METRICS, TEXT_METRICS, mean_scores
from loratune.plots import bar_comparison
from loratune.runs import atomic_path

TITLES = {
    "answer_perplexity": "answer perplexity (lower is better)",
    "exact_match": "exact match",
    "token_f1": "token F1",
    "rouge_l": "ROUGE-L",
    "bleu": "BLEU",
    "chrf": "chrF",
    "semantic_similarity": "semantic similarity",
    "gsm8k_accuracy": "GSM8K final-number accuracy",
}
N_EXAMPLES = 10
MAX_SHOWN_CHARS = 1500


# --- numbers ---------------------------------------------------------------------------------------------------------
def model_metrics(result: Any) -> dict[str, float]:
    """answer_perplexity, answer_tokens and the mean of each answer metric (0-100) for one ModelResult."""
    return {"answer_perplexity": result.nll.perplexity, "answer_tokens": sum(result.nll.tokens),
            **mean_scores(result.scores)}


def relative_change(new: float, old: float) -> float | None:
    """(new - old) / |old|, or None when old is 0 (no meaningful ratio)."""
    return (new - old) / abs(old) if old else None


def primary_metric(metrics: dict[str, float]) -> str:
    """What ranks the changed examples: the final answer for GSM8K-style data, token F1 otherwise."""
    return "gsm8k_accuracy" if "gsm8k_accuracy" in metrics else "token_f1"


def _log_ppl(result: Any, i: int) -> float:
    tokens = result.nll.tokens[i]
    return result.nll.nll[i] / tokens if tokens else 0.0


def change_key(evaluated: Any, compared: Any, i: int, primary: str) -> tuple[float, float, float]:
    """How much example i got better: the primary metric first; ties (common: GSM8K is right or wrong) broken
    by the mean change of the other text metrics, then by the drop in answer log-perplexity."""
    new, old = evaluated.scores[i], compared.scores[i]
    others = [m for m in TEXT_METRICS if m != primary]
    text_delta = sum(new[m] - old[m] for m in others) / len(others)
    return (new.get(primary, 0.0) - old.get(primary, 0.0), text_delta,
            _log_ppl(compared, i) - _log_ppl(evaluated, i))


def changed_examples(evaluated: Any, compared: Any, primary: str, n: int = N_EXAMPLES) -> tuple[list[int], list[int]]:
    """Indices of the n most improved (best first) and n most regressed (worst first) examples."""
    keys = {i: change_key(evaluated, compared, i, primary) for i in range(len(evaluated.scores))}
    zero = (0.0, 0.0, 0.0)
    improved = sorted((i for i, k in keys.items() if k > zero), key=lambda i: keys[i], reverse=True)[:n]
    regressed = sorted((i for i, k in keys.items() if k < zero), key=lambda i: keys[i])[:n]
    return improved, regressed


# --- the folder ------------------------------------------------------------------------------------------------------
def write_report(out_dir: str | Path, data: Any, results: Sequence[Any], *, settings: dict[str, Any]) -> dict[str, Any]:
    """Write the report folder for one or two ModelResults on `data` (an EvalData); return metrics.json."""
    out_dir = Path(out_dir)
    per_model = {r.label: model_metrics(r) for r in results}
    for r in results:
        per_model[r.label]["seconds"] = r.seconds
    summary: dict[str, Any] = {
        "data": data.description,
        "examples": len(data.conversations),
        "models": {r.label: r.ref for r in results},
        "metrics": per_model,
        "settings": settings,
        "output": str(out_dir),
    }
    improved: list[int] = []
    regressed: list[int] = []
    if len(results) == 2:
        evaluated, compared = results
        new, old = per_model[evaluated.label], per_model[compared.label]
        summary["relative_change"] = {m: relative_change(new[m], old[m]) for m in _shown(new) if m in old}
        summary["primary_metric"] = primary_metric(new)
        improved, regressed = changed_examples(evaluated, compared, summary["primary_metric"])
        summary["most_improved"] = [data.conversations[i].origin for i in improved]
        summary["most_regressed"] = [data.conversations[i].origin for i in regressed]

    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "metrics.json").write_text(json.dumps(_finite(summary), indent=2, ensure_ascii=False) + "\n")
        _write_predictions(tmp / "predictions.jsonl", data, results)
        scores = {TITLES[m]: {r.label: per_model[r.label][m] for r in results if m in per_model[r.label]}
                  for m in ALL_METRICS if any(m in per_model[r.label] for r in results)}
        title = " vs ".join(r.label for r in results)
        bar_comparison(scores, tmp / "metrics.png", title=f"answer metrics (0-100): {title}")
        bar_comparison({"answer perplexity": {r.label: per_model[r.label]["answer_perplexity"] for r in results}},
                       tmp / "perplexity.png", title="answer perplexity (lower is better)")
        sections = _sections(data, results, summary, improved, regressed)
        (tmp / "report.md").write_text(_markdown(summary, sections), encoding="utf-8")
        (tmp / "report.html").write_text(_html(summary, sections, tmp), encoding="utf-8")
    return summary


def _shown(metrics: dict[str, float]) -> list[str]:
    return [m for m in ("answer_perplexity", *ALL_METRICS) if m in metrics]


def _finite(value: Any) -> Any:
    """JSON has no NaN: an undefined number (no answer tokens) is written as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _prompt_text(conversation: Any) -> str:
    return "\n\n".join(f"[{m.role}] {m.content}" if m.role != "user" else m.content
                       for m in conversation.prompt_messages)


def _write_predictions(path: Path, data: Any, results: Sequence[Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, conv in enumerate(data.conversations):
            row: dict[str, Any] = {"origin": conv.origin, "prompt": _prompt_text(conv),
                                   "references": data.references[i]}
            for r in results:
                row[r.label] = {"answer": r.predictions[i], "answer_perplexity": r.nll.example_perplexity(i),
                                **{k: round(v, 4) for k, v in r.scores[i].items()}}
            f.write(json.dumps(_finite(row), ensure_ascii=False) + "\n")


def _clip(text: str) -> str:
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + " ..."


def _sections(data: Any, results: Sequence[Any], summary: dict[str, Any], improved: list[int],
              regressed: list[int]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(heading, examples) for the improved and regressed lists; each example carries what both formats print."""
    if len(results) != 2:
        return []
    primary = summary["primary_metric"]
    evaluated, compared = results

    def entry(i: int) -> dict[str, Any]:
        conv = data.conversations[i]
        return {
            "origin": conv.origin or f"example {i}",
            "change": f"{TITLES[primary]} {compared.scores[i].get(primary, 0):.1f} -> "
                      f"{evaluated.scores[i].get(primary, 0):.1f}; perplexity "
                      f"{compared.nll.example_perplexity(i):.2f} -> {evaluated.nll.example_perplexity(i):.2f}",
            "blocks": [("prompt", _clip(_prompt_text(conv))),
                       ("reference", _clip("\n---\n".join(data.references[i]))),
                       (compared.label, _clip(compared.predictions[i])),
                       (evaluated.label, _clip(evaluated.predictions[i]))],
        }

    return [(f"{len(improved)} most improved examples", [entry(i) for i in improved]),
            (f"{len(regressed)} most regressed examples", [entry(i) for i in regressed])]


def _table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    labels = list(summary["models"])
    ordered = labels[::-1]  # the comparison (before) left of the evaluated model (after)
    header = ["metric", *ordered] + (["change"] if len(labels) == 2 else [])
    first = summary["metrics"][labels[0]]
    rows = []
    for m in _shown(first):
        row = [TITLES[m], *(_number(summary["metrics"][label].get(m)) for label in ordered)]
        if len(labels) == 2:
            change = summary["relative_change"].get(m)
            row.append("n/a" if change is None else f"{100 * change:+.1f}%")
        rows.append(row)
    return header, rows


def _number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.3f}"


def _intro(summary: dict[str, Any]) -> list[str]:
    s = summary["settings"]
    models = "; ".join(f"{label}: {ref}" for label, ref in summary["models"].items())
    return [f"Data: {summary['data']} ({summary['examples']} examples). Models: {models}.",
            f"Greedy decoding ({s['dtype']} weights), at most {s['max_new_tokens']} new tokens; scores are 0-100 (best reference where "
            f"several are given); perplexity is over answer tokens only, in the run's template. Semantic "
            f"similarity: {s['semantic_similarity']}. Wall time {s['wall_time_s']} s."]


def _markdown(summary: dict[str, Any], sections: list[tuple[str, list[dict[str, Any]]]]) -> str:
    header, rows = _table_rows(summary)
    lines = ["# Evaluation report", "", *_intro(summary), "",
             "| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "![answer metrics](metrics.png) ![answer perplexity](perplexity.png)", ""]
    if "primary_metric" in summary:
        lines += [f"Examples are ranked by the change in {TITLES[summary['primary_metric']]}, then the mean change "
                  "of the other text metrics, then the drop in answer perplexity.", ""]
    for heading, entries in sections:
        lines += [f"## {heading}", ""]
        for k, e in enumerate(entries, 1):
            lines += [f"### {k}. {e['origin']}", "", f"*{e['change']}*", ""]
            for name, text in e["blocks"]:
                lines += [f"**{name}**", "", "````text", text, "````", ""]
    return "\n".join(lines) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px}td:not(:first-child){text-align:right}
th{background:#f3f3f3}img{max-width:49%;vertical-align:top}pre{white-space:pre-wrap;background:#f7f7f7;padding:8px;margin:2px 0 10px}
.ex{border-top:1px solid #ddd;margin-top:1.2em}.change{color:#555;font-style:italic}h4{margin:6px 0 0}"""


def _html(summary: dict[str, Any], sections: list[tuple[str, list[dict[str, Any]]]], folder: Path) -> str:
    esc = html.escape
    header, rows = _table_rows(summary)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Evaluation report</title>",
             f"<style>{_CSS}</style></head><body><h1>Evaluation report</h1>"]
    parts += [f"<p>{esc(line)}</p>" for line in _intro(summary)]
    parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
    parts.append("</table><div>")
    for png in ("metrics.png", "perplexity.png"):  # inlined, so the one file is the whole report
        encoded = base64.b64encode((folder / png).read_bytes()).decode("ascii")
        parts.append(f"<img alt='{png}' src='data:image/png;base64,{encoded}'>")
    parts.append("</div>")
    for heading, entries in sections:
        parts.append(f"<h2>{esc(heading)}</h2>")
        for k, e in enumerate(entries, 1):
            parts.append(f"<div class='ex'><h3>{k}. {esc(e['origin'])}</h3><p class='change'>{esc(e['change'])}</p>")
            parts += [f"<h4>{esc(name)}</h4><pre>{esc(text)}</pre>" for name, text in e["blocks"]]
            parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def print_summary(summary: dict[str, Any]) -> None:
    """The metrics table in the terminal."""
    from rich.table import Table

    from loratune.training.progress import console

    header, rows = _table_rows(summary)
    table = Table(title=f"evaluation: {summary['data']} ({summary['examples']} examples)")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
