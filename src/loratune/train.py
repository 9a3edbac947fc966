"""The fine-tuning recipe, top to bottom: config -> data -> model -> LoRA -> loop -> adapter + summary.

Each step lives in its own module; this file only wires them, so it reads like the algorithm.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loratune.config import Config, dump_config, load_config
from loratune.data.batching import total_steps as count_steps
from loratune.data.prepare import PreparedData, prepare
from loratune.data.templates import Template, resolve_template
from loratune.data.tokenize import preflight
from loratune.models.inspect import training_estimate
from loratune.models.load import LoadedModel, context_length, load_model, resolve_device
from loratune.models.lora import add_lora, count_parameters
from loratune.plots import loss_curve
from loratune.runs import MetricsLog, atomic_path, new_run_dir, write_json_atomic, write_text_atomic
from loratune.speed import apply_speed
from loratune.training import checkpoint as ckpt
from loratune.training.distributed import DistContext, check_batch, init_distributed, shard_model, shutdown
from loratune.training.loop import LoopSettings, fit
from loratune.training.optim import build_optimizer, build_scheduler
from loratune.training.progress import console
from loratune.training.tracking import NullTracker, check_report_to, open_tracker


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict[str, Any]
    model: Any  # the trained peft model, in memory (tests compare it with the saved adapter)
    tokenizer: Any
    template: Template


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _log(text: str) -> None:
    console.print(text)


def train(cfg: Config, *, resume: str | Path | None = None, show_progress: bool = True,
          stop_after: int | None = None) -> TrainResult:
    """Run one fine-tune described by `cfg`; with `resume`, continue a run from its newest checkpoint."""
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    resume_from: Path | None = None
    if resume is not None:
        resume_from = ckpt.find_resume_checkpoint(resume)
        run_dir = resume_from.parent.parent
        cfg = load_config(run_dir / "config.yaml")  # the run's own config, so the data order matches
    check_report_to(cfg.training.report_to)
    # Data-parallel: one process per GPU (or CPU process over gloo) when launched by --nproc/torchrun/accelerate.
    dist = init_distributed(resolve_device(cfg.model.device), cfg.training.distributed)
    check_batch(dist, cfg.training.batch_size)
    if resume_from is not None and dist.is_main:
        ckpt.clean_partial(run_dir / "checkpoints")  # a save killed midway left a .tmp-* folder: never resumed from
    seed_everything(cfg.training.seed)

    # 1. model and tokenizer
    loaded = load_model(cfg.model, cfg.quantization)
    tokenizer = loaded.tokenizer
    template = resolve_template(cfg.data.template, tokenizer, getattr(loaded.model.config, "model_type", None), log=_log)

    # 2. data
    data = prepare(cfg.data, tokenizer, template, seed=cfg.training.seed, model_max=context_length(loaded.model),
                   log=_log, cache=True)  # the tokenized-dataset cache: a rerun skips tokenization
    sample = preflight(data.train, tokenizer, where=cfg.data.path or "data")
    _report_data(data, sample)
    if resume_from is None:  # named only now, so a bad config, model or data leaves no empty run folder behind;
        # rank 0 names the run folder, the others learn it
        run_dir = dist.broadcast(new_run_dir(cfg.output.dir, cfg.output.name or "run", overwrite=cfg.output.overwrite)
                                 if dist.is_main else None)

    # 3. adapter
    seed_everything(cfg.training.seed)  # LoRA init independent of how much randomness loading used
    model = add_lora(loaded.model, cfg.lora, quantized=loaded.quantized,
                     gradient_checkpointing=cfg.model.gradient_checkpointing)
    # Under FSDP the fused LoRA node would read 4-bit weights that FSDP swapped for gathered copies without their
    # quant_state; the other speed levers go through module forwards and stay on. The activation offload wraps the
    # compiled layer calls that FSDP's own hooks surround, and a CUDA graph cannot record FSDP's collectives: both off.
    speed_cfg = (cfg.speed.model_copy(update={"fused_lora": False, "offload_activations": False, "cuda_graphs": False})
                 if dist.fsdp else cfg.speed)
    speed = apply_speed(model, speed_cfg, device=loaded.device, dtype=loaded.dtype)
    if speed.applied:
        _log(f"speed: {', '.join(speed.applied)}")
    trainable, total = count_parameters(model)
    _log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    _log(training_estimate(loaded.model.config, cfg.lora, batch_size=cfg.training.batch_size,
                           seq_len=data.max_length, bits=cfg.quantization.bits, dtype=loaded.dtype,
                           gradient_checkpointing=cfg.model.gradient_checkpointing,
                           double_quant=cfg.quantization.double_quant,
                           trust_remote_code=cfg.model.trust_remote_code).one_line())
    if dist.enabled:  # same LoRA init on every rank (seeded above), different dropout masks from here on
        torch.manual_seed(cfg.training.seed + dist.rank)

    # 4. resumed weights, FSDP sharding, optimizer, schedule, resumed optimizer/scheduler/RNG state
    steps = count_steps(len(data.train.examples), cfg.training.batch_size, cfg.training.grad_accum,
                        epochs=cfg.training.epochs, max_steps=cfg.training.max_steps)
    if resume_from is not None:  # before sharding, so every rank loads the full LoRA weights
        _load_adapter(model, resume_from)
    if dist.fsdp:
        shard_model(model, loaded.dtype)
    optimizer = build_optimizer(model, cfg.training, loaded.device)
    scheduler = build_scheduler(optimizer, cfg.training, steps)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    state = ckpt.TrainerState()
    if resume_from is not None:
        state = _restore(model, optimizer, scheduler, resume_from, metrics, dist)
        _log(f"resuming from {resume_from} (step {state.step} of {steps})")
    elif dist.is_main:
        write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
        write_json_atomic(run_dir / "template.json", template.to_dict())
        write_json_atomic(run_dir / "data_stats.json", data.stats)
    tracker = (open_tracker(cfg.training.report_to, run_dir, metrics, config=cfg.model_dump(),
                            resume_step=state.step if resume_from is not None else None)
               if dist.is_main else NullTracker())

    # 5. the loop
    settings = LoopSettings(
        batch_size=cfg.training.batch_size, grad_accum=cfg.training.grad_accum, epochs=cfg.training.epochs,
        max_steps=cfg.training.max_steps, seed=cfg.training.seed, max_grad_norm=cfg.training.max_grad_norm,
        logging_steps=cfg.training.logging_steps, eval_steps=cfg.training.eval_steps,
        save_steps=cfg.training.save_steps, save_total_limit=cfg.training.save_total_limit,
        patience=cfg.training.patience, packing=cfg.data.packing, fast_path=cfg.training.fast_path,
        eval_batch_size=max(cfg.training.batch_size, 8),
    )
    validation = data.validation.examples if data.validation else None
    if cfg.training.eval_steps and not validation:
        _log("[yellow]training.eval_steps is set but there is no validation data; evaluation is skipped[/]")
    on_eval = None  # training.eval_generate_every: a greedy token-F1 probe logged beside the validation loss
    if cfg.training.eval_generate_every and validation:
        from loratune.evaluate.during_training import generation_probe

        if not cfg.training.eval_steps:
            _log("[yellow]training.eval_generate_every runs at evaluations: set training.eval_steps too[/]")
        on_eval = generation_probe(model, tokenizer, template, data.validation_conversations,
                                   every=cfg.training.eval_generate_every, total_steps=steps, device=loaded.device)
    if torch.cuda.is_available() and loaded.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if speed.graphs is not None and cfg.data.packing and cfg.training.fast_path:  # (never set under FSDP)
        t0 = time.perf_counter()
        model.train()
        recorded, longest = speed.graphs.prepare_for([len(e.input_ids) for e in data.train.examples],
                                                     cfg.training.batch_size)
        _log(f"cuda graphs: {recorded} packed lengths recorded, rows up to {longest} tokens "
             f"({time.perf_counter() - t0:.0f} s, compilation included)")
    try:
        result = fit(model, optimizer, scheduler, data.train.examples, validation, settings,
                     pad_id=tokenizer.pad_token_id, device=loaded.device, run_dir=run_dir, state=state,
                     total_steps=steps, metrics=tracker, show_progress=show_progress, stop_after=stop_after, dist=dist,
                     on_eval=on_eval)
    finally:
        tracker.close()

    # 6. outputs (rank 0): best (or last) adapter, summary, plot
    finished = stop_after is None or result.state.step >= steps or result.stopped_early
    if finished and dist.is_main:
        summary = _finish(run_dir, cfg, loaded, model, tokenizer, template, result, metrics, steps, trainable)
        summary["processes"] = dist.world_size
        write_json_atomic(run_dir / "summary.json", summary)
    else:
        summary = {"stopped_after": result.state.step} if not finished else {"rank": dist.rank}
    shutdown(dist)
    return TrainResult(run_dir, summary, model, tokenizer, template)


def _load_adapter(model: Any, folder: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(folder / "adapter" / "adapter_model.safetensors")))


def _restore(model: Any, optimizer: Any, scheduler: Any, folder: Path, metrics: MetricsLog,
             dist: DistContext) -> ckpt.TrainerState:
    ckpt.load_training_state(folder, optimizer, scheduler, rank=dist.rank,
                             load_optimizer=lambda sd: dist.load_optimizer_state_dict(model, optimizer, sd))
    state = ckpt.load_state(folder)
    if dist.is_main:
        metrics.truncate_after(state.step)
    dist.barrier()  # nobody logs before rank 0 has cut metrics.jsonl back to the checkpoint
    return state


def _report_data(data: PreparedData, sample: str) -> None:
    n_train = len(data.train.examples)
    n_val = len(data.validation.examples) if data.validation else 0
    _log(f"data: {n_train} training examples, {n_val} validation, max_length {data.max_length}, "
         f"{data.train.n_truncated} truncated")
    for reason, origins in data.train.dropped.items():
        _log(f"[yellow]dropped {len(origins)} examples: {reason} (first: {origins[0]})[/]")
    shown = sample if len(sample) < 1500 else sample[:1500] + " ..."
    _log("one training example (⟦masked prompt⟧, answer tokens trained):")
    console.print(shown, markup=False, highlight=False)


def _finish(run_dir: Path, cfg: Config, loaded: LoadedModel, model: Any, tokenizer: Any, template: Template,
            result: Any, metrics: MetricsLog, steps: int, trainable: int) -> dict[str, Any]:
    state = result.state
    last = result.last_checkpoint
    best = result.best_checkpoint or last
    with atomic_path(run_dir / "checkpoints" / "last") as tmp:
        shutil.copytree(last, tmp)
    with atomic_path(run_dir / "adapter") as tmp:
        shutil.copytree(best / "adapter", tmp)
        tokenizer.save_pretrained(tmp)  # chat template and pad fix travel with the adapter
        (tmp / "loratune_template.json").write_text(json.dumps(template.to_dict(), indent=2))
    if best is not last:
        _log(f"adapter/: best checkpoint by validation loss, step {state.best_step} ({state.best_val_loss:.4f})")
    records = metrics.read()
    loss_curve(records, run_dir / "loss.png", title=f"{run_dir.name}: {cfg.model.base}")
    train_losses = [r["loss"] for r in records if "loss" in r]
    summary = {
        "run": str(run_dir),
        "base_model": cfg.model.base,
        "steps": state.step,
        "planned_steps": steps,
        "stopped_early": result.stopped_early,
        "wall_time_s": round(state.wall_time_s, 2),
        "train_tokens": state.train_tokens,
        "tokens_per_s": round(state.train_tokens / max(state.wall_time_s, 1e-9), 1),
        "peak_memory_gib": round(result.peak_memory_gib, 3),
        "peak_memory_kind": "cuda" if loaded.device == "cuda" else "process_rss",
        "first_loss": train_losses[0] if train_losses else None,
        # One logged step is noisy (a batch of short answers scores low); the mean of the last five is the
        # honest "final" figure.
        "final_loss": round(sum(train_losses[-5:]) / len(train_losses[-5:]), 6) if train_losses else None,
        "best_val_loss": state.best_val_loss,
        "best_step": state.best_step,
        "trainable_parameters": trainable,
        "device": torch.cuda.get_device_name() if loaded.device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "adapter": str(run_dir / "adapter"),
        "loss_png": str(run_dir / "loss.png"),
    }
    write_json_atomic(run_dir / "summary.json", summary)
    _summary_table(summary)
    return summary


def _summary_table(summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="training summary", show_header=False)
    for key in ("steps", "wall_time_s", "train_tokens", "tokens_per_s", "peak_memory_gib", "first_loss", "final_loss",
                "best_val_loss", "best_step", "device", "adapter", "loss_png"):
        value = summary.get(key)
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) and key.endswith("loss") else str(value))
    console.print(table)


__all__ = ["train", "TrainResult"]
