"""NF4 dequantization in plain torch ops, so that `torch.compile` can trace (and fuse) it.

bitsandbytes dequantizes through a ctypes call (`dequantize_4bit`): opaque to torch.compile, so every 4-bit LoRA
projection split a compiled decoder layer into pieces (measured on an H100: about eight graphs per Phi-2 layer, each
with its own launch and guard overhead, and the step stayed bound by the CPU). Written as torch ops, Inductor turns
the whole dequantization (nibble unpack, NF4 table lookup, the double-quantized absmax and the scaling) into one
kernel inside the layer's graph. The arithmetic is bitsandbytes' own (`backends/default/ops.py`): fp32 values,
cast to the compute dtype at the end; `tests/test_nf4.py` checks bit-equality with `dequantize_4bit`.

The quantized tensors are attached to the module as non-persistent buffers (the same storage as the Params4bit, no
copy, never saved): compiled code treats buffers of every layer as inputs of one shared graph, where Python objects
or per-weight Python numbers (the double-quantization offset) would be guarded on and recompile the graph per layer.
Only used inside compiled code: in eager mode bitsandbytes' single CUDA kernel is faster than these few ops.
"""

from __future__ import annotations

from typing import Any

import torch

PREFIX = "_loratune_nf4_"
META = "_loratune_nf4_meta"  # (blocksize, shape, absmax blocksize, nested): equal across layers of one kind


def attach(module: torch.nn.Module, weight: Any) -> bool:
    """Register the plain tensors of a bitsandbytes `Params4bit` on `module`; False for anything else."""
    qs = getattr(weight, "quant_state", None)
    if qs is None or qs.quant_type not in ("nf4", "fp4") or getattr(qs, "packing_format_for_cpu", False):
        return False
    shape = tuple(int(s) for s in qs.shape)
    if len(shape) != 2 or (shape[0] * shape[1]) % int(qs.blocksize):
        return False
    packed = weight.data.reshape(-1).as_subclass(torch.Tensor)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    code = qs.code if qs.code is not None else _table(qs.quant_type, packed.device)
    tensors = {"packed": packed, "code": code.float(), "absmax": qs.absmax}
    if qs.nested:
        offset = qs.offset if torch.is_tensor(qs.offset) else torch.tensor(float(qs.offset))
        tensors |= {"absmax_code": qs.state2.code.float(), "absmax_scale": qs.state2.absmax.float(),
                    "absmax_offset": offset.float().reshape(()).to(packed.device)}
    for name, t in tensors.items():
        module.register_buffer(PREFIX + name, t, persistent=False)
    module.__dict__[META] = (int(qs.blocksize), shape, int(qs.state2.blocksize) if qs.nested else 0, bool(qs.nested))
    return True


def attached(module: torch.nn.Module) -> bool:
    return META in module.__dict__


def _table(quant_type: str, device: torch.device) -> torch.Tensor:
    from bitsandbytes.backends.utils import CODE

    return CODE[quant_type].to(device=device, dtype=torch.float32)


def block_scales(absmax: torch.Tensor, absmax_code: torch.Tensor | None = None,
                 absmax_scale: torch.Tensor | None = None, absmax_offset: torch.Tensor | None = None,
                 absmax_blocksize: int = 256) -> torch.Tensor:
    """fp32 absmax per block of values, undoing the double quantization when there is one."""
    if absmax_code is None:
        return absmax.float()
    n = absmax.shape[0]
    groups = -(-n // absmax_blocksize)
    scale = absmax_code[absmax.long()]
    if groups * absmax_blocksize != n:
        scale = torch.cat([scale, scale.new_zeros(groups * absmax_blocksize - n)])
    scale = (scale.view(groups, absmax_blocksize) * absmax_scale.view(groups, 1)).reshape(-1)[:n]
    return scale + absmax_offset


def dequantize(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The attached [out, in] weight in `dtype`: bitsandbytes' `dequantize_4bit` maths (fp32, then cast)."""
    blocksize, shape, absmax_blocksize, nested = module.__dict__[META]
    packed = getattr(module, PREFIX + "packed")
    scales = block_scales(getattr(module, PREFIX + "absmax"), getattr(module, PREFIX + "absmax_code", None),
                          getattr(module, PREFIX + "absmax_scale", None),
                          getattr(module, PREFIX + "absmax_offset", None), absmax_blocksize) if nested else \
        getattr(module, PREFIX + "absmax").float()
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)
    values = getattr(module, PREFIX + "code")[codes.long()].view(-1, blocksize) * scales.view(-1, 1)
    return values.view(shape).to(dtype)
