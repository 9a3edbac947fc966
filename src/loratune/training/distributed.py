"""Data-parallel training over several processes: one per GPU, or several CPU processes talking over gloo.

A run is launched by `loratune train --nproc N` (which re-runs itself through `torch.distributed.run`), by
`torchrun`, or by `accelerate launch -m loratune.cli train cfg.yaml`; all three set RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR, which is all `init_distributed` reads. Multi-node works the same way through the
launcher's own flags (`accelerate launch --num_machines 2 --machine_rank 0 --main_process_ip ...`).

Two layouts (`training.distributed`):
- ddp: every rank holds the whole model; LoRA gradients are summed across ranks once per optimizer step.
- fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`) shards each decoder layer's weights, 4-bit ones included
  (models/load.py stores 4-bit weights in the compute dtype so they are plain float tensors FSDP can split),
  and all-gathers a layer just before it runs. This is what accelerate's FSDP plugin does for FSDP2
  (`fsdp2_prepare_model`), called directly because accelerate only enables FSDP on accelerators, and the CI test
  runs it on CPU processes over gloo.

The maths (see loop.py): every optimizer step's global batch (batch_size x grad_accum examples, exactly the
examples a single process would use) is split across ranks; each rank sums the answer-token NLL of its share,
divides by the *global* answer-token count (one all-reduce of an integer), and the LoRA gradients are summed
across ranks once per optimizer step. The result is the single-process gradient, whatever the world size, so
N processes reproduce one process's run (up to float summation order). Summing once per step is what DDP does
under `no_sync()` for accumulation, without the per-bucket hooks: LoRA gradients are a few MB, one flat
all-reduce is the cheapest way to move them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from loratune.errors import LoratuneError


@dataclass
class DistContext:
    """This process's place in the run. `world_size == 1` is the plain single-process run (no collectives)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collective tensors live: gloo reduces CPU tensors, nccl CUDA ones
    strategy: str = "ddp"  # "ddp" or "fsdp" (training.distributed)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def fsdp(self) -> bool:
        return self.enabled and self.strategy == "fsdp"

    @property
    def loss_scale(self) -> int:
        """FSDP averages gradients over ranks; scaling the loss by the world size turns that into the sum."""
        return self.world_size if self.fsdp else 1

    @property
    def is_main(self) -> bool:
        """Rank 0 owns the run folder: config, metrics, checkpoints, adapter, plots."""
        return self.rank == 0

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's share of one micro-batch (strided, so shares differ by at most one example)."""
        return indices[self.rank :: self.world_size]

    def sum(self, *values: float) -> list[float]:
        """Element-wise sum of `values` over all ranks (float64, so token counts stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
        return t.tolist()

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over ranks in one flat all-reduce (a rank with no examples adds 0).

        Under FSDP the backward pass already reduce-scattered them: nothing to do.
        """
        if not self.enabled or self.fsdp:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
            offset += n

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (used for per-rank RNG states in checkpoints)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (the run folder path is chosen once, by rank 0)."""
        if not self.enabled:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()


    def trainable_state_dict(self, model: Any) -> dict[str, torch.Tensor] | None:
        """FSDP: the full (unsharded) LoRA weights, on rank 0's CPU (collective). Otherwise None: the model's own."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                    ignore_frozen_params=True))

    def optimizer_state_dict(self, model: Any, optimizer: Any) -> dict[str, Any]:
        """The optimizer state a single process would have (FSDP: gathered to rank 0; collective)."""
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))

    def load_optimizer_state_dict(self, model: Any, optimizer: Any, state: dict[str, Any]) -> None:
        if not self.fsdp:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: modules whose class transformers marks as not to be split."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise LoratuneError(f"FSDP: no decoder layers found in {type(inner).__name__}", key="training.distributed",
                            hint="use training.distributed: ddp for this architecture")
    return layers


def shard_model(model: Any, compute_dtype: torch.dtype) -> Any:
    """FSDP2 in place: each decoder layer its own unit (gathered just in time), the rest in the root unit."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Gradients reduce in fp32 whatever the compute dtype: LoRA gradients are small and bf16 sums lose bits.
    mp = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                              reduce_dtype=torch.float32)
    for module in model.modules():
        # bitsandbytes' CPU inference path repacks a 4-bit weight's `.data` in place on the first no-grad eval
        # forward; an FSDP-gathered weight is a temporary buffer, so the next gather would feed packed bytes to an
        # unpacked kernel (training loss jumps after the first evaluation). CUDA never takes that path.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def init_distributed(device: str, strategy: str = "ddp") -> DistContext:
    """Join the process group the launcher set up (env://), or return the single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=device, strategy=strategy)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        # Each process drives its own GPU; "cuda" (and device_map index) then means this one.
        torch.cuda.set_device(local_rank)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank,
                       device=f"cuda:{local_rank}" if device == "cuda" else "cpu", strategy=strategy)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def check_batch(ctx: DistContext, batch_size: int) -> None:
    if ctx.enabled and batch_size < ctx.world_size:
        raise LoratuneError(f"batch_size {batch_size} is smaller than the {ctx.world_size} processes",
                            key="training.batch_size",
                            hint="each micro-batch is split across processes; raise batch_size or lower --nproc")


def launch_command(nproc: int, train_args: list[str]) -> list[str]:
    """`python -m torch.distributed.run` for N local processes running `loratune train <train_args>`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "loratune.cli", "train", *train_args]


def launch(nproc: int, train_args: list[str]) -> int:
    """Run `loratune train` in `nproc` local processes; returns the launcher's exit code."""
    if nproc < 1:
        raise LoratuneError(f"--nproc must be at least 1, got {nproc}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LoratuneError("--nproc inside an already distributed launch", hint="drop --nproc under accelerate/torchrun")
    env = dict(os.environ)
    # Without this each of N processes starts one thread per core and they fight over the same cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(launch_command(nproc, train_args), env=env)
