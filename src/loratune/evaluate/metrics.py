"""Answer metrics, per example, against one or several acceptable references (the best one counts).

Every score is on a 0-100 scale (SQuAD and sacrebleu report that way), so one table and one bar chart hold them
all:
- exact_match, token_f1: after SQuAD normalisation (lower case, no punctuation, no articles a/an/the, single
  spaces), as in the official SQuAD v1.1 evaluation script;
- rouge_l: ROUGE-L F-measure (longest common subsequence) from Google's `rouge-score`, without stemming;
- bleu, chrf: sentence-level BLEU (exp smoothing, 13a tokenizer) and chrF (character 6-grams, beta 2) from
  sacrebleu; the dataset figure is their mean over examples;
- gsm8k_accuracy: for GSM8K-style references (`... #### 72`), whether the prediction's final number equals the
  reference's; only examples with such a reference count;
- semantic_similarity: cosine of sentence embeddings x 100 (see semantic.py), added by `score_predictions`.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from loratune.errors import LoratuneError

TEXT_METRICS = ("exact_match", "token_f1", "rouge_l", "bleu", "chrf")
ALL_METRICS = (*TEXT_METRICS, "semantic_similarity", "gsm8k_accuracy")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


# --- SQuAD exact match and token F1 ----------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return 100.0 if normalize_answer(prediction) == normalize_answer(reference) else 0.0


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over the normalised bags of words."""
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    if not pred_tokens or not ref_tokens:
        # SQuAD convention: two empty answers agree, an empty one against a non-empty one scores 0.
        return 100.0 if pred_tokens == ref_tokens else 0.0
    common = Counter(pred_tokens) & Counter(ref_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 100.0 * 2 * precision * recall / (precision + recall)


# --- ROUGE-L, BLEU, chrF (the field's implementations) ---------------------------------------------------------------
def _missing(package: str) -> LoratuneError:
    return LoratuneError(f"the metric needs the package {package}, which is not installed",
                         hint='pip install "loratune[eval]"')


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise _missing("rouge-score") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    return 100.0 * _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def _sacrebleu() -> Any:
    try:
        import sacrebleu
    except ImportError:
        raise _missing("sacrebleu") from None
    return sacrebleu


def bleu(prediction: str, reference: str) -> float:
    return float(_sacrebleu().sentence_bleu(prediction, [reference]).score)


def chrf(prediction: str, reference: str) -> float:
    return float(_sacrebleu().sentence_chrf(prediction, [reference]).score)


# --- GSM8K final number ----------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def is_gsm8k_reference(reference: str) -> bool:
    return "####" in reference


def final_number(text: str) -> str | None:
    """The answer's final number, normalised ("1,000.50" -> "1000.5"): the number after the last `####` when there
    is one (GSM8K's answer line), else the last number in the text (what a model that skips the marker means)."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    raw = (found[0] if "####" in text else found[-1]).replace(",", "")
    try:
        value = float(raw)
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def gsm8k_correct(prediction: str, reference: str) -> float:
    expected = final_number(reference)
    return 100.0 if expected is not None and final_number(prediction) == expected else 0.0


# --- per example, best reference -------------------------------------------------------------------------------------
_TEXT_FUNCTIONS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l, "bleu": bleu, "chrf": chrf,
}


def best_over(metric: Callable[[str, str], float], prediction: str, references: Sequence[str]) -> float:
    """The score against the most favourable reference (datasets with several acceptable answers)."""
    if not references:
        raise ValueError("an example needs at least one reference answer")
    return max(metric(prediction, ref) for ref in references)


def score_example(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """All text metrics for one prediction; gsm8k_accuracy only when a reference is GSM8K-style."""
    scores = {name: best_over(fn, prediction, references) for name, fn in _TEXT_FUNCTIONS.items()}
    gsm_refs = [r for r in references if is_gsm8k_reference(r)]
    if gsm_refs:
        scores["gsm8k_accuracy"] = best_over(gsm8k_correct, prediction, gsm_refs)
    return scores


def score_predictions(predictions: Sequence[str], references: Sequence[Sequence[str]], *,
                      similarity: Callable[[list[str], list[list[str]]], list[float]] | None = None
                      ) -> list[dict[str, float]]:
    """Per-example scores; `similarity(predictions, references)` adds semantic_similarity (best reference)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    rows = [score_example(p, refs) for p, refs in zip(predictions, references)]
    if similarity is not None and rows:
        for row, value in zip(rows, similarity(list(predictions), [list(r) for r in references])):
            row["semantic_similarity"] = value
    return rows


def mean_scores(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the examples that have it, in ALL_METRICS order."""
    out: dict[str, float] = {}
    for name in ALL_METRICS:
        values = [row[name] for row in rows if name in row]
        if values:
            out[name] = sum(values) / len(values)
    return out
