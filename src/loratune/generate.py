"""Batched and streaming generation with the run's own template, for base + adapter (no merge) or merged folders.

`load_for_inference` accepts a run folder (base + adapter + the template it was trained with), an adapter
folder, a merged model folder, or a base model reference; the same template object renders the prompt that
training used, so inference can never drift from the training format. Sampling defaults come from a
`generation_config.json` saved beside the run, adapter or model (command-line options override them).

`generate_batch` answers many prompts (left-padded batches); `generate_file` does it for a JSONL file and writes
the answers atomically; `stream_answer` yields text pieces as they are generated (the terminal chat uses it).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria

from loratune.config import ModelConfig, QuantizationConfig, load_config
from loratune.data.conversation import Message
from loratune.data.templates import Template, resolve_template
from loratune.errors import LoratuneError


@dataclass
class SamplingSettings:
    """How to pick tokens. Defaults are greedy; a run's or model's `generation_config.json` can change them."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> SamplingSettings:
        """Refuse values `generate` would reject deep inside (or silently misuse), naming the option."""
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be at least 1"),
            ("temperature", 0.0 <= self.temperature <= 5.0, "must be between 0 (greedy) and 5"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be 0 (off) or positive"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "must be in (0, 10]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise LoratuneError(f"{why}, got {getattr(self, name)}", key=name)
        return self

    def override(self, **values: Any) -> SamplingSettings:
        """A copy with the given values replaced; `None` means "keep the default"."""
        known = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in values.items() if v is not None and k in known})

    @classmethod
    def from_generation_config(cls, data: dict[str, Any]) -> SamplingSettings:
        """Defaults from a `generation_config.json` dict; greedy unless it says `do_sample: true`."""
        sampled = bool(data.get("do_sample"))
        return cls(
            max_new_tokens=int(data.get("max_new_tokens") or cls.max_new_tokens),
            temperature=float(data.get("temperature") or 1.0) if sampled else 0.0,
            top_p=float(data.get("top_p") or 1.0) if sampled else 1.0,
            top_k=int(data.get("top_k") or 0) if sampled else 0,
            repetition_penalty=float(data.get("repetition_penalty") or 1.0),
        )

    def generate_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature and self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
            if self.top_k:
                kw["top_k"] = self.top_k
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw


@dataclass
class InferenceModel:
    """A model ready to answer: weights (base + adapter, or merged), tokenizer, the template it was trained with,
    and the sampling defaults found beside it."""

    model: Any
    tokenizer: Any
    template: Template
    name: str
    device: str
    base: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    defaults: SamplingSettings = field(default_factory=SamplingSettings)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def context_length(self) -> int:
        from loratune.models.load import context_length

        return context_length(self.model) or 2048


def _template_for(folder: Path) -> Template | None:
    for name in ("template.json", "loratune_template.json"):
        path = folder / name
        if path.is_file():
            return Template.from_dict(json.loads(path.read_text()))
    return None


def _generation_defaults(*folders: Path) -> SamplingSettings:
    """The first `generation_config.json` found (run folder, adapter, model folder) gives the defaults."""
    for folder in folders:
        path = folder / "generation_config.json"
        if path.is_file():
            try:
                return SamplingSettings.from_generation_config(json.loads(path.read_text()))
            except (json.JSONDecodeError, TypeError, ValueError) as e:
                raise LoratuneError(f"unreadable generation config: {e}", file=path,
                                    hint="fix or delete the file") from None
    return SamplingSettings()


