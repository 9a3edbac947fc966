"""LoRA/DoRA adapters: the right target modules per architecture, and wrapping a base model with peft.

`target_modules: auto` knows each family's projections (Phi-2's `q_proj, k_proj, v_proj, dense, fc1, fc2`: a
peer default of `q_proj, v_proj` or Llama names silently trains almost nothing on Phi-2) and falls back to every
linear layer except the output head.
"""

from __future__ import annotations

from typing import Any

import torch

from loratune.config import LoraConfig
from loratune.errors import LoratuneError

# model_type -> projections a LoRA should adapt (attention and MLP).
TARGETS: dict[str, list[str]] = {
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt_bigcode": ["c_attn", "c_proj", "c_fc"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
for _name in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
              "granite", "stablelm", "smollm3", "cohere", "starcoder2_no"):
    TARGETS[_name] = _LLAMA_LIKE

_HEAD_NAMES = ("lm_head", "embed_out", "output", "score")


def linear_module_names(model: Any) -> dict[str, tuple[int, int]]:
    """Leaf names of linear layers (excluding the output head) -> (in_features, out_features) of the first one."""
    from transformers.pytorch_utils import Conv1D

    names: dict[str, tuple[int, int]] = {}
    for full, module in model.named_modules():
        leaf = full.rsplit(".", 1)[-1]
        if leaf in _HEAD_NAMES:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.setdefault(leaf, (module.in_features, module.out_features))
        elif isinstance(module, Conv1D):
            names.setdefault(leaf, (module.weight.shape[0], module.weight.shape[1]))
    return names


def resolve_targets(model: Any, cfg: LoraConfig) -> list[str]:
    available = linear_module_names(model)
    if cfg.target_modules == "all-linear":
        return sorted(available)
    if cfg.target_modules == "auto":
        model_type = getattr(model.config, "model_type", "")
        wanted = TARGETS.get(model_type)
        if wanted and all(name in available for name in wanted):
            return list(wanted)
        return sorted(available)
    missing = [name for name in cfg.target_modules if name not in available]
    if missing:
        raise LoratuneError(f"target module(s) {', '.join(missing)} not in this model", key="lora.target_modules",
                            hint=f"linear layers here: {', '.join(sorted(available))}")
    return list(cfg.target_modules)


def peft_config(model: Any, cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from transformers.pytorch_utils import Conv1D

    targets = resolve_targets(model, cfg)
    # GPT-2's Conv1D stores weights as [in, out]; peft must know, or it warns and flips the flag itself.
    fan_in_fan_out = any(isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in targets for n, m in model.named_modules())
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, fan_in_fan_out=fan_in_fan_out,
                          target_modules=targets, use_dora=cfg.use_dora,
                          use_rslora=cfg.use_rslora, modules_to_save=cfg.modules_to_save or None, bias=cfg.bias,
                          task_type="CAUSAL_LM")


def add_lora(model: Any, cfg: LoraConfig, *, quantized: bool, gradient_checkpointing: bool) -> Any:
    """Prepare (k-bit) and wrap the base with a fresh LoRA adapter; only adapter weights stay trainable."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    return get_peft_model(model, peft_config(model, cfg))


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as their logical size.

    A packed Params4bit holds 2 weights per byte of storage, so its numel depends on the storage dtype
    (`bnb_4bit_quant_storage`: x2 for uint8, x4 for bf16, x8 for fp32); its quant_state knows the real shape.
    """
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        quant_state = getattr(p, "quant_state", None)
        if p.__class__.__name__ == "Params4bit" and quant_state is not None:
            n = quant_state.shape.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
