"""THUDM WebGLM-QA -> conversations.

Two record shapes, detected per record:
- WebGLM-QA: `{"question": str, "answer": str, "references": [str, ...]}`. The answer cites the references as
  `[1]`, `[2][5]` (1-based). The prompt lists the references numbered the same way, so the citations the model
  learns to write point at text it was shown; the answer is kept verbatim, citations included.
- WebGLM's evaluation files (NQ-open, WebQuestions): `{"question": str, "answer": [str, ...]}`, several acceptable
  answers. The first is the training target; all of them go to `Conversation.references` for evaluation.

A QA answer that cites a reference number the record does not have is dropped and reported: training on it
would teach the model to cite sources that do not exist.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from loratune.data.conversation import Conversation, Message
from loratune.data.sources import Row, read_jsonl
from loratune.errors import LoratuneError

INSTRUCTION = ("Answer the question using the references below. Cite the references you use with their "
               "numbers in square brackets, like [1].")
_CITATION = re.compile(r"\[(\d+)\]")


def is_webglm_record(record: dict[str, Any]) -> bool:
    """WebGLM-QA (with references) or a WebGLM evaluation record (answer is a list)."""
    return "question" in record and (isinstance(record.get("references"), list) or isinstance(record.get("answer"), list))


def webglm_prompt(question: str, references: list[str]) -> str:
    """The user turn: instruction, numbered references, question. Used for training and inference alike."""
    numbered = "\n".join(f"[{i}] {ref.strip()}" for i, ref in enumerate(references, start=1))
    return f"{INSTRUCTION}\n\nReferences:\n{numbered}\n\nQuestion: {question.strip()}"


def webglm_conversations(path: Path, dropped: dict[str, list[str]] | None = None) -> list[Conversation]:
    if not path.is_file():
        raise LoratuneError("WebGLM file not found", file=path, key="data.path", hint="check the path")
    return webglm_from_rows(list(read_jsonl(path)), dropped)


def webglm_from_rows(rows: list[Row], dropped: dict[str, list[str]] | None = None) -> list[Conversation]:
    dropped = dropped if dropped is not None else {}
    out = []
    for origin, record in rows:
        conversation = _record(record, origin, dropped)
        if conversation is not None:
            out.append(conversation)
    return out


def _fail(message: str, origin: str, key: str, hint: str) -> LoratuneError:
    file, _, line = origin.rpartition(":")
    return LoratuneError(message, file=file or origin, line=int(line) if line.isdigit() else None, key=key, hint=hint)


def _record(record: dict[str, Any], origin: str, dropped: dict[str, list[str]]) -> Conversation | None:
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise _fail('record has no "question" text', origin, "question",
                    'WebGLM records need "question" and "answer" (and "references" for WebGLM-QA)')
    answer = record.get("answer")
    if isinstance(answer, list):  # an evaluation record: several acceptable short answers
        answers = [str(a) for a in answer if str(a).strip()]
        if not answers:
            raise _fail('"answer" is an empty list', origin, "answer", "give at least one acceptable answer")
        return Conversation([Message("user", question.strip()), Message("assistant", answers[0])], origin, answers)
    if not isinstance(answer, str) or not answer.strip():
        raise _fail('record has no "answer" text', origin, "answer", "fill the answer or drop the record")
    references = record.get("references")
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise _fail('"references" must be a list of strings', origin, "references",
                    "WebGLM-QA records carry the retrieved passages the answer cites")
    cited = {int(n) for n in _CITATION.findall(answer)}
    if any(n < 1 or n > len(references) for n in cited):
        dropped.setdefault("answer cites a reference number the record does not have", []).append(origin)
        return None
    return Conversation([Message("user", webglm_prompt(question, references)), Message("assistant", answer)], origin)
