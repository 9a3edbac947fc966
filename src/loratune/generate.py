"""Batched generation with the run's own template, for base + adapter (no merge needed) or merged folders.

`load_for_inference` accepts a run folder (base + adapter + the template it was trained with), an adapter
folder, a merged model folder, or a base model reference; the same template object renders the prompt that
training used, so inference can never drift from the training format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loratune.config import ModelConfig, QuantizationConfig, load_config
from loratune.data.conversation import Message
from loratune.data.templates import Template, resolve_template
from loratune.errors import LoratuneError


@dataclass
class SamplingSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

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
    model: Any
    tokenizer: Any
    template: Template
    name: str
    device: str
    base: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

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
    return InferenceModel(model, tokenizer, chosen, name, loaded.device, base=base)


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
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # batched generation needs prompts aligned at the right edge
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(im.device)
            limit = im.context_length - settings.max_new_tokens
            if enc["input_ids"].shape[1] > limit:
                raise LoratuneError(f"prompt is {enc['input_ids'].shape[1]} tokens; with max_new_tokens "
                                    f"{settings.max_new_tokens} it exceeds the context of {im.context_length}",
                                    key="prompt", hint="shorten the prompt or lower max_new_tokens")
            out = im.model.generate(**enc, **settings.generate_kwargs(), eos_token_id=stop_ids,
                                    pad_token_id=tokenizer.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1]:]:
                answers.append(clean_answer(tokenizer.decode(row, skip_special_tokens=False), tokenizer, stop_strings))
    finally:
        tokenizer.padding_side = old_side
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
