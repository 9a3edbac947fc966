"""Regional compilation: torch.compile each decoder layer, not the whole model.

All layers of a model share one compiled graph (torch inlines nn.Modules and treats their weights as inputs), so
the compile cost is paid once, and the graph fuses what eager mode runs as separate kernels: LoRA dropout, scaling
and add, bias + activation, residual adds, rotary embedding, norms. Attention is left to its own kernels
(`torch.compiler.disable`), which also keeps the per-example split of packed rows out of the graph; shapes are
marked dynamic so that every packed length does not trigger a recompilation.
"""

from __future__ import annotations

from typing import Any

import torch


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated blocks of a causal LM (under a peft wrapper or not)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, "model", None)
    layers = getattr(body, "layers", None)
    return list(layers) if layers is not None else []


def compile_layers(model: Any, mode: str = "default") -> int:
    """Compile every decoder layer in place; returns how many were compiled. `mode="reduce-overhead"` replays
    each compiled region as a CUDA graph (recorded once per distinct shape: bucket the packed lengths)."""
    from transformers import AttentionInterface

    # The model's attention function runs eagerly inside the compiled layers (one graph break per layer): flash
    # kernels are fused already, and the per-example split of a packed row would otherwise be traced into guards
    # on the example lengths. Re-registering the disabled function changes nothing outside compiled code.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = getattr(inner.config, "_attn_implementation", None)
    fn = AttentionInterface._global_mapping.get(name) if name else None
    if fn is not None and not getattr(fn, "_torchdynamo_disable", False):
        AttentionInterface.register(name, torch.compiler.disable(fn))
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True, mode=None if mode == "default" else mode)
    return len(layers)
