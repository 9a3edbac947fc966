"""Raw rows -> Conversation, for every `data.source`.

Generic files (JSONL, JSON, CSV, Parquet) map fields to roles: `messages` (OpenAI chat format),
instruction/input/output (Alpaca), question/answer, input/output, prompt/completion, or plain `text`. The
mapping is detected from the first record unless `data.fields` names it. Every record keeps its origin
(`file:line`) so that a bad row, or a row that later turns out to have nothing to train on, is named exactly.

Split/slice syntax is the one Hugging Face datasets uses (`train[5000:10000]`, `train[:10%]`) and works on local
files too. OASST1 trees and WebGLM records have their own loaders in `oasst1.py` and `webglm.py`.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratune.config import DataConfig, FieldMap
from loratune.data.conversation import Conversation, Message
from loratune.errors import LoratuneError

# A single record larger than this is refused before parsing: it is almost always a broken export (a whole
# file on one line), and tokenizing it would stall for minutes.
MAX_RECORD_BYTES = 4 * 1024 * 1024

Row = tuple[str, dict[str, Any]]  # (origin "file:line", record)


# --- split and slice -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    name: str
    start: str | None = None
    stop: str | None = None

    @property
    def sliced(self) -> bool:
        return self.start is not None or self.stop is not None


_SPLIT_RE = re.compile(r"^\s*([\w.-]+)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*$")


def parse_split(text: str) -> Split:
    m = _SPLIT_RE.match(text)
    if not m:
        raise LoratuneError(f'bad split "{text}"', key="data.split", hint="use NAME or NAME[start:stop], e.g. train[:1000]")
    return Split(m.group(1), m.group(2), m.group(3))


def apply_slice(rows: list[Any], split: Split, *, what: str) -> list[Any]:
    """Slice like datasets does: absolute indices or percentages; out-of-range bounds are an error."""
    n = len(rows)

    def bound(text: str | None, default: int) -> int:
        if text is None:
            return default
        if text.endswith("%"):
            pct = int(text[:-1])
            if not -100 <= pct <= 100:
                raise LoratuneError(f"slice {text} is not a percentage between -100% and 100%", key="data.split")
            return round(n * pct / 100) if pct >= 0 else n + round(n * pct / 100)
        value = int(text)
        if value > n or value < -n:
            raise LoratuneError(
                f"slice [{split.start or ''}:{split.stop or ''}] is beyond the end of {what} ({n} records)",
                key="data.split",
                hint=f"use a bound between -{n} and {n}",
            )
        return value if value >= 0 else n + value

    start, stop = bound(split.start, 0), bound(split.stop, n)
    return rows[start:stop]


# --- reading records with their line numbers -------------------------------------------------------------------------
def _decode(raw: bytes, file: Path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LoratuneError(f"not UTF-8 (byte {e.start} of the line)", file=file, line=line,
                            hint="re-save the file as UTF-8") from None


def read_jsonl(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if len(raw) > MAX_RECORD_BYTES:
                raise LoratuneError(f"record is {len(raw) / 2**20:.1f} MB, larger than the "
                                    f"{MAX_RECORD_BYTES // 2**20} MB limit", file=path, line=lineno,
                                    hint="split it into several records or drop it")
            text = _decode(raw, path, lineno).strip()
            if not text:
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise LoratuneError(f"not valid JSON: {e.msg} at column {e.colno}", file=path, line=lineno,
                                    hint="each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise LoratuneError(f"expected a JSON object, got {type(record).__name__}", file=path, line=lineno)
            yield f"{path}:{lineno}", record


def read_json(path: Path) -> Iterator[Row]:
    raw = path.read_bytes()
    text = _decode(raw, path, 1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LoratuneError(f"not valid JSON: {e.msg}", file=path, line=e.lineno, hint="fix the JSON syntax") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise LoratuneError("expected a JSON array of records", file=path, line=1)
        data = lists[0]
    if not isinstance(data, list):
        raise LoratuneError("expected a JSON array of records", file=path, line=1)
    # Records of a pretty-printed array: find each one's line by scanning top-level object starts.
    starts = _object_start_lines(text)
    for i, record in enumerate(data):
        line = starts[i] if i < len(starts) else None
        if not isinstance(record, dict):
            raise LoratuneError(f"record {i} is {type(record).__name__}, expected an object", file=path, line=line)
        yield (f"{path}:{line}" if line else f"{path}[{i}]"), record


def _object_start_lines(text: str) -> list[int]:
    lines, depth, line, in_str, esc = [], 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            esc = (ch == "\\") and not esc
            if ch == '"' and not esc:
                in_str = False
            continue
        if ch == '"':
            in_str, esc = True, False
        elif ch in "[{":
            if ch == "{" and depth == 1:
                lines.append(line)
            depth += 1
        elif ch in "]}":
            depth -= 1
    return lines


def read_csv(path: Path) -> Iterator[Row]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for record in reader:
                yield f"{path}:{reader.line_num}", dict(record)
    except UnicodeDecodeError as e:
        raise LoratuneError(f"not UTF-8 (byte {e.start})", file=path, hint="re-save the file as UTF-8") from None
    except csv.Error as e:  # e.g. a field over the csv module's size limit, or a NUL byte
        raise LoratuneError(f"not valid CSV: {e}", file=path, line=reader.line_num or None,
                            hint="check the quoting there; records over 128 KB belong in JSONL") from None


def read_parquet(path: Path) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - optional dependency
        raise LoratuneError("reading Parquet needs pyarrow", file=path, hint="pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise LoratuneError(f"cannot read Parquet: {e}", file=path) from None
    for i, record in enumerate(table.to_pylist()):
        yield f"{path}[row {i}]", record


READERS: dict[str, Callable[[Path], Iterator[Row]]] = {
    "jsonl": read_jsonl,
    "json": read_json,
    "csv": read_csv,
    "parquet": read_parquet,
}
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_rows(path: Path, kind: str) -> list[Row]:
    if not path.exists():
        raise LoratuneError("data file not found", file=path, key="data.path", hint="check the path")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in EXTENSIONS)
        if not files:
            raise LoratuneError("folder has no .jsonl/.json/.csv/.parquet files", file=path, key="data.path")
        return [row for p in files for row in READERS[EXTENSIONS[p.suffix]](p)]
    return list(READERS[kind](path))


# --- records -> conversations ----------------------------------------------------------------------------------------
# Field layouts tried in order when data.fields is not given: (instruction, input, output, messages, text).
_LAYOUTS: list[dict[str, str]] = [
    {"messages": "messages"},
    {"messages": "conversations"},
    {"instruction": "instruction", "input": "input", "output": "output"},
    {"input": "question", "output": "answer"},
    {"input": "prompt", "output": "completion"},
    {"input": "prompt", "output": "response"},
    {"input": "input", "output": "output"},
    {"input": "query", "output": "response"},
    {"text": "text"},
]


def detect_fields(record: dict[str, Any], origin: str) -> FieldMap:
    for layout in _LAYOUTS:
        needed = [v for k, v in layout.items() if k != "input" or "instruction" not in layout]
        if all(name in record for name in needed):
            return FieldMap(**layout)
    file, _, line = origin.rpartition(":")
    raise LoratuneError(
        f"cannot tell which fields hold the prompt and answer (fields: {', '.join(sorted(record)) or 'none'})",
        file=file or origin,
        line=int(line) if line.isdigit() else None,
        hint="set data.fields, e.g. {input: question, output: answer}",
    )


_ROLE_NAMES = {"user": "user", "human": "user", "prompter": "user", "assistant": "assistant", "gpt": "assistant",
               "bot": "assistant", "model": "assistant", "system": "system"}


def _text(record: dict[str, Any], name: str, origin: str, *, required: bool = True) -> str:
    value = record.get(name)
    if value is None or (isinstance(value, str) and not value.strip() and required):
        if not required:
            return ""
        file, _, line = origin.rpartition(":")
        raise LoratuneError(f'record has no "{name}"', file=file or origin, line=int(line) if line.isdigit() else None,
                            key=name, hint="fill the field or fix data.fields")
    if isinstance(value, list):  # several acceptable answers: train on the first
        value = value[0] if value else ""
    return str(value)


def record_to_conversation(record: dict[str, Any], fields: FieldMap, origin: str) -> Conversation:
    """One generic record -> Conversation, naming the file and line of any missing field."""
    system = _text(record, fields.system, origin, required=False) if fields.system else ""
    messages: list[Message] = [Message("system", system)] if system else []
    if fields.messages:
        turns = record.get(fields.messages)
        if not isinstance(turns, list) or not turns:
            file, _, line = origin.rpartition(":")
            raise LoratuneError(f'"{fields.messages}" must be a non-empty list of {{role, content}}',
                                file=file, line=int(line) if line.isdigit() else None, key=fields.messages)
        for turn in turns:
            role = _ROLE_NAMES.get(str(turn.get("role", turn.get("from", ""))).lower())
            content = turn.get("content", turn.get("value"))
            if role is None or content is None:
                file, _, line = origin.rpartition(":")
                raise LoratuneError(f"message {turn!r:.60} needs a role (user/assistant/system) and content",
                                    file=file, line=int(line) if line.isdigit() else None, key=fields.messages)
            messages.append(Message(role, str(content)))
        return Conversation(messages, origin)
    if fields.text:
        return Conversation([Message("assistant", _text(record, fields.text, origin))], origin)
    if fields.instruction:
        prompt = _text(record, fields.instruction, origin)
        extra = _text(record, fields.input, origin, required=False) if fields.input else ""
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
    else:
        prompt = _text(record, fields.input or "input", origin)
    answer_field = fields.output or "output"
    answer = _text(record, answer_field, origin)
    refs = record.get(answer_field)
    references = [str(r) for r in refs] if isinstance(refs, list) else []
    return Conversation([*messages, Message("user", prompt), Message("assistant", answer)], origin, references)


def generic_conversations(rows: list[Row], fields: FieldMap) -> list[Conversation]:
    if not rows:
        return []
    if not any((fields.messages, fields.text, fields.instruction, fields.input, fields.output)):
        fields = detect_fields(rows[0][1], rows[0][0])
    return [record_to_conversation(record, fields, origin) for origin, record in rows]


# --- the entry point -------------------------------------------------------------------------------------------------
def source_kind(cfg: DataConfig, path: str) -> str:
    if cfg.source != "auto":
        return cfg.source
    suffix = Path(path).suffix.lower()
    if suffix in EXTENSIONS:
        return EXTENSIONS[suffix]
    if Path(path).is_dir():
        return "jsonl"
    if not Path(path).exists() and "/" in path and not path.startswith((".", "/")):
        return "hf"
    raise LoratuneError(f'cannot tell the format of "{path}"', key="data.source",
                        hint="set data.source: jsonl, json, csv, parquet, oasst1, webglm or hf")


def load_conversations(cfg: DataConfig, path: str, split_text: str,
                       dropped: dict[str, list[str]] | None = None) -> list[Conversation]:
    """Load one split of one source as conversations (slice applied). Records a loader skips on purpose
    (deleted OASST1 messages, orphaned subtrees, bad citations) are counted in `dropped` (reason -> origins)."""
    kind = source_kind(cfg, path)
    split = parse_split(split_text)
    if kind == "hf":
        from loratune.data.hub import hub_conversations

        return hub_conversations(cfg, path, split, dropped)
    if kind == "oasst1":
        from loratune.data.oasst1 import oasst1_conversations

        return apply_slice(oasst1_conversations(Path(path), cfg.oasst1, dropped), split, what=path)
    if kind == "webglm":
        from loratune.data.webglm import webglm_conversations

        return apply_slice(webglm_conversations(Path(path), dropped), split, what=path)
    file_kind = EXTENSIONS.get(Path(path).suffix.lower(), kind if kind in READERS else "jsonl")
    rows = read_rows(Path(path), file_kind)
    from loratune.data.oasst1 import is_oasst1_record

    if rows and is_oasst1_record(rows[0][1]) and not _has_field_map(cfg.fields):
        # OASST1 rows are messages, not examples: build the trees from all rows, then slice the conversations.
        from loratune.data.oasst1 import oasst1_from_rows

        return apply_slice(oasst1_from_rows(rows, cfg.oasst1, dropped), split, what=path)
    return route_rows(cfg, apply_slice(rows, split, what=path), dropped)


def _has_field_map(fields: FieldMap) -> bool:
    return any(v is not None for v in fields.model_dump().values())


def route_rows(cfg: DataConfig, rows: list[Row], dropped: dict[str, list[str]] | None = None) -> list[Conversation]:
    """Records -> conversations with the converter their columns call for (by the first record): OASST1 message
    rows or trees, WebGLM records, or the generic field map. An explicit `data.fields` always means generic."""
    from loratune.data.oasst1 import is_oasst1_record, oasst1_from_rows
    from loratune.data.webglm import is_webglm_record, webglm_from_rows

    if not rows:
        return []
    first = rows[0][1]
    if not _has_field_map(cfg.fields):
        if is_oasst1_record(first):
            return oasst1_from_rows(rows, cfg.oasst1, dropped)
        if is_webglm_record(first):
            return webglm_from_rows(rows, dropped)
    return generic_conversations(rows, cfg.fields)
