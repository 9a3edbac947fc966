"""Fused LoRA linear: base (4-bit or plain) matmul + dropout + LoRA in one autograd node.

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` through about a dozen Python modules and autograd
nodes per projection (peft Linear4bit -> bnb Linear4bit -> MatMul4Bit, two nn.Linear, nn.Dropout, casts, a clone
and adds). On a GPU at QLoRA sizes the step is bound by that CPU-side dispatch, not by the GPU (measured on an
H100, Phi-2, 2,300 tokens per step: 0.29 s of GPU work under 0.8 s of CPU launch overhead). Here each projection
is one `torch.autograd.Function` with the minimum of kernels:

    forward   W = dequant(W4)                 (bitsandbytes' kernel; skipped for a plain weight)
              y = x W^T + b                    one addmm
              h = dropout(x) A^T               native dropout (boolean mask), one mm
              y += scaling * h B^T             one addmm (in place)
    backward  dx = dy W + scaling * ((dy B) A) * mask
              dA = scaling * (dy B)^T dropout(x),  dB = scaling * dy^T h

LoRA matmuls run in the compute dtype against fp32 master weights (cast per call; the cast of an r x d matrix
is tiny), and A/B gradients are returned in fp32. The dequantized weight is never kept: backward dequantizes
again, as bitsandbytes does. The maths is peft's; `tests/test_speed_equivalence.py` compares gradients.

Inside `torch.compile` (speed.compile) the same maths is written as plain torch ops instead (`_traced_lora`): the
4-bit weight is dequantized by `speed.nf4` (bitsandbytes' ctypes call would split the compiled layer), and
AOTAutograd derives the backward, so the whole decoder layer is one forward and one backward graph whose
elementwise work (dequantization, dropout, scaling, the LoRA add) Inductor fuses.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

from loratune.speed import nf4
from loratune.speed.dropout import RATES, SALT, SEED, hashed_dropout


def _dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight.to(dtype)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, quant_state).to(dtype)


class _FusedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropout_p: float) -> torch.Tensor:
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        w = _dequantize(weight, dtype)
        out = F.linear(x2, w, None if bias is None else bias.to(dtype))
        del w
        mask = None
        xd = x2
        if dropout_p > 0:
            # nn.Dropout's own kernel: one launch for the output and a boolean keep-mask (1 byte per value).
            xd, mask = torch.native_dropout(x2, dropout_p, True)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        h = xd @ a.t()
        out.addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(weight, xd, h, mask, lora_a, lora_b)
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight, xd, h, mask, lora_a, lora_b = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        dtype = dy.dtype
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        g = (dy @ b).mul_(ctx.scaling)  # [tokens, r]
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = _dequantize(weight, dtype)
            grad_x = dy @ w
            del w
            lora_dx = g @ a
            if mask is not None:
                lora_dx = torch.ops.aten.native_dropout_backward(lora_dx, mask, 1.0 / (1.0 - ctx.dropout_p))
            grad_x.add_(lora_dx)
            grad_x = grad_x.view(ctx.x_shape)
        grad_a = (g.t() @ xd).to(lora_a.dtype) if ctx.needs_input_grad[3] else None
        grad_b = (dy.t() @ h).mul_(ctx.scaling).to(lora_b.dtype) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_a, grad_b, None, None


def _traced_lora(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scaling: float, dropout_p: float,
                 hashed: tuple[int, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The fused node's forward as traceable ops (for compiled code; autograd derives the backward). With
    `hashed` = (drop ppm, seed, salt) the input dropout is speed.dropout's counter-based one (recomputed exactly,
    nothing stored)."""
    dtype = x.dtype
    out = F.linear(x, w, None if bias is None else bias.to(dtype))
    if hashed is not None:
        xd = hashed_dropout(x, *hashed) if hashed[0] else x
    else:
        xd = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
    return out + F.linear(F.linear(xd, lora_a.to(dtype)), lora_b.to(dtype)) * scaling


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Replacement forward for a peft LoRA linear with one plain adapter; anything else takes peft's own path."""
    adapters = self.active_adapters
    # Evaluation and generation keep peft's path: bitsandbytes has 4-bit inference kernels (gemv for one token)
    # that beat dequantize + matmul there, and no backward is needed.
    if (not self.training or self.disable_adapters or self.merged or args or kwargs or len(adapters) != 1
            or adapters[0] not in self.lora_A or torch.is_autocast_enabled(x.device.type)):
        return self._loratune_peft_forward(x, *args, **kwargs)
    base = self.base_layer
    if getattr(getattr(base.weight, "quant_state", None), "packing_format_for_cpu", False):
        # bitsandbytes repacked this weight for its CPU kernel (after a forward through it): not the layout its
        # dequantize_4bit reads. Its own path stays correct.
        return self._loratune_peft_forward(x, *args, **kwargs)
    name = adapters[0]
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0
    compute = getattr(base, "compute_dtype", None) or x.dtype
    # Compiled code takes the traced maths, unless a 4-bit weight has no torch-op reader (then the fused node).
    if torch.compiler.is_compiling() and (nf4.attached(base) or getattr(base.weight, "quant_state", None) is None):
        w = nf4.dequantize(base, compute) if nf4.attached(base) else base.weight.to(compute)
        rates = self.__dict__.get(RATES)
        hashed = (rates[name], getattr(self, SEED), getattr(self, SALT)) if rates and name in rates else None
        out = _traced_lora(x.to(compute), w, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                           float(self.scaling[name]), float(p), hashed)
        return out.to(x.dtype)
    out = _FusedLoraLinear.apply(x.to(compute), base.weight, base.bias, self.lora_A[name].weight,
                                 self.lora_B[name].weight, float(self.scaling[name]), float(p))
    return out.to(x.dtype)


def _eligible(module: Any) -> bool:
    """peft LoRA over a 4-bit bitsandbytes linear or a plain nn.Linear; vanilla LoRA only (no DoRA/variants)."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer) or getattr(module, "lora_variant", {}):
        return False
    base = getattr(module, "base_layer", None)
    is_4bit = type(base).__name__ == "Linear4bit" and getattr(base.weight, "quant_state", None) is not None
    is_plain = type(base) is torch.nn.Linear
    if not (is_4bit or is_plain) or any(p.requires_grad for p in base.parameters()):
        return False  # the fused node returns no gradient for the base weight or bias
    return all(type(d) in (torch.nn.Dropout, torch.nn.Identity) for d in module.lora_dropout.values())


def fuse_lora_linears(model: Any) -> int:
    """Swap the forward of every eligible peft LoRA linear for the fused one; returns how many were swapped."""
    count = 0
    for module in model.modules():
        if _eligible(module) and not hasattr(module, "_loratune_peft_forward"):
            module._loratune_peft_forward = module.forward
            nf4.attach(module.base_layer, module.base_layer.weight)  # what compiled code reads (speed.nf4)
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
