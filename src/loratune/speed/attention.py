"""Padding-free attention for packed rows: each example attends only to itself, and no [T x T] mask is built.

A packed micro-batch is one row [1, T] holding several examples, with position ids restarting at 0 for each
(`loratune.data.batching.collate`). With plain `sdpa`, transformers turns those restarts into a block-diagonal
boolean mask [1, 1, T, T]: O(T^2) memory, and a masked SDPA cannot use the flash kernel. Here the row is split at
the restarts instead (cu_seqlens, found once per forward and cached) and attention runs per example with causal
masking only:

- CUDA with `torch.nn.attention.varlen.varlen_attn` (torch >= 2.9): one flash-attention varlen call per layer;
- otherwise: SDPA with `is_causal=True` on each example's slice (flash/efficient kernels on CUDA, the fused CPU
  kernel on the CPU), outputs concatenated.

Everything that is not a packed training row (padded batches with a 2D mask, generation with a KV cache) goes to
transformers' own SDPA function with its own mask, so registering this implementation never changes those paths.
"""

from __future__ import annotations

import inspect
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

NAME = "loratune_varlen"

# Architectures whose attention is plain causal self-attention with rotary/none position bias: no sliding window,
# soft-capping, attention sinks or bidirectional blocks that a per-example causal split would drop.
SUPPORTED_TYPES = {"llama", "mistral", "phi", "phi3", "qwen2", "qwen3", "olmo2", "granite"}


@dataclass(frozen=True)
class Segments:
    """Example boundaries of one packed row: python offsets for slicing, the same as int32 for flash varlen."""

    offsets: tuple[int, ...]  # 0, end of example 1, ..., T
    cu_seqlens: torch.Tensor  # int32 [n + 1] on the row's device
    max_len: int


_cache: tuple[Any, Segments] | None = None  # (weakref to the position_ids tensor, its segments)


def segments_from_positions(position_ids: torch.Tensor) -> Segments:
    """Split a [1, T] row where the position does not continue by +1 (the same rule transformers uses).

    Every layer (and the recomputation in backward) receives the very same position_ids tensor, so the result is
    cached on its identity: one host sync per forward pass instead of one per layer.
    """
    global _cache
    if _cache is not None and _cache[0]() is position_ids:
        return _cache[1]
    row = position_ids[0]
    breaks = (torch.nonzero(row[1:] - row[:-1] != 1).flatten() + 1).tolist()
    offsets = (0, *breaks, row.shape[0])
    lengths = [b - a for a, b in zip(offsets, offsets[1:])]
    seg = Segments(offsets, torch.tensor(offsets, dtype=torch.int32, device=row.device), max(lengths))
    _cache = (weakref.ref(position_ids), seg)
    return seg


def _varlen_kernel() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


_VARLEN = _varlen_kernel()
_VARLEN_PARAMS = set(inspect.signature(_VARLEN).parameters) if _VARLEN is not None else set()


def flash_varlen_usable(query: torch.Tensor, dropout: float) -> bool:
    return _VARLEN is not None and query.is_cuda and dropout == 0.0 and query.dtype in (torch.float16, torch.bfloat16)


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                  scale: float | None) -> torch.Tensor:
    """q/k/v [1, H, T, D] -> [T, H, D] through one flash varlen call (torch's own; its API moved between
    versions: `is_causal=` until 2.12, a (left, right) window after)."""
    q3, k3, v3 = (t[0].transpose(0, 1) for t in (q, k, v))  # [T, H, D]
    if k3.shape[1] != q3.shape[1] and "enable_gqa" not in _VARLEN_PARAMS:
        rep = q3.shape[1] // k3.shape[1]
        k3, v3 = k3.repeat_interleave(rep, dim=1), v3.repeat_interleave(rep, dim=1)
    kwargs: dict[str, Any] = {"scale": scale}
    if "is_causal" in _VARLEN_PARAMS:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    if k3.shape[1] != q3.shape[1]:
        kwargs["enable_gqa"] = True
    return _VARLEN(q3, k3, v3, cu_seqlens, cu_seqlens, max_len, max_len, **kwargs)


