"""CPU throughput bench: the notebook recipe vs loratune on the embedded SmolLM2-135M-Instruct (never run by CI).

Workload (the CPU recipe's, `baselines/seed_recipe_cpu.py`): LoRA r=16 alpha=32 dropout 0.05 on all attention
and MLP projections, fp32, batch 4, example lengths uniform in 64..512 (seed 0), every token labelled, 12 steps
with the first 2 excluded. The recipe runs twice (padded to 512, and padded per batch); loratune runs its own
recipe code (load_model, add_lora, apply_speed, loss_sum, AdamW) on packed micro-batches, without activation
recomputation (a 135M model's activations fit in memory, so recomputing them only costs time).

The CPU is shared with other work, so variants run back to back in rounds (recipe, ours, recipe, ours, ...) and
the report gives ratios within each round as well as the medians.

    python bench/cpu_bench.py --rounds 2          # writes bench/cpu_results.jsonl and prints a table
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAXLEN, BS, MINLEN = 512, 4, 64
# The recipe's 12 steps (2 warm-up) unless overridden: on a CPU shared with other work, fewer steps per variant and
# more interleaved rounds give better ratios for the same time.
STEPS = int(os.environ.get("CPU_BENCH_STEPS", 12))
WARMUP = int(os.environ.get("CPU_BENCH_WARMUP", 2))


def lengths() -> list[int]:
    rnd = random.Random(0)  # the CPU recipe's lengths
    return [rnd.randint(MINLEN, MAXLEN) for _ in range(BS * STEPS * 2)]


def run_ours(overrides: list[str]) -> dict:
    import torch

    from loratune.config import _set_dotted, parse_override, validate
    from loratune.data.batching import collate
    from loratune.data.tokenize import Example
    from loratune.models.load import convert_gguf, gguf_path_for_alias, load_model
    from loratune.models.lora import add_lora
    from loratune.speed import apply_speed
    from loratune.train import seed_everything
    from loratune.training.loss import loss_sum
    from loratune.training.optim import build_optimizer, build_scheduler

    raw = {
        "model": {"base": str(convert_gguf(gguf_path_for_alias("smollm2-135m-instruct"))), "device": "cpu",
                  "dtype": "fp32", "gradient_checkpointing": False},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "auto"},
        "data": {"max_length": MAXLEN, "packing": True},
        "training": {"max_steps": STEPS, "batch_size": BS, "learning_rate": 2e-4, "scheduler": "linear", "seed": 42},
    }
    for item in overrides:
        _set_dotted(raw, *parse_override(item))
    cfg = validate(raw)
    seed_everything(cfg.training.seed)
    loaded = load_model(cfg.model, cfg.quantization)
    seed_everything(cfg.training.seed)
    model = add_lora(loaded.model, cfg.lora, quantized=False, gradient_checkpointing=cfg.model.gradient_checkpointing)
    plan = apply_speed(model, cfg.speed, device="cpu", dtype=loaded.dtype)
    optimizer = build_optimizer(model, cfg.training, "cpu")
    scheduler = build_scheduler(optimizer, cfg.training, STEPS)
    lens = lengths()
    examples = []
    for i, n in enumerate(lens[: BS * STEPS]):
        ids = torch.randint(0, 49152, (n,), generator=torch.Generator().manual_seed(i)).tolist()
        examples.append(Example(ids, list(ids)))
    model.train()
    times, losses, real = [], [], []
    for step in range(STEPS):
        batch = collate(examples[step * BS : (step + 1) * BS], loaded.tokenizer.pad_token_id,
                        packing=cfg.data.packing)
        t0 = time.perf_counter()
        s, n = loss_sum(model, batch, fast=cfg.training.fast_path)
        (s / n).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(s.detach() / n))
        real.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel())
    t = sum(times[WARMUP:])
    return dict(variant="ours", overrides=overrides, speed_applied=plan.applied, step_s=round(t / (STEPS - WARMUP), 2),
                real_tokens_per_s=round(sum(real[WARMUP:]) / t, 1), loss_last=round(losses[-1], 4),
                threads=torch.get_num_threads())


def child(args: list[str]) -> dict | None:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line.split(" ", 1)[1])
    print(f"--- {' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-2000:]}", flush=True)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["ours"], default=None)
    p.add_argument("--set", action="append", default=[], help="config override for ours, e.g. data.packing=false")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default="recipe_pad512,ours,recipe_dynamic",
                   help="comma list: recipe_pad512, ours, recipe_dynamic, ours-cpu-bf16")
    p.add_argument("--out", default=str(HERE / "cpu_results.jsonl"))
    a = p.parse_args()
    if a.only == "ours":
        print("RESULT " + json.dumps(run_ours(a.set)), flush=True)
        return
    me, recipe = str(Path(__file__).resolve()), str(HERE / "baselines" / "seed_recipe_cpu.py")
    rows = []
    for r in range(a.rounds):
        variants = {"recipe_pad512": [recipe, "max"], "ours": [me, "--only", "ours"], "recipe_dynamic": [recipe, "dyn"],
                    "ours-cpu-bf16": [me, "--only", "ours", "--set", "speed.cpu_bf16=true"]}
        for name in a.variants.split(","):
            args = variants[name]
            res = child(args)
            if res is None:
                continue
            res.update(variant=name, round=r, date=time.strftime("%Y-%m-%d %H:%M"), cpu_count=os.cpu_count())
            print(json.dumps(res), flush=True)
            rows.append(res)
            with open(a.out, "a") as f:
                f.write(json.dumps(res) + "\n")
    by = {}
    for row in rows:
        by.setdefault(row["variant"], []).append(row["real_tokens_per_s"])
    best_recipe = max(statistics.median(by.get(k, [0])) for k in ("recipe_pad512", "recipe_dynamic"))
    print(f"\n{'variant':28s} {'median real tok/s':>18s} {'runs':>20s} {'x best recipe':>14s}")
    for name, vals in by.items():
        med = statistics.median(vals)
        print(f"{name:28s} {med:18.1f} {str(vals):>20s} {med / best_recipe if best_recipe else float('nan'):14.2f}")


if __name__ == "__main__":
    main()
