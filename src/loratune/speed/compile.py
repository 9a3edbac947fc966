"""Regional compilation: torch.compile each decoder layer, not the whole model.

All layers of a model share one compiled graph (torch inlines nn.Modules and treats their weights and buffers as
inputs), so the compile cost is paid once, and the graph fuses what eager mode runs as separate kernels: NF4
dequantization, LoRA dropout, scaling and add, bias + activation, residual adds, rotary embedding, norms. With the
packed-row attention (speed.attention) and the traced LoRA path (speed.lora, speed.nf4) a layer is one forward and
one backward graph with no break; shapes are dynamic, so every packed length reuses it.

Activation recomputation moves inside the compiled region: transformers checkpoints around the layer call, so the
compiled forward ran twice per step (forward, then again in backward) and computed the activations it saves both
times. Here the layer's own `forward` is `checkpoint(forward)` and is traced as such: the forward graph keeps only
the layer's inputs, the backward graph recomputes what it needs and fuses that work with the gradient kernels, and
dropout inside is replayed exactly (AOTAutograd stashes the RNG state of recomputed random ops).
"""

from __future__ import annotations

import types
from functools import partial
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated blocks of a causal LM (under a peft wrapper or not)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, "model", None)
    layers = getattr(body, "layers", None)
    return list(layers) if layers is not None else []


def _recompute_everything(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_RECOMPUTE


# Every op of the layer is recomputed, none saved. Without this policy the partitioner chose to keep the
# counter-based dropout's outputs (bf16, one per dropout site and layer): 7.3 GiB peak instead of 3.4 on Phi-2.
_RECOMPUTE_ALL = partial(create_selective_checkpoint_contexts, _recompute_everything)


def _recomputed_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The layer's forward under activation checkpointing when training (traced by torch.compile as one region)."""
    forward = type(self).forward  # with `gradient_checkpointing` off, transformers' wrapper is a plain call
    if self.training and torch.is_grad_enabled():
        kwargs = {**kwargs, "use_cache": False, "past_key_values": None}
        return checkpoint(partial(forward, self, **kwargs), *args, use_reentrant=False, context_fn=_RECOMPUTE_ALL)
    return forward(self, *args, **kwargs)


def checkpointed(layers: list[torch.nn.Module]) -> bool:
    """Whether transformers' per-layer gradient checkpointing is on (before `recompute_inside` takes it over)."""
    return any(getattr(layer, "gradient_checkpointing", False) for layer in layers)


def recompute_inside(layers: list[torch.nn.Module]) -> bool:
    """Take transformers' per-layer checkpointing over into the layer's forward; False if it was off."""
    if not checkpointed(layers):
        return False
    for layer in layers:
        layer.gradient_checkpointing = False
        layer.forward = types.MethodType(_recomputed_forward, layer)
    return True


# A concatenation is written as one kernel per input, each into its slice of the output, never as one "pointwise
# cat" kernel that selects its source per element. Inductor's default fused the NF4 dequantization of the weight
# that speed.lora's folded projection concatenates with its LoRA B ([W | s B]) into such a kernel: with masked loads
# from every source for every element it ran 2x slower than the dequantization alone (H100, Phi-2: 103 us instead
# of 53 per fc1 call), and 8x for a five-input concatenation (bench/NOTES.md entry 26).
INDUCTOR_OPTIONS = {"max_pointwise_cat_inputs": 1, "max_complex_pointwise_cat_inputs": 1}


def compile_layers(model: Any, backend: str = "inductor") -> int:
    """Compile every decoder layer in place; returns how many were compiled. (CUDA graphs are recorded around
    the whole micro-batch by speed.graphs, not per layer: torch's cudagraph trees crashed on these layers.)"""
    from transformers import AttentionInterface

    from loratune.speed import attention

    # The packed-row attention (speed.attention) is traced into the layer's graph: it reads the example
    # boundaries from the keyword arguments the loss passes (`segment_kwargs`), so the graph has no host sync and
    # one graph serves every packed length. Any other attention function runs eagerly between two graphs (one
    # break per layer): tracing transformers' mask handling would guard on the lengths. Re-registering the disabled
    # function changes nothing outside compiled code.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = getattr(inner.config, "_attn_implementation", None)
    fn = AttentionInterface._global_mapping.get(name) if name else None
    if fn is not None and name != attention.NAME and not getattr(fn, "_torchdynamo_disable", False):
        AttentionInterface.register(name, torch.compiler.disable(fn))
    layers = decoder_layers(model)
    recompute_inside(layers)
    options = None
    if backend == "inductor":  # (torch 2.11 knows only the first of the two settings)
        import torch._inductor.config as inductor_config

        options = {k: v for k, v in INDUCTOR_OPTIONS.items() if hasattr(inductor_config, k)}
    for layer in layers:
        layer.compile(dynamic=True, backend=backend, options=options)
    return len(layers)