def load_for_inference(ref: str | Path, *, device: str = "auto", dtype: str = "auto", template: str | None = None,
                       allow_pickle: bool = False, quantization: QuantizationConfig | None = None) -> InferenceModel:
    """A run folder, an adapter folder, a merged folder, or a base model (alias, hub id, folder, .gguf)."""
    from loratune.models.load import load_model

    path = Path(ref)
    adapter_dir: Path | None = None
    saved_template: Template | None = None
    base = str(ref)
    name = path.name if path.exists() else str(ref)
    qcfg = quantization or QuantizationConfig()
    if path.is_dir() and (path / "config.yaml").is_file() and (path / "adapter").is_dir():  # a run folder
        cfg = load_config(path / "config.yaml")
        adapter_dir = path / "adapter"
        saved_template = _template_for(path)
        base = cfg.model.base
        allow_pickle = allow_pickle or cfg.model.allow_pickle
        model_cfg = cfg.model.model_copy(update={"device": device, "dtype": dtype, "allow_pickle": allow_pickle})
    elif path.is_dir() and (path / "adapter_config.json").is_file():  # a bare adapter folder
        adapter_dir = path
        saved_template = _template_for(path)
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        if not base:
            raise LoratuneError("adapter_config.json names no base model", file=path / "adapter_config.json",
                                key="base_model_name_or_path", hint="pass the run folder instead")
        model_cfg = ModelConfig(base=base, device=device, dtype=dtype, allow_pickle=allow_pickle)
    else:
        if path.is_dir():
            saved_template = _template_for(path)
        model_cfg = ModelConfig(base=str(ref), device=device, dtype=dtype, allow_pickle=allow_pickle)
    loaded = load_model(model_cfg, qcfg, for_training=False)
    model = loaded.model
    if adapter_dir is not None:
        from peft import PeftModel

        from loratune.models.adapters import check_adapter_matches

        check_adapter_matches(adapter_dir, model)
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    tokenizer = loaded.tokenizer
    if template is not None or saved_template is None:
        chosen = resolve_template(template or "auto", tokenizer, getattr(model.config, "model_type", None))
    else:
        chosen = saved_template
    folders = [p for p in (path, adapter_dir, Path(loaded.source)) if p is not None and p.is_dir()]
    return InferenceModel(model, tokenizer, chosen, name, loaded.device, base=base,
                          defaults=_generation_defaults(*folders))


def render_prompts(im: InferenceModel, conversations: list[list[Message]]) -> list[str]:
    return [im.template.prompt(messages, im.tokenizer) for messages in conversations]


@torch.no_grad()
def generate_batch(im: InferenceModel, conversations: list[list[Message]], settings: SamplingSettings,
                   *, batch_size: int = 8) -> list[str]:
    """Answers for each conversation (prompt messages), batched with left padding, cut at the template's stop."""
    tokenizer = im.tokenizer
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    prompts = render_prompts(im, conversations)
    stop_ids = im.template.stop_token_ids(tokenizer)
    stop_strings = im.template.stop_strings(tokenizer)
    answers: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        # Left padding, per call: prompts aligned at the right edge for batched generation, and the shared
        # tokenizer is never mutated (another thread may be using it).
        enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(im.device)
        limit = im.context_length - settings.max_new_tokens
        if enc["input_ids"].shape[1] > limit:
            raise LoratuneError(f"prompt is {enc['input_ids'].shape[1]} tokens; with max_new_tokens "
                                f"{settings.max_new_tokens} it exceeds the context of {im.context_length}",
                                key="prompt", hint="shorten the prompt or lower max_new_tokens")
        out = im.model.generate(**enc, **settings.generate_kwargs(), eos_token_id=stop_ids,
                                pad_token_id=tokenizer.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:]:
            answers.append(clean_answer(tokenizer.decode(row, skip_special_tokens=False), tokenizer, stop_strings))
    return answers


def clean_answer(text: str, tokenizer: Any, stop_strings: list[str]) -> str:
    """Cut at the first stop string and drop padding/special tokens."""
    for stop in stop_strings:
        if stop and stop in text:
            text = text[: text.index(stop)]
    for special in (tokenizer.pad_token, tokenizer.eos_token):
        if special:
            text = text.replace(special, "")
    return text.strip()


def stream_answer(im: InferenceModel, messages: list[Message], settings: SamplingSettings) -> Iterator[str]:
    """Yield the answer in pieces as the model writes it (TextIteratorStreamer fed by `generate` in a thread),
    cut at the template's stop string. Raises LoratuneError if the prompt leaves no room for the answer."""
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    tokenizer = im.tokenizer
    prompt = im.template.prompt(messages, tokenizer)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(im.device)
    n_prompt = enc["input_ids"].shape[1]
    if n_prompt + settings.max_new_tokens > im.context_length:
        raise LoratuneError(f"prompt is {n_prompt} tokens; with max_new_tokens {settings.max_new_tokens} it exceeds "
                            f"the context of {im.context_length}", key="prompt",
                            hint="shorten the prompt or lower max_new_tokens")
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=False, timeout=600)
    failure: list[BaseException] = []
    cancel = threading.Event()  # set when the caller stops reading, so the thread does not generate for nobody

    def work() -> None:
        try:
            with torch.no_grad():
                im.model.generate(**enc, **settings.generate_kwargs(), streamer=streamer,
                                  eos_token_id=im.template.stop_token_ids(tokenizer),
                                  pad_token_id=tokenizer.pad_token_id,
                                  stopping_criteria=StoppingCriteriaList([CancelCriteria(cancel)]))
        except BaseException as e:  # surfaced in the caller's thread below; the streamer must still end
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=work, name="loratune-generate", daemon=True)
    thread.start()
    cutter = StopCutter(im.template.stop_strings(tokenizer) + _special_texts(tokenizer))
    try:
        for piece in streamer:
            text = cutter.feed(piece)
            if text:
                yield text
            if cutter.stopped:
                break
        else:
            tail = cutter.flush()
            if tail:
                yield tail
    finally:
        cancel.set()
        if cutter.stopped:  # drain so the generating thread is never blocked on a full queue
            for _ in streamer:
                pass
        thread.join()
    if failure:
        raise failure[0]


