"""The optimisation loop: accumulate, step, log, evaluate, checkpoint, stop early, survive SIGINT.

Everything it needs comes in as plain objects; it knows nothing of config files or run-folder naming beyond
the paths it is given.
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
from loratune.runs import MetricsLog
from loratune.training import checkpoint as ckpt
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
                  fast: bool, device: Any) -> tuple[float, int]:
    """Mean NLL per answer token over `examples` (and the token count)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[i : i + batch_size], pad_id, packing=packing), device)
        s, n = loss_sum(model, batch, fast=fast)
        total += float(s)
        count += n
    if was_training:
        model.train()
    return total / max(count, 1), count


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
    metrics: MetricsLog,
    on_eval: Callable[[int], dict[str, float]] | None = None,
    show_progress: bool = True,
    stop_after: int | None = None,
) -> LoopResult:
    """Train from `state.step` to `total_steps` (or `stop_after`, for tests that stop mid-run)."""
    checkpoints = run_dir / "checkpoints"
    best_ckpt: Path | None = None
    last_ckpt: Path | None = None
    if state.best_step is not None and (checkpoints / f"step-{state.best_step:06d}").is_dir():
        best_ckpt = checkpoints / f"step-{state.best_step:06d}"
    stopped_early = False
    model.train()
    t_start = time.perf_counter() - state.wall_time_s
    window_loss, window_tokens, window_real = 0.0, 0, 0

    def save(step: int) -> Path:
        nonlocal last_ckpt
        state.wall_time_s = time.perf_counter() - t_start
        last_ckpt = ckpt.save_checkpoint(checkpoints / f"step-{step:06d}", model, optimizer, scheduler, state)
        ckpt.prune(checkpoints, settings.save_total_limit, protect=best_ckpt)
        return last_ckpt

    progress = TrainProgress(total_steps, state.step, enabled=show_progress)
    current_step = state.step
    try:
        with progress:
            for step, _epoch, window in schedule(len(train), settings.batch_size, settings.grad_accum, settings.seed,
                                                 epochs=settings.epochs, max_steps=settings.max_steps):
                if step <= state.step:
                    continue  # resumed: this step is already in the checkpoint
                current_step = step - 1
                batches = [collate([train[i] for i in mb], pad_id, packing=settings.packing) for mb in window]
                # Normalise by the answer tokens of the whole accumulation window (exact gradient accumulation).
                window_targets = sum(n_target_tokens(b) for b in batches)
                step_loss = 0.0
                step_real = 0
                for batch in batches:
                    step_real += n_real_tokens(batch)
                    s, _ = loss_sum(model, to_device(batch, device), fast=settings.fast_path)
                    loss = s / max(window_targets, 1)
                    loss.backward()
                    step_loss += float(loss.detach())
                if settings.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(
                        [p for p in model.parameters() if p.requires_grad], settings.max_grad_norm
                    )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step = step
                current_step = step
                state.train_tokens += step_real
                window_loss += step_loss
                window_tokens += 1
                window_real += step_real
                lr = scheduler.get_last_lr()[0]
                progress.update(step, step_loss, step_real, lr)
                if step % settings.logging_steps == 0 or step == total_steps:
                    metrics.write({"step": step, "loss": round(window_loss / window_tokens, 6), "lr": lr,
                                   "tokens_per_s": round(progress.tokens_per_s(), 1), "train_tokens": state.train_tokens,
                                   "time_s": round(time.perf_counter() - t_start, 2)})
                    window_loss, window_tokens, window_real = 0.0, 0, 0
                improved = False
                if validation and settings.eval_steps and (step % settings.eval_steps == 0 or step == total_steps):
                    val_loss, _ = evaluate_loss(model, validation, pad_id, batch_size=settings.eval_batch_size,
                                                packing=settings.packing, fast=settings.fast_path, device=device)
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
                    path = save(step)
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
