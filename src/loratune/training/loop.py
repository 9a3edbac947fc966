"""The optimisation loop: accumulate, step, log, evaluate, checkpoint, stop early, survive SIGINT.

Everything it needs comes in as plain objects; it knows nothing of config files or run-folder naming beyond
the paths it is given. Data-parallel runs go through the same code: each rank takes its share of every
micro-batch, the loss is divided by the global answer-token count and gradients are summed across ranks
(distributed.py), so one process and N processes compute the same step.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loratune.data.batching import collate, n_real_tokens, n_target_tokens, schedule
from loratune.data.tokenize import Example
from loratune.errors import LoratuneError, TrainingInterrupted
from loratune.speed import plan_of
from loratune.speed.optimizer_graph import OptimizerStep, last_lr
from loratune.training import checkpoint as ckpt
from loratune.training.distributed import DistContext
from loratune.training.loss import loss_sum
from loratune.training.progress import TrainProgress


@dataclass
class LoopSettings:
    batch_size: int
    grad_accum: int
    epochs: float
    max_steps: int | None
    seed: int
    max_grad_norm: float | None
    logging_steps: int
    eval_steps: int | None
    save_steps: int | None
    save_total_limit: int
    patience: int | None
    packing: bool
    fast_path: bool
    eval_batch_size: int = 8


@dataclass
class LoopResult:
    state: ckpt.TrainerState
    stopped_early: bool
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    peak_memory_gib: float


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def to_device(batch: dict[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(model: Any, examples: list[Example], pad_id: int, *, batch_size: int, packing: bool,
                  fast: bool, device: Any, dist: DistContext | None = None) -> tuple[float, int]:
    """Mean NLL per answer token over `examples` (and the token count); ranks split the examples."""
    dist = dist or DistContext()
    mine = dist.shard(list(range(len(examples))))
    n_batches = math.ceil(math.ceil(len(examples) / dist.world_size) / batch_size)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, n_batches * batch_size, batch_size):
        chunk = mine[i : i + batch_size]
        if not chunk and not dist.fsdp:
            break
        # FSDP ranks must run the same number of forwards (each gathers weights); a rank out of examples
        # runs one it already scored and counts nothing.
        batch = to_device(collate([examples[j] for j in chunk or mine[:1] or [0]], pad_id, packing=packing), device)
        s, n = loss_sum(model, batch, fast=fast)
        if chunk:
            total += float(s)
            count += n
    if was_training:
        model.train()
    total, count = dist.sum(total, count)
    return total / max(count, 1), int(count)


def accumulate(model: Any, batches: list[dict[str, torch.Tensor]], *, device: Any, fast: bool,
               dist: DistContext | None = None, counted: list[bool] | None = None) -> tuple[float, int]:
    """Forward + backward over one optimizer step's micro-batches (this rank's share); gradients accumulate.

    Each micro-batch's loss is its answer-token NLL *sum* divided by the answer tokens of the whole window on
    all ranks, so the accumulated gradient equals one big batch's mean-per-token gradient. Dividing each
    micro-batch by its own count (mean of means) over-weights short answers: the bug fixed in transformers
    PR 34191. Returns (this step's global loss, this rank's real tokens).

    `counted[i] = False` marks a stand-in micro-batch (FSDP ranks must all run the same number of passes): it
    runs forward and backward with weight 0.
    """
    dist = dist or DistContext()
    counted = counted or [True] * len(batches)
    local_targets = sum(n_target_tokens(b) for b, c in zip(batches, counted) if c)
    (window_targets,) = dist.sum(local_targets)
    local_loss, real = 0.0, 0
    plan = plan_of(model)
    graphs = plan.graphs if plan is not None and fast else None
    for batch, use in zip(batches, counted):
        weight = 1.0 / max(window_targets, 1) if use else 0.0
        if graphs is not None and graphs.usable(batch):  # forward + backward replayed as a CUDA graph
            loss = graphs.run(batch, weight * dist.loss_scale) * weight
        else:
            s, _ = loss_sum(model, to_device(batch, device), fast=fast)
            loss = s * weight
            (loss * dist.loss_scale).backward()
        if use:
            real += n_real_tokens(batch)
            local_loss += float(loss.detach())
    (step_loss,) = dist.sum(local_loss)
    return step_loss, real


def fit(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    train: list[Example],
    validation: list[Example] | None,
    settings: LoopSettings,
    *,
    pad_id: int,
    device: Any,
    run_dir: Path,
    state: ckpt.TrainerState,
    total_steps: int,
    metrics: Any,
    on_eval: Callable[[int], dict[str, float]] | None = None,
    show_progress: bool = True,
    stop_after: int | None = None,
    dist: DistContext | None = None,
) -> LoopResult:
    """Train from `state.step` to `total_steps` (or `stop_after`, for tests that stop mid-run).

    `metrics` is anything with `write(record)`: the run's Tracker (metrics.jsonl + TensorBoard/wandb) on the
    main rank, a NullTracker on the others.
    """
    dist = dist or DistContext()
    # The fused loss calls the decoder and head modules directly, past the root module whose forward FSDP hooks
    # to gather the embeddings and head; under FSDP the loss goes through model(...) instead.
    fast = settings.fast_path and not dist.fsdp
    checkpoints = run_dir / "checkpoints"
    trainable = [p for p in model.parameters() if p.requires_grad]
    speed_plan = plan_of(model)
    # Under CUDA graphs the recorded backward adds into fixed .grad tensors (zeroed in place), and the update is
    # recorded too (speed.optimizer_graph).
    graphs = speed_plan is not None and speed_plan.graphs is not None
    update = OptimizerStep(optimizer, trainable, settings.max_grad_norm, graphs=graphs, keep_grads=graphs)
    best_ckpt: Path | None = None
    last_ckpt: Path | None = None
    if state.best_step is not None and (checkpoints / f"step-{state.best_step:06d}").is_dir():
        best_ckpt = checkpoints / f"step-{state.best_step:06d}"
    stopped_early = False
    model.train()
    t_start = time.perf_counter() - state.wall_time_s
    window_loss, window_steps = 0.0, 0

    def save(step: int, *, new_best: bool = False) -> Path:
        nonlocal last_ckpt
        state.wall_time_s = time.perf_counter() - t_start
        folder = checkpoints / f"step-{step:06d}"
        rng_states = dist.gather(ckpt.rng_state())  # every rank's dropout RNG, so a resume is exact on each
        adapter_state = dist.trainable_state_dict(model)  # FSDP: gathered from the shards (all ranks take part)
        optimizer_state = dist.optimizer_state_dict(model, optimizer)
        if dist.is_main:
            ckpt.save_checkpoint(folder, model, optimizer_state, scheduler, state, rng_states, adapter_state)
            # A checkpoint that is the new best replaces the old best as the one pruning must spare; sparing the
            # old one here would leave it behind for good.
            ckpt.prune(checkpoints, settings.save_total_limit, protect=folder if new_best else best_ckpt)
        dist.barrier()  # no rank runs ahead of (or reads) a checkpoint rank 0 is still writing
        last_ckpt = folder
        return folder

    progress = TrainProgress(total_steps, state.step, enabled=show_progress and dist.is_main)
    current_step = state.step
    try:
        with progress:
            for step, _epoch, window in schedule(len(train), settings.batch_size, settings.grad_accum, settings.seed,
                                                 epochs=settings.epochs, max_steps=settings.max_steps):
                if step <= state.step:
                    continue  # resumed: this step is already in the checkpoint
                current_step = step - 1
                shares = [dist.shard(mb) for mb in window]
                if not dist.fsdp:
                    shares = [share for share in shares if share]
                counted = [bool(share) for share in shares]
                batches = [collate([train[i] for i in share or window[0][:1]], pad_id, packing=settings.packing)
                           for share in shares]
                step_loss, local_real = accumulate(model, batches, device=device, fast=fast, dist=dist,
                                                   counted=counted)
                dist.sum_gradients(trainable)
                update()  # clip + optimizer step + zero_grad (one CUDA graph replay under speed.cuda_graphs)
                scheduler.step()
                (step_real,) = dist.sum(local_real)
                state.step = step
                current_step = step
                state.train_tokens += int(step_real)
                window_loss += step_loss
                window_steps += 1
                lr = last_lr(scheduler)
                best = f"  best val {state.best_val_loss:.4f} @ {state.best_step}" if state.best_step else ""
                progress.update(step, step_loss, int(step_real), lr, extra=best)
                if step % settings.logging_steps == 0 or step == total_steps:
                    metrics.write({"step": step, "loss": round(window_loss / window_steps, 6), "lr": lr,
                                   "tokens_per_s": round(progress.tokens_per_s(), 1), "train_tokens": state.train_tokens,
                                   "time_s": round(time.perf_counter() - t_start, 2)})
                    window_loss, window_steps = 0.0, 0
                improved = False
                if validation and settings.eval_steps and (step % settings.eval_steps == 0 or step == total_steps):
                    val_loss, _ = evaluate_loss(model, validation, pad_id, batch_size=settings.eval_batch_size,
                                                packing=settings.packing, fast=fast, device=device,
                                                dist=dist)
                    record = {"step": step, "val_loss": round(val_loss, 6), "val_ppl": round(math.exp(min(val_loss, 50)), 4)}
                    if on_eval:
                        record.update(on_eval(step))
                    metrics.write(record)
                    progress.note(f"step {step}: validation loss {val_loss:.4f}  perplexity {record['val_ppl']:.2f}")
                    if state.best_val_loss is None or val_loss < state.best_val_loss:
                        state.best_val_loss, state.best_step = val_loss, step
                        state.evals_without_improvement = 0
                        improved = True
                    else:
                        state.evals_without_improvement += 1
                want_save = (settings.save_steps and step % settings.save_steps == 0) or improved
                if want_save:
                    path = save(step, new_best=improved)
                    if improved:
                        best_ckpt = path
                if settings.patience and state.evals_without_improvement >= settings.patience:
                    progress.note(f"early stop at step {step}: no improvement in {settings.patience} evaluations")
                    stopped_early = True
                    break
                if stop_after is not None and step >= stop_after:
                    break
    except KeyboardInterrupt:
        if current_step > 0 and (last_ckpt is None or not last_ckpt.name.endswith(f"{current_step:06d}")):
            state.step = current_step
            save(current_step)
        where = last_ckpt or run_dir
        raise TrainingInterrupted(f"interrupted at step {current_step}; checkpoint saved",
                                  file=where, hint=f"continue with: loratune train --resume {run_dir}") from None
    except torch.OutOfMemoryError:
        raise LoratuneError(f"out of memory at step {current_step + 1}", key="training.batch_size",
                            hint="lower training.batch_size (raise grad_accum to keep the batch), shorten "
                                 "data.max_length, or load the base in 4-bit (quantization.bits: 4)") from None
    state.wall_time_s = time.perf_counter() - t_start
    if last_ckpt is None or not last_ckpt.name.endswith(f"{state.step:06d}"):
        save(state.step)
    return LoopResult(state, stopped_early, last_ckpt, best_ckpt, peak_memory_gib(str(device)))
