"""Precision of frozen weights and of the LoRA matmuls.

`prepare_model_for_kbit_training` (peft) upcasts every non-4-bit parameter to fp32: embeddings, LayerNorms, the
biases of the 4-bit linears, and the output head. Nothing of these is trained under LoRA, so the fp32 copies only
cost memory (on Phi-2: 2 x 0.5 GiB for embeddings + head) and make every activation fp32 up to the next 4-bit
matmul. `frozen_to_compute_dtype` puts the frozen ones back in the compute dtype (bf16), as they were loaded.

LoRA weights stay fp32 (they are the master weights AdamW updates). `autocast_context` runs their matmuls in the
compute dtype, the same mixed precision the notebook recipe gets from `Trainer(bf16=True)`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch


def frozen_to_compute_dtype(model: Any, dtype: torch.dtype) -> int:
    """Cast frozen floating-point parameters that are not 4-bit/8-bit storage to `dtype`; returns the
    number of parameters cast. Trainable parameters keep their dtype."""
    if dtype == torch.float32:
        return 0
    cast = 0
    for param in model.parameters():
        quantized_storage = type(param).__name__ in ("Params4bit", "Int8Params")
        if param.requires_grad or quantized_storage or not param.is_floating_point() or param.dtype == dtype:
            continue
        param.data = param.data.to(dtype)
        cast += param.numel()
    return cast


def autocast_context(device_type: str, dtype: torch.dtype | None) -> AbstractContextManager:
    """Autocast to `dtype` on `device_type`; nothing for fp32/None. (`apply_speed` decides where it pays: CUDA when
    asked, the CPU only with `speed.cpu_bf16`, since bf16 is slower than fp32 on CPUs without bf16 instructions.)"""
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type, dtype=dtype)
