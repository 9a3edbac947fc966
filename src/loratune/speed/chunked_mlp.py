"""A gated MLP (Llama's gate/up/down) computed in slices of its intermediate dimension, inside compiled layers.

Why: the backward of one compiled Llama layer peaks in its MLP, where Inductor keeps about seven [tokens x
intermediate] buffers alive at once (gate and up outputs, the input gradient of down, the dropped input of down's
LoRA, the gradients of gate and up; bench/NOTES.md entries 25 and 27). Split into n slices of the intermediate
dimension,

    y = sum_j down[:, j](act(gate[j](x)) * up[j](x))  +  s_d B_d (sum_j dropout_d(a_j) A_d[:, j]^T)

each slice's buffers are [tokens x intermediate / n], and the partitioner, which orders the recomputation the way
autograd runs the backward, computes them slice by slice. The slices have static shapes, so one compiled graph still
serves every packed length (slicing the tokens instead would recompile per slice count).

Exact up to summation order: each LoRA keeps its own dropout mask, indexed by the global column (speed.dropout's
`col0`), so the masks are those of the whole MLP; the LoRA A inputs of gate and up and the LoRA B of down are computed
once, outside the slices. `tests/test_chunked_mlp.py` compares loss and LoRA gradients with the unsliced compiled
layers (with dropout) and with plain transformers + peft.

Off by default (`speed.mlp_chunks: 1`): it is a memory lever whose speed cost (smaller matmuls) has not been
measured on a GPU yet.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

from loratune.speed import lora

CHUNKS = "_loratune_mlp_chunks"


def install(layers: list[torch.nn.Module], chunks: int) -> int:
    """Slice the gated MLP of every layer whose gate, up and down are fused LoRA projections; returns how many."""
    if chunks <= 1:
        return 0
    count = 0
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if (mlp is None or CHUNKS in mlp.__dict__ or not hasattr(mlp, "act_fn")
                or not all(hasattr(p, "_loratune_peft_forward") for p in parts)
                or parts[0].base_layer.out_features % chunks):
            continue
        mlp.__dict__[CHUNKS] = chunks
        mlp._loratune_mlp_forward = mlp.forward
        mlp.forward = types.MethodType(_chunked_forward, mlp)
        count += 1
    return count


def _chunked_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up, down = self.gate_proj, self.up_proj, self.down_proj
    if not torch.compiler.is_compiling():
        return self._loratune_mlp_forward(x)  # eager code: each projection's fused node
    names = [lora.adapter_for_fast_path(m, x) for m in (gate, up, down)]
    if any(n is None for n in names) or not all(lora.traceable(m) for m in (gate, up, down)):
        return self._loratune_mlp_forward(x)  # evaluation, or a projection on peft's own path
    # (LoRA B is not folded into the base matmul here, as speed.lora does: the slices already bound the buffers.)
    compute = lora.compute_dtype(gate, x)
    x2 = x.reshape(-1, x.shape[-1]).to(compute)
    (wg, ag, bg, hg_args), (wu, au, bu, hu_args), (wd, ad, bd, hd_args) = (
        _parts(m, n, compute) for m, n in zip((gate, up, down), names))
    hg = F.linear(lora.lora_input(x2, *hg_args), ag)  # [tokens, r]: once for every slice
    hu = F.linear(lora.lora_input(x2, *hu_args), au)
    size = wg.shape[0] // self.__dict__[CHUNKS]
    y = h_down = None
    for start in range(0, wg.shape[0], size):
        rows = slice(start, start + size)
        g = F.linear(x2, wg[rows], _sliced(gate, rows, compute)) + F.linear(hg, bg[rows])
        u = F.linear(x2, wu[rows], _sliced(up, rows, compute)) + F.linear(hu, bu[rows])
        a = self.act_fn(g) * u
        part = F.linear(a, wd[:, rows])
        h_part = F.linear(lora.lora_input(a, *hd_args, col0=start), ad[:, rows])
        y = part if y is None else y + part
        h_down = h_part if h_down is None else h_down + h_part
    y = y + F.linear(h_down, bd)
    if down.base_layer.bias is not None:
        y = y + down.base_layer.bias.to(compute)
    return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def _parts(module: Any, name: str, compute: torch.dtype):
    """(base weight, A, s B, (dropout rate, hashed dropout args)) of a fused LoRA projection, in `compute`."""
    scaled_b = (module.lora_B[name].weight * float(module.scaling[name])).to(compute)
    return (lora.base_weight(module, compute), module.lora_A[name].weight.to(compute), scaled_b,
            (lora.dropout_rate(module, name), lora.hashed_args(module, name)))


def _sliced(module: Any, rows: slice, compute: torch.dtype) -> torch.Tensor | None:
    bias = module.base_layer.bias
    return None if bias is None else bias[rows].to(compute)