# Per-segment SDPA never uses cuDNN attention: it builds a new execution plan for every new sequence length
# (measured on an H100: about 2 ms of CPU per call, which made a packed Phi-2 step CPU-bound), and packed
# segments have a new length almost every call.
_SEGMENT_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# How often each path ran in this process (the bench reports it; a silent fallback would hide a slow path).
PATH_COUNTS: Counter[str] = Counter()


def _sdpa_per_segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments, scale: float | None,
                      dropout: float) -> torch.Tensor:
    """q/k/v [1, H, T, D] -> [1, T, H, D]: causal SDPA on each example's slice."""
    gqa = k.shape[1] != q.shape[1]
    if gqa:  # repeat once for the row rather than per segment (enable_gqa is not on every CPU kernel)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    outs = []
    with sdpa_kernel(_SEGMENT_BACKENDS):
        for a, b in zip(seg.offsets, seg.offsets[1:]):
            outs.append(F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                                       dropout_p=dropout, scale=scale))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2)


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: (module, q, k, v [B, H, T, D], mask) -> ([B, T, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    packed_row = (attention_mask is None and query.shape[0] == 1 and position_ids is not None
                  and query.shape[2] == key.shape[2] == position_ids.shape[-1] and getattr(module, "is_causal", True))
    if not packed_row:
        PATH_COUNTS["transformers_sdpa"] += 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if not module.training:
        dropout = 0.0
    flash = flash_varlen_usable(query, dropout)
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if flash and cu_seqlens is not None and torch.compiler.is_compiling():
        # Compiled layers get the boundaries from the caller (`segment_kwargs`): finding them here is a host sync
        # that would split the graph. The row length is the bound on each example's length: an exact int would
        # be one more value for the compiled code to guard on, and the kernel only sizes its grid with it.
        return _flash_varlen(query, key, value, cu_seqlens, query.shape[2], scaling).unsqueeze(0), None
    seg = segments_from_positions(position_ids)
    if flash:
        PATH_COUNTS["flash_varlen"] += 1
        return _flash_varlen(query, key, value, seg.cu_seqlens, seg.max_len, scaling).unsqueeze(0), None
    PATH_COUNTS[f"sdpa_per_segment_{str(query.dtype).removeprefix('torch.')}"] += 1
    return _sdpa_per_segment(query, key, value, seg, scaling, dropout), None


def segment_kwargs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Example boundaries of a packed row as transformers' flash keyword arguments (they reach every attention
    call through the model's **kwargs); empty for anything that is not a packed row."""
    pos = batch.get("position_ids")
    if pos is None or "attention_mask" in batch or pos.shape[0] != 1:
        return {}
    seg = segments_from_positions(pos)
    PATH_COUNTS["segment_kwargs"] += 1  # per forward pass; the compiled attention itself cannot count its calls
    return {"cu_seq_lens_q": seg.cu_seqlens, "cu_seq_lens_k": seg.cu_seqlens, "max_length_q": seg.max_len,
            "max_length_k": seg.max_len}


def varlen_mask(*, q_length: int, kv_length: int, attention_mask: torch.Tensor | None = None, q_offset: Any = 0,
                **kwargs: Any) -> torch.Tensor | None:
    """Mask function paired with the attention above: no mask at all for a fresh sequence without padding (the
    attention splits packed rows itself); anything else (padding, a KV cache) gets transformers' SDPA mask."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and isinstance(q_offset, int) and q_offset == 0:
        return None
    return sdpa_mask(q_length=q_length, kv_length=kv_length, attention_mask=attention_mask, q_offset=q_offset,
                     **kwargs)


def register() -> None:
    """Make `attn_implementation="loratune_varlen"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, varlen_mask)


def supported(model: Any) -> bool:
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", "") not in SUPPORTED_TYPES:
        return False
    return getattr(config, "sliding_window", None) is None and getattr(config, "_attn_implementation", None) in (
        "sdpa", "eager", NAME)


def enable(model: Any) -> bool:
    """Switch a loaded model (and every sub-config) to the packed-row attention; False where unsupported."""
    if not supported(model):
        return False
    register()
    model.set_attn_implementation(NAME)
    return True
