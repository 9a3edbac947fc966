"""Merge a run's adapter into its base, loaded in full precision, and write a plain transformers model folder.

Merging into a 4-bit base (what several peers do when the run trained in 4-bit) dequantizes, adds the LoRA delta
and re-quantizes, so the merged model carries the quantization error twice and no longer matches what was
trained. We always load the base in fp32 (whatever the run's `quantization` says), merge there, and only then cast
to the requested dtype.

The output folder is self-contained: safetensors weights, tokenizer with a chat template that renders exactly like
the run's template, a generation config whose stop ids come from that template, and `template.json` so loratune's
generate/eval/serve reuse the training format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from loratune.config import QuantizationConfig, load_config
from loratune.data.templates import Template
from loratune.errors import LoratuneError
from loratune.runs import atomic_path, find_run_dir

MERGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _jinja_literal(text: str) -> str:
    # Jinja unescapes string literals like Python (\n, \uXXXX), so a JSON string is a safe literal for any text.
    return "{{ " + json.dumps(text) + " }}"


def template_jinja(template: Template, tokenizer: Any) -> str:
    """A Jinja chat template that renders like `template` (named templates have no Jinja of their own), so plain
    `tokenizer.apply_chat_template` on the merged folder produces the prompt the model was trained on."""
    if template.chat_template is not None:
        return template.chat_template
    eos, bos = tokenizer.eos_token or "", tokenizer.bos_token or ""

    def fill(text: str) -> str:
        return text.replace("{eos}", eos).replace("{bos}", bos)

    def around(part: str) -> tuple[str, str]:
        before, _, after = fill(part).partition("{content}")
        return before, after

    sys_pre, sys_post = around(template.system)
    user_pre, user_post = around(template.user)
    header, end, sep = fill(template.assistant_header), fill(template.assistant_end), fill(template.turn_separator)
    out = [_jinja_literal(fill(template.conversation_start))] if template.conversation_start else []
    if template.default_system:
        out.append("{% if messages | selectattr('role', 'equalto', 'system') | list | length == 0 %}"
                   + _jinja_literal(sys_pre + template.default_system + sys_post) + "{% endif %}")
    out.append(
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}" + _jinja_literal(sys_pre) + "{{ message['content'] }}"
        + _jinja_literal(sys_post)
        + "{% elif message['role'] == 'user' %}"
        + ("{% if loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'assistant' %}" + _jinja_literal(sep)
           + "{% endif %}" if sep else "")
        + _jinja_literal(user_pre) + "{{ message['content'] }}" + _jinja_literal(user_post)
        + "{% else %}" + _jinja_literal(header) + "{{ message['content'] }}" + _jinja_literal(end)
        + "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}" + _jinja_literal(header) + "{% endif %}"
    )
    return "".join(out)


def _run_tokenizer(run: Path, adapter_dir: Path, fallback: Any) -> Any:
    """The tokenizer saved beside the adapter (what training used, pad fix included), else the base's."""
    from transformers import AutoTokenizer

    from loratune.models.load import fix_padding

    if not (adapter_dir / "tokenizer_config.json").is_file():
        return fallback
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    fix_padding(tokenizer)
    return tokenizer


def merge_run(run_dir: str | Path, out: str | Path, *, dtype: str = "bf16", overwrite: bool = False,
              log=None) -> Path:
    """Merge `run_dir`'s adapter into its full-precision base and write a model folder at `out` (atomically)."""
    from peft import PeftModel

    from loratune.models.adapters import check_adapter_matches
    from loratune.models.load import load_model

    if dtype not in MERGE_DTYPES:
        raise LoratuneError(f'unknown dtype "{dtype}"', key="--dtype", hint="choose bf16, fp16 or fp32")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LoratuneError("output folder exists and is not empty", file=out,
                            hint="choose another --out, or pass --overwrite")
    run = find_run_dir(run_dir)
    adapter_dir = run / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise LoratuneError("the run has no adapter/ yet (training did not finish)", file=run,
                            hint="finish or resume the run: loratune train --resume " + str(run))
    cfg = load_config(run / "config.yaml")
    template = Template.from_dict(json.loads((run / "template.json").read_text()))
    # fp32 on the CPU, never quantized: the merge must be exact whatever the run trained on.
    model_cfg = cfg.model.model_copy(update={"device": "cpu", "dtype": "fp32"})
    if log:
        log(f"loading {cfg.model.base} in fp32 (the run trained with quantization.bits={cfg.quantization.bits})")
    loaded = load_model(model_cfg, QuantizationConfig(bits="none"), for_training=False)
    check_adapter_matches(adapter_dir, loaded.model)
    peft_model = PeftModel.from_pretrained(loaded.model, str(adapter_dir))
    # safe_merge checks every merged weight for NaN/inf before replacing the original.
    merged = peft_model.merge_and_unload(safe_merge=True)
    merged = merged.to(MERGE_DTYPES[dtype])
    merged.config.use_cache = True
    tokenizer = _run_tokenizer(run, adapter_dir, loaded.tokenizer)
    tokenizer.chat_template = template_jinja(template, tokenizer)
    stop_ids = template.stop_token_ids(tokenizer)
    generation = merged.generation_config
    generation.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    generation.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        generation.bos_token_id = tokenizer.bos_token_id
    with atomic_path(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "template.json").write_text(json.dumps(template.to_dict(), indent=2) + "\n")
        (tmp / "loratune_merge.json").write_text(json.dumps({
            "run": str(run), "base_model": cfg.model.base, "adapter": str(adapter_dir), "dtype": dtype,
            "trained_bits": cfg.quantization.bits, "merged_in": "fp32",
        }, indent=2) + "\n")
    if log:
        log(f"merged model written to {out} ({dtype})")
    return out
