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


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX tiles). Without those instructions bf16 is
    emulated and slower than fp32, so `speed.cpu_bf16` leaves such CPUs in fp32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def autocast_context(device_type: str, dtype: torch.dtype | None) -> AbstractContextManager:
    """Autocast to `dtype` on `device_type`; nothing for fp32/None. (`apply_speed` decides where it pays: CUDA when
    asked, the CPU with `speed.cpu_bf16` where `cpu_has_bf16`.)"""
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type, dtype=dtype)