class CancelCriteria(StoppingCriteria):
    """A stopping criterion that ends every row once `event` is set (a client went away, a stop string arrived)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _special_texts(tokenizer: Any) -> list[str]:
    return [t for t in (tokenizer.eos_token, tokenizer.pad_token) if t]


class StopCutter:
    """Streams text through, holding back only what could be the start of a stop string, and stops at the first
    complete one (a stop string can arrive split over several tokens)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        cut = min((self.pending.index(s) for s in self.stops if s in self.pending), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        hold = 0
        for stop in self.stops:  # the longest suffix of pending that is a prefix of a stop string
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


# -- prompts files ------------------------------------------------------------------------------------------------------
PROMPT_FIELDS = ("prompt", "question", "instruction", "input")


def read_prompts(path: str | Path, *, system: str | None = None) -> list[tuple[dict[str, Any], list[Message]]]:
    """JSONL rows -> (row, prompt messages). A row has `messages` (OpenAI chat format; a final assistant turn is
    dropped) or one of `prompt`, `question`, `instruction`, `input`; an optional `system` field or `--system`."""
    from loratune.data.sources import _ROLE_NAMES, read_jsonl

    path = Path(path)
    if not path.is_file():
        raise LoratuneError("prompts file not found", file=path, hint="give a JSONL file with one prompt per line")
    out = []
    for origin, record in read_jsonl(path):
        line = int(origin.rpartition(":")[2])
        messages: list[Message] = []
        if isinstance(record.get("messages"), list):
            for turn in record["messages"]:
                role = _ROLE_NAMES.get(str(turn.get("role", "")).lower()) if isinstance(turn, dict) else None
                if role is None or not isinstance(turn.get("content"), str):
                    raise LoratuneError("each message needs a role (system/user/assistant) and a content string",
                                        file=path, line=line, key="messages")
                messages.append(Message(role, turn["content"]))
            if messages and messages[-1].role == "assistant":
                messages.pop()
        else:
            name = next((f for f in PROMPT_FIELDS if isinstance(record.get(f), str)), None)
            if name is None:
                raise LoratuneError(f"row has no prompt (fields: {', '.join(sorted(record)) or 'none'})", file=path,
                                    line=line, hint=f"give one of: messages, {', '.join(PROMPT_FIELDS)}")
            messages.append(Message("user", record[name]))
        if not messages or messages[-1].role != "user":
            raise LoratuneError("the conversation must end with a user message", file=path, line=line, key="messages")
        row_system = record.get("system") if isinstance(record.get("system"), str) else system
        if row_system and messages[0].role != "system":
            messages.insert(0, Message("system", row_system))
        out.append((record, messages))
    if not out:
        raise LoratuneError("prompts file is empty", file=path)
    return out


def generate_file(im: InferenceModel, input_path: str | Path, output_path: str | Path, settings: SamplingSettings,
                  *, system: str | None = None, batch_size: int = 8) -> int:
    """Answer every row of a JSONL prompts file; write each row plus `answer` to `output_path` in one atomic
    step (a crash leaves no half-written file). Returns the number of rows answered."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from loratune.runs import write_text_atomic

    rows = read_prompts(input_path, system=system)
    answers: list[str] = []
    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("generate", total=len(rows))
        for i in range(0, len(rows), batch_size):
            chunk = [messages for _, messages in rows[i : i + batch_size]]
            answers.extend(generate_batch(im, chunk, settings, batch_size=batch_size))
            progress.advance(task, len(chunk))
    lines = [json.dumps({**record, "answer": answer}, ensure_ascii=False) + "\n"
             for (record, _), answer in zip(rows, answers)]
    write_text_atomic(output_path, "".join(lines))
    return len(rows)
