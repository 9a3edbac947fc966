"""Fast paths for LoRA/QLoRA training, one module per idea, applied by `apply_speed` after `add_lora`.

- attention.py      packed rows attend per example (flash varlen / SDPA per segment), no [T x T] mask
- precision.py      frozen weights back in the compute dtype; LoRA matmuls under autocast over fp32 masters
- lora.py           each LoRA projection (4-bit or plain base) as one fused autograd node; compiled: LoRA B
                    folded into the base matmul
- cross_entropy.py  output head + cross-entropy per chunk with the gradient in the same pass (no full logits)
- compile.py        torch.compile of each decoder layer (regional), recomputation inside the compiled region
- chunked_mlp.py    a gated MLP in slices of its intermediate dimension (compiled; opt-in memory lever)
- nf4.py            NF4 dequantization as torch ops (traceable, fused by Inductor)
- dropout.py        counter-based dropout inside compiled layers (recomputed exactly without RNG state)
- offload.py        the compiled layers' inputs in pinned CPU memory between forward and backward
- graphs.py         the packed micro-batch's forward + loss + backward recorded and replayed as CUDA graphs
- optimizer_graph.py  clip + AdamW + zero_grad recorded as one CUDA graph

Every lever but the CPU's bf16 autocast is exact (tests/test_speed_equivalence.py compares with plain transformers +
peft) and has a switch in the `speed` config section. `apply_speed` returns a `SpeedPlan` that it also attaches to
the model, where `loratune.training.loss.loss_sum` finds it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from loratune.config import SpeedConfig
from loratune.speed import attention, precision
from loratune.speed.graphs import StepGraphs
from loratune.speed.offload import HostOffload, offload_context
from loratune.speed.precision import autocast_context, frozen_to_compute_dtype

PLAN_ATTR = "loratune_speed_plan"


@dataclass
class SpeedPlan:
    """What `apply_speed` switched on, and what the loss needs to know at every step."""

    device_type: str
    autocast_dtype: torch.dtype | None = None
    fused_cross_entropy: bool = False
    ce_chunk_tokens: int = 1024
    bucket_tokens: int | None = None  # pad packed rows to a multiple of this (an ignored segment at the end)
    graphs: StepGraphs | None = None  # speed.graphs: micro-batches replayed as CUDA graphs (the loop calls it)
    dropout_seed: torch.Tensor | None = None  # speed.dropout's shared seed, refilled at every micro-batch
    offload: HostOffload | None = None  # speed.offload, active around the decoder body in training
    applied: list[str] = field(default_factory=list)

    def autocast(self) -> AbstractContextManager:
        return autocast_context(self.device_type, self.autocast_dtype)

    def offloading(self, training: bool) -> AbstractContextManager:
        return offload_context(self.offload, training)


def plan_of(model: Any) -> SpeedPlan | None:
    plan = model.__dict__.get(PLAN_ATTR) if hasattr(model, "__dict__") else None
    return plan if isinstance(plan, SpeedPlan) else None


def apply_speed(model: Any, cfg: SpeedConfig, *, device: str, dtype: torch.dtype) -> SpeedPlan:
    """Apply the switched-on levers to a peft-wrapped model in place; returns (and attaches) the plan."""
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    plan = SpeedPlan(device_type=device_type, ce_chunk_tokens=cfg.ce_chunk_tokens, bucket_tokens=cfg.bucket_tokens)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if cfg.varlen_attention and attention.enable(inner):
        plan.applied.append("varlen_attention")
    if cfg.compute_dtype_frozen and frozen_to_compute_dtype(model, dtype):
        plan.applied.append("compute_dtype_frozen")
    if cfg.autocast and device_type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        plan.autocast_dtype = dtype
        plan.applied.append("autocast")
    if cfg.cpu_bf16 and device_type == "cpu" and dtype == torch.float32 and precision.cpu_has_bf16():
        plan.autocast_dtype = torch.bfloat16
        plan.applied.append("cpu_bf16")
    if cfg.fused_lora:
        from loratune.speed.lora import fuse_lora_linears

        if fuse_lora_linears(model):
            plan.applied.append("fused_lora")
    if cfg.fused_cross_entropy:
        plan.fused_cross_entropy = True
        plan.applied.append("fused_cross_entropy")
    if cfg.compile == "on" or (cfg.compile == "auto" and device_type == "cuda"):
        from loratune.speed import dropout
        from loratune.speed.compile import checkpointed, compile_layers, decoder_layers

        layers = decoder_layers(model)
        plan.dropout_seed = dropout.install(layers, device)
        if cfg.folded_lora and "fused_lora" in plan.applied:
            from loratune.speed.lora import set_folded

            set_folded(model)
            plan.applied.append("folded_lora")
        if cfg.mlp_chunks > 1 and "fused_lora" in plan.applied:
            from loratune.speed import chunked_mlp

            if chunked_mlp.install(layers, cfg.mlp_chunks):
                plan.applied.append(f"mlp_chunks_{cfg.mlp_chunks}")
        recomputed = checkpointed(layers)  # read before compile_layers moves the recomputation inside
        if compile_layers(model):
            plan.applied.append("compile")
            # Offload pays only where a layer keeps just its input: recomputation inside the compiled layer.
            if cfg.offload_activations and recomputed and device_type == "cuda":
                plan.offload = HostOffload(layers)
                plan.applied.append("offload_activations")
            if cfg.cuda_graphs and device_type == "cuda" and _graphable(model, plan):
                plan.graphs = StepGraphs(model, [p for p in model.parameters() if p.requires_grad],
                                         bucket=cfg.bucket_tokens or 128, autocast=plan.autocast,
                                         dropout_seed=plan.dropout_seed, offload=plan.offload,
                                         ce_chunk_tokens=cfg.ce_chunk_tokens)
                plan.applied.append("cuda_graphs")
    if cfg.bucket_tokens:
        plan.applied.append(f"bucket_{cfg.bucket_tokens}")
    model.__dict__[PLAN_ATTR] = plan
    return plan


def _graphable(model: Any, plan: SpeedPlan) -> bool:
    """What speed.graphs records: the loss fast path over packed rows, with the fused head + cross-entropy."""
    from loratune.speed.cross_entropy import head_is_frozen
    from loratune.training.loss import _inner_causal_lm, fast_path_supported

    return (fast_path_supported(model) and "varlen_attention" in plan.applied and plan.fused_cross_entropy
            and head_is_frozen(_inner_causal_lm(model).get_output_embeddings()))


def pad_to_bucket(batch: dict[str, torch.Tensor], bucket: int) -> dict[str, torch.Tensor]:
    """Pad a packed row [1, T] at its end to a multiple of `bucket` tokens with an ignored segment of its own.

    The pad segment's position ids restart at 0, so the packed-row attention (and transformers' block-diagonal
    mask) treats it as one more example, which real tokens never attend to; its labels are ignored, and the last
    real token's target (the first pad label) is ignored too, as it is at the end of an unpadded row. Padded
    batches (with an attention mask) and rows already at a multiple are returned unchanged.
    """
    ids = batch["input_ids"]
    if "attention_mask" in batch or "position_ids" not in batch or ids.shape[0] != 1:
        return batch
    pad = -ids.shape[1] % bucket
    if pad == 0:
        return batch
    out = dict(batch)
    out["input_ids"] = torch.cat([ids, ids.new_zeros((1, pad))], dim=1)
    pos = batch["position_ids"]
    out["position_ids"] = torch.cat([pos, torch.arange(pad, dtype=pos.dtype, device=pos.device)[None]], dim=1)
    if "labels" in batch:
        lab = batch["labels"]
        out["labels"] = torch.cat([lab, lab.new_full((1, pad), -100)], dim=1)
    return out


__all__ = ["SpeedPlan", "apply_speed", "pad_to_bucket", "plan_of"]
