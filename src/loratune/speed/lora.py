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
elementwise work (dequantization, dropout, scaling) Inductor fuses. There, with `speed.folded_lora`, B runs inside the
base matmul (`Folded`: [x | h] @ [W | s B]^T), which keeps fewer [tokens x out] buffers alive in the backward.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

from loratune.speed import nf4
from loratune.speed.dropout import RATES, SALT, SEED, hashed_dropout

FOLD = "_loratune_fold"  # on a fused projection: compiled code folds its LoRA B into the base matmul (speed.folded_lora)


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


class Folded(torch.autograd.Function):
    """[x | h] @ [w | b]^T + bias as one matmul, `w` and `bias` frozen: the LoRA product h B^T is never written
    out and added, and the backward returns dx and dh from one matmul over dy, plus db = dy^T h. Writing the same
    with plain ops would make autograd compute the [out x in] gradient of the frozen w as well.

    Why (H100, Llama ~1B, 4,096 tokens): with the LoRA product separate, Inductor fuses the add into its consumers,
    so the backward of one MLP held the base and LoRA outputs of gate and up, and the base and LoRA input
    gradients of down, side by side: 12 [tokens x intermediate] buffers at the peak. Folded (and with the scaling on
    B), the peak falls by 0.21 GiB on Llama ~1B and 0.15 GiB on Phi-2 (bench/NOTES.md entry 25)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        wb = torch.cat([w, b], dim=1)
        ctx.save_for_backward(h, wb)
        ctx.k = x.shape[1]
        return F.linear(torch.cat([x, h], dim=1), wb, bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        h, wb = ctx.saved_tensors
        dxh = dy @ wb
        return dxh[:, : ctx.k], dxh[:, ctx.k :], None, dy.t() @ h, None


def lora_input(x: torch.Tensor, p: float, hashed: tuple[int, torch.Tensor, torch.Tensor] | None,
               col0: int = 0) -> torch.Tensor:
    """The LoRA A input: x under the projection's dropout (speed.dropout's counter-based one when installed; `col0`
    is x's first column in the full input when x is a slice of it)."""
    if hashed is not None:
        return hashed_dropout(x, *hashed, col0=col0) if hashed[0] else x
    return F.dropout(x, p, training=True) if p > 0 else x


def _traced_lora(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scaling: float, dropout_p: float,
                 hashed: tuple[int, torch.Tensor, torch.Tensor] | None = None, fold: bool = True) -> torch.Tensor:
    """The fused node's forward as traceable ops (for compiled code; autograd derives the rest of the backward).
    With `hashed` = (drop ppm, seed, salt) the input dropout is speed.dropout's counter-based one (recomputed
    exactly, nothing stored); `fold` runs base and LoRA B as one matmul (`Folded`)."""
    dtype = x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    xd = lora_input(x2, dropout_p, hashed)
    # The scaling goes on B (an [out, r] matrix), not on the [tokens, out] product: scaling the product made the
    # backward keep a second, scaled copy of the output gradient. Exact for a power-of-two scaling.
    b = (lora_b * scaling).to(dtype)
    bias = None if bias is None else bias.to(dtype)
    h = F.linear(xd, lora_a.to(dtype))
    if not fold:
        return F.linear(x, w, bias) + F.linear(h, b).view(*x.shape[:-1], b.shape[0])
    pad = -(x2.shape[1] + h.shape[1]) % 8  # rows of [x | h] on 16 bytes: cuBLAS's aligned kernels for any rank
    if pad:
        h, b = F.pad(h, (0, pad)), F.pad(b, (0, pad))
    y = Folded.apply(x2, h, w, b, bias)
    return y.view(*x.shape[:-1], y.shape[-1])


def adapter_for_fast_path(self: Any, x: torch.Tensor) -> str | None:
    """The one plain adapter this call can run through the fused maths, or None for peft's own path."""
    adapters = self.active_adapters
    # Evaluation and generation keep peft's path: bitsandbytes has 4-bit inference kernels (gemv for one token)
    # that beat dequantize + matmul there, and no backward is needed.
    if (not self.training or self.disable_adapters or self.merged or len(adapters) != 1
            or adapters[0] not in self.lora_A or torch.is_autocast_enabled(x.device.type)):
        return None
    if getattr(getattr(self.base_layer.weight, "quant_state", None), "packing_format_for_cpu", False):
        # bitsandbytes repacked this weight for its CPU kernel (after a forward through it): not the layout its
        # dequantize_4bit reads. Its own path stays correct.
        return None
    return adapters[0]


def traceable(self: Any) -> bool:
    """Compiled code can read this projection's base weight as torch ops (a plain weight, or attached NF4)."""
    return nf4.attached(self.base_layer) or getattr(self.base_layer.weight, "quant_state", None) is None


def compute_dtype(self: Any, x: torch.Tensor) -> torch.dtype:
    return getattr(self.base_layer, "compute_dtype", None) or x.dtype


def dropout_rate(self: Any, name: str) -> float:
    dropout = self.lora_dropout[name]
    return dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0


def hashed_args(self: Any, name: str) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """speed.dropout's (drop ppm, seed, salt) for this projection, when installed."""
    rates = self.__dict__.get(RATES)
    return (rates[name], getattr(self, SEED), getattr(self, SALT)) if rates and name in rates else None


def base_weight(self: Any, dtype: torch.dtype) -> torch.Tensor:
    """The frozen base weight [out, in] in `dtype`, as torch ops (compiled code only)."""
    base = self.base_layer
    return nf4.dequantize(base, dtype) if nf4.attached(base) else base.weight.to(dtype)


def _traced_forward(self: Any, x: torch.Tensor, name: str) -> torch.Tensor:
    """This projection alone, as traceable ops (compiled code)."""
    compute = compute_dtype(self, x)
    out = _traced_lora(x.to(compute), base_weight(self, compute), self.base_layer.bias, self.lora_A[name].weight,
                       self.lora_B[name].weight, float(self.scaling[name]), float(dropout_rate(self, name)),
                       hashed_args(self, name), fold=self.__dict__.get(FOLD, False))
    return out.to(x.dtype)


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Replacement forward for a peft LoRA linear with one plain adapter; anything else takes peft's own path."""
    name = None if args or kwargs else adapter_for_fast_path(self, x)
    if name is None:
        return self._loratune_peft_forward(x, *args, **kwargs)
    # Compiled code takes the traced maths, unless a 4-bit weight has no torch-op reader (then the fused node).
    if torch.compiler.is_compiling() and traceable(self):
        return _traced_forward(self, x, name)
    compute = compute_dtype(self, x)
    out = _FusedLoraLinear.apply(x.to(compute), self.base_layer.weight, self.base_layer.bias,
                                 self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name]),
                                 float(dropout_rate(self, name)))
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


def set_folded(model: Any, on: bool = True) -> int:
    """Mark every fused LoRA projection to fold its B into the base matmul in compiled code (`Folded`) or not;
    returns how many were marked."""
    count = 0
    for module in model.modules():
        if hasattr(module, "_loratune_peft_forward"):
            module.__dict__[FOLD] = on
            count += 1
    return count
