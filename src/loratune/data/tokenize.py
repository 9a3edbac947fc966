"""Conversation -> input_ids + answer-only labels, the pre-flight mask check, and length statistics.

Labels are -100 wherever the loss must not look: prompt tokens (unless `train_on_prompt`), role headers, and
nothing else. They are derived from the template's character spans, never from token ids, so an EOS that
happens to equal the pad token is still trained on: the peer bug where pad == eos masks EOS and the model
never learns to stop cannot happen here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loratune.data.conversation import Conversation
from loratune.data.templates import Template
from loratune.errors import LoratuneError

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    origin: str = ""
    truncated: bool = False

    @property
    def n_trainable(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class TokenizedData:
    examples: list[Example]
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> origins
    n_truncated: int = 0


def encode(conversation: Conversation, template: Template, tokenizer: Any, *, train_on_prompt: bool = False) -> Example:
    """Tokenize the whole rendered conversation once; label tokens whose first character lies in a trainable span."""
    segments = template.segments(conversation, tokenizer)
    text = "".join(s.text for s in segments)
    spans: list[tuple[int, int]] = []
    pos = 0
    for s in segments:
        if s.trainable or train_on_prompt:
            spans.append((pos, pos + len(s.text)))
        pos += len(s.text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    span_i = 0
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        # A token belongs to the span that holds its last character (a leading space merged into an answer
        # token still makes the token an answer token).
        last = max(start, end - 1)
        while span_i < len(spans) and spans[span_i][1] <= last:
            span_i += 1
        if span_i < len(spans) and spans[span_i][0] <= last < spans[span_i][1]:
            labels[t] = ids[t]
    return Example(ids, labels, conversation.origin)


def tokenize_conversations(
    conversations: list[Conversation],
    template: Template,
    tokenizer: Any,
    *,
    max_length: int,
    train_on_prompt: bool = False,
    truncation: str = "truncate",
) -> TokenizedData:
    """Encode all conversations; truncate (or drop) long ones and drop those left with nothing to train on."""
    out = TokenizedData([])
    for conv in conversations:
        ex = encode(conv, template, tokenizer, train_on_prompt=train_on_prompt)
        if len(ex.input_ids) > max_length:
            if truncation == "drop":
                out.dropped.setdefault(f"longer than max_length {max_length}", []).append(conv.origin)
                continue
            ex = Example(ex.input_ids[:max_length], ex.labels[:max_length], ex.origin, truncated=True)
        if ex.n_trainable == 0:
            reason = NO_ANSWER_AFTER_TRUNCATION if ex.truncated else NO_ANSWER
            out.dropped.setdefault(reason, []).append(conv.origin)
            continue
        out.n_truncated += ex.truncated  # kept examples whose answer was cut short (dropped ones are in `dropped`)
        out.examples.append(ex)
    return out


# Why an example was dropped. Truncation explains a missing answer (the prompt filled max_length) and is reported;
# an example that has no answer tokens at full length means a broken row or template and stops the run.
NO_ANSWER = "no answer tokens"
NO_ANSWER_AFTER_TRUNCATION = "no answer tokens left after truncation to max_length"


def check_trainable(data: TokenizedData, *, where: str) -> None:
    """Fail loudly if any example had zero trainable tokens for a reason other than truncation."""
    broken = data.dropped.get(NO_ANSWER)
    if broken:
        more = f" ({len(broken) - 1} more examples too)" if len(broken) > 1 else ""
        file, _, line = broken[0].rpartition(":")
        if not line.isdigit():
            file, line = broken[0] or where, ""
        raise LoratuneError(f"this example has no trainable (answer) tokens{more}", file=file,
                            line=int(line) if line else None,
                            hint="give every record a non-empty answer, or check data.fields and data.template "
                                 "(the answer must be rendered as an assistant turn)")


def preflight(data: TokenizedData, tokenizer: Any, *, where: str) -> str:
    """Fail loudly when any example (or everything) has nothing to train on; return one example rendered with its
    masked tokens shown as ⟦prompt⟧ text and answer text, for the user to eyeball before hours of training."""
    check_trainable(data, where=where)
    if not data.examples:
        reasons = "; ".join(f"{len(v)} {k} (first: {v[0]})" for k, v in data.dropped.items()) or "no records"
        raise LoratuneError(f"no training examples left: {reasons}", file=where,
                            hint="check data.fields, data.template and data.max_length")
    ex = data.examples[0]
    return render_mask(ex, tokenizer)


def render_mask(ex: Example, tokenizer: Any) -> str:
    """Masked (prompt) tokens in ⟦brackets⟧, trained tokens as plain text."""
    parts: list[str] = []
    run: list[int] = []
    trained = None
    for tok, lab in zip(ex.input_ids, ex.labels):
        is_trained = lab != IGNORE
        if trained is not None and is_trained != trained:
            parts.append(_piece(tokenizer, run, trained))
            run = []
        run.append(tok)
        trained = is_trained
    if run:
        parts.append(_piece(tokenizer, run, bool(trained)))
    return "".join(parts)


def _piece(tokenizer: Any, ids: list[int], trained: bool) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return text if trained else f"⟦{text}⟧"


# --- length statistics -------------------------------------------------------------------------------------------------
def length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    a = np.asarray(lengths)
    stats = {"count": int(a.size), "min": int(a.min()), "mean": round(float(a.mean()), 1), "max": int(a.max())}
    for p in (50, 90, 95, 99):
        stats[f"p{p}"] = int(np.percentile(a, p, method="higher"))
    return stats


def auto_max_length(lengths: list[int], model_max: int | None = None, multiple: int = 64) -> int:
    """The p99 length rounded up to a multiple of 64, capped at the model's context."""
    p99 = int(np.percentile(np.asarray(lengths), 99, method="higher")) if lengths else multiple
    value = max(multiple, math.ceil(p99 / multiple) * multiple)
    return min(value, model_max) if model_max else value
