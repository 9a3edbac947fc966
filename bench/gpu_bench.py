"""GPU throughput bench: the notebook recipe, Unsloth and loratune on one synthetic QLoRA workload, one device call.

Workload (issue 9): Phi-2 config (or TinyLlama's ~1B shape) with random weights, NF4 double-quant, bf16 compute,
LoRA r=32 alpha=64, batch 4, example lengths uniform in 128..1024 (`baselines/seed_recipe_gpu.lengths`, seed 0),
every token labelled. The recipe pads every example to 1024; Unsloth runs its recommended settings; loratune runs
its own recipe code (models.load.load_model with the 4-bit config, models.lora.add_lora, speed.apply_speed,
training.optim, and the training loop's `accumulate`, which replays CUDA graphs, or training.loss.loss_sum when
they are off) on packed, padding-free micro-batches. As `loratune train` does, the graphs of every packed length are
recorded before the first step; that recording's memory is reported as the phase `graphs_recording`.

    python3 bench/gpu_bench.py --arch phi2 --variants ours,ours-no-graphs --no-probe   # ~6 min; table last
    python3 bench/gpu_bench.py --arch phi2 --steps 12 --warmup 4 --baselines "" --variants ours-no-compile,...
    python3 bench/gpu_bench.py --only ours --arch phi2 --set speed.compile=off --profile 2   # torch.profiler tables
    python3 bench/gpu_bench.py --only probe                     # what the device's torch/transformers offer

Needs on the device: bitsandbytes (+ pydantic, rich) on PYTHONPATH, `bench/baselines` on PYTHONPATH, and for
Unsloth its wheels installed into a separate folder named by $UNSLOTH_SITE (see BENCHMARKS.md for the commands).
Each variant runs in its own process (Unsloth patches transformers at import; peak memory stays per variant).
Results go to $OUT/results.jsonl (one JSON per variant) and a table is printed last. All variants together take
longer than one 10-minute device call: split them as above.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "baselines"))
OUT = Path(os.environ.get("OUT", "/tmp/loratune-bench"))
RESULTS = OUT / "results.jsonl"  # the baseline scripts append here too
PEAK_TFLOPS = 989e12  # H100 SXM dense bf16 datasheet: the baseline scripts' MFU denominator

# Ablations: one lever off at a time from the default (everything on).
ABLATIONS = {
    "ours": [],
    "ours-no-compile": ["speed.compile=off"],
    "ours-no-compile-no-fused-lora": ["speed.compile=off", "speed.fused_lora=false"],
    "ours-no-compile-no-varlen": ["speed.compile=off", "speed.varlen_attention=false"],
    "ours-no-compile-no-fused-ce": ["speed.compile=off", "speed.fused_cross_entropy=false"],
    "ours-no-compile-fp32-frozen": ["speed.compile=off", "speed.compute_dtype_frozen=false"],
    "ours-no-compile-autocast": ["speed.compile=off", "speed.autocast=true"],
    "ours-no-compile-padded": ["speed.compile=off", "data.packing=false"],
    # The micro-batch replayed as CUDA graphs (speed.graphs), packed rows padded to multiples of 256 or 512 tokens.
    "ours-no-graphs": ["speed.cuda_graphs=false"],
    "ours-no-graphs-no-offload": ["speed.cuda_graphs=false", "speed.offload_activations=false"],
    "ours-graphs-b512": ["speed.bucket_tokens=512"],
    "ours-ce256": ["speed.ce_chunk_tokens=256"],
    "ours-nodrop": ["lora.dropout=0"],
    "ours-no-offload": ["speed.offload_activations=false"],
    "ours-no-fold": ["speed.folded_lora=false"],
    "ours-mlp2": ["speed.mlp_chunks=2"],
    "ours-mlp4": ["speed.mlp_chunks=4"],
    "ours-ce512": ["speed.ce_chunk_tokens=512"],
    "ours-all-off": ["speed.compile=off", "speed.varlen_attention=false", "speed.fused_cross_entropy=false",
                     "speed.fused_lora=false", "speed.compute_dtype_frozen=false", "data.packing=false"],
}


def record(res: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    print("RESULT " + json.dumps(res), flush=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(res) + "\n")


def bench_config(arch: str, path: str, steps: int, overrides: list[str]):
    """The loratune Config a user would write for this workload (what `loratune train` would run)."""
    from loratune.config import _set_dotted, parse_override, validate

    raw = {
        "model": {"base": path, "device": "cuda", "dtype": "bf16", "gradient_checkpointing": True},
        "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16"},
        "lora": {"r": 32, "alpha": 64, "dropout": 0.05, "target_modules": "auto"},
        "data": {"max_length": 1024, "packing": True},
        # The recipe's Trainer defaults: AdamW (torch), linear decay, no warm-up, clip at 1.0.
        "training": {"max_steps": steps, "batch_size": 4, "learning_rate": 2e-4, "scheduler": "linear",
                     "max_grad_norm": 1.0, "seed": 42},
    }
    for item in overrides:
        _set_dotted(raw, *parse_override(item))
    return validate(raw)


def run_ours(a: argparse.Namespace) -> None:
    import seed_recipe_gpu as recipe
    import torch

    from loratune.data.batching import collate
    from loratune.data.tokenize import Example
    from loratune.models.load import load_model
    from loratune.models.lora import add_lora, count_parameters
    from loratune.speed import apply_speed, pad_to_bucket
    from loratune.speed.optimizer_graph import OptimizerStep
    from loratune.train import seed_everything
    from loratune.training.loop import accumulate
    from loratune.training.loss import loss_sum
    from loratune.training.optim import build_optimizer, build_scheduler

    path = f"/tmp/{a.arch}-random"
    recipe.make_model_dir(a.arch, path)
    cfg = bench_config(a.arch, path, a.steps, a.set)
    t_setup = time.perf_counter()
    # --- exactly train.train's model setup ---
    seed_everything(cfg.training.seed)
    loaded = load_model(cfg.model, cfg.quantization)
    seed_everything(cfg.training.seed)
    model = add_lora(loaded.model, cfg.lora, quantized=loaded.quantized,
                     gradient_checkpointing=cfg.model.gradient_checkpointing)
    if a.no_dropout:  # every dropout module (LoRA's and the model's own) off: a bisection aid
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    for item in a.functorch:  # torch._functorch.config overrides, e.g. graphsafe_rng_functionalization=0
        key, value = item.split("=")
        import torch._functorch.config as functorch_config

        setattr(functorch_config, key, bool(int(value)))
    for item in a.inductor:  # torch._inductor.config overrides, e.g. combo_kernels=1 (exploration only)
        import torch._inductor.config as inductor_config

        key, value = item.split("=")
        setattr(inductor_config, key, type(getattr(inductor_config, key))(int(value)))
    plan = apply_speed(model, cfg.speed, device=loaded.device, dtype=loaded.dtype)
    trainable, _ = count_parameters(model)
    optimizer = build_optimizer(model, cfg.training, loaded.device)
    if a.foreach_adam:  # the multi-tensor (foreach) AdamW instead of the fused one: an A/B of that choice
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=True,
                                      lr=cfg.training.learning_rate, weight_decay=cfg.training.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.training, a.steps)
    on = plan.graphs is not None
    update = OptimizerStep(optimizer, [p for p in model.parameters() if p.requires_grad], cfg.training.max_grad_norm,
                           graphs=on and not a.eager_update, keep_grads=on)
    setup_s = time.perf_counter() - t_setup

    # --- the same synthetic data as the recipe and Unsloth: lengths(seed 0), tokens seeded by example index ---
    vocab = model.config.vocab_size
    lens = recipe.lengths(a.steps * a.bs * 2, a.minlen, a.maxlen)
    examples = []
    for i, n in enumerate(lens[: a.steps * a.bs]):
        ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(i)).tolist()
        examples.append(Example(ids, list(ids)))
    pad_id = loaded.tokenizer.pad_token_id

    nbase = sum(p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
                for n, p in model.named_parameters() if "lora_" not in n)  # 4-bit weights at their logical size
    n_lin = nbase - vocab * model.config.hidden_size
    model.train()
    torch.cuda.reset_peak_memory_stats()
    mem_weights = torch.cuda.memory_allocated()  # 4-bit base, head, embeddings, LoRA weights
    mem_states = None  # + AdamW states (after the first step)

    def stance():  # --skip-guards: Dynamo's guard evaluation off once every shape path has compiled
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True) if a.skip_guards and step >= 1 \
            else nullcontext()

    peaks = {"forward": 0, "backward": 0, "optimizer": 0}
    prepare_s = None
    if plan.graphs is not None:  # as train.train does: record every packed length before the first step
        t_prep = time.perf_counter()
        recorded, _ = plan.graphs.prepare_for(lens[: a.steps * a.bs], a.bs)
        prepare_s = round(time.perf_counter() - t_prep, 1)
        peaks["graphs_recording"] = torch.cuda.max_memory_allocated()  # what the replays' memory pool holds
        print(f"cuda graphs: {recorded} lengths recorded in {prepare_s} s (compilation included)", flush=True)

    def phase_peak(phase: str) -> None:
        peaks[phase] = max(peaks[phase], torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()

    times, losses, real, processed, captured_at, split_ms = [], [], [], [], [], []
    events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]

    def real_tokens(b: dict) -> int:
        return int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()

    first_step_s = None
    profiler = None
    for step in range(a.steps):
        if a.profile and step == a.warmup:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                          torch.profiler.ProfilerActivity.CUDA])
            profiler.__enter__()
        if profiler is not None and step == a.warmup + a.profile:
            profiler.__exit__(None, None, None)
            print(f"=== profile {a.name}: {a.profile} steps, by CUDA time")
            print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=70, max_name_column_width=110))
            print(f"=== profile {a.name}: by CPU self time")
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=60, max_name_column_width=60))
            profiler = None
        captures_before = plan.graphs.captures if plan.graphs is not None else 0
        cpu_batch = collate(examples[step * a.bs : (step + 1) * a.bs], pad_id, packing=cfg.data.packing)
        batch = {k: v.to("cuda", non_blocking=True) for k, v in cpu_batch.items()}
        torch.cuda.synchronize()
        mem_before_step = torch.cuda.memory_allocated()
        if a.memory_snapshot and step == a.warmup:  # the allocator's history of this one step (bench/memory_peak.py)
            torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
        t0 = time.perf_counter()
        torch.cuda.reset_peak_memory_stats()  # peaks per phase: which part of the step sets the peak
        events[0].record()
        with stance():
            if plan.graphs is not None:  # the training loop's own micro-batch call (CUDA graph replay inside)
                loss, _ = accumulate(model, [cpu_batch], device="cuda", fast=cfg.training.fast_path)
            else:
                s, n = loss_sum(model, batch, fast=cfg.training.fast_path)
                loss = s / max(n, 1)
                phase_peak("forward")
                loss.backward()
            phase_peak("backward")
        events[1].record()
        update()  # the training loop's clip + AdamW + zero_grad (one CUDA graph replay when graphs are on)
        scheduler.step()
        phase_peak("optimizer")
        events[2].record()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        # GPU time of the micro-batch (forward + loss + backward, or its replay) and of clip + AdamW + zeroing; the
        # rest of the step's wall time is the host's (launches, the batch copy, the loss read-back).
        split_ms.append((events[0].elapsed_time(events[1]), events[1].elapsed_time(events[2]), dt * 1e3))
        if a.memory_snapshot and step == a.warmup:
            import pickle

            from memory_peak import report

            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            (OUT / "memory_snapshot.pickle").write_bytes(pickle.dumps(snap))
            print(f"=== memory of step {step} ({real_tokens(batch)} tokens); before it: "
                  f"{mem_before_step / 2**30:.3f} GiB allocated\n{report(snap)}", flush=True)
        if plan.graphs is not None and plan.graphs.captures > captures_before:
            captured_at.append(step)  # this step ran eagerly and recorded a new packed length
        if step == 0:
            first_step_s = dt
            mem_states = torch.cuda.memory_allocated()
        times.append(dt)
        losses.append(float(loss))
        real.append(real_tokens(batch))
        # speed.bucket_tokens pads the packed row inside loss_sum: count the tokens actually computed.
        bucket = plan.graphs.bucket if plan.graphs is not None else plan.bucket_tokens
        processed.append(pad_to_bucket(batch, bucket)["input_ids"].numel() if bucket else batch["input_ids"].numel())
    w = a.warmup
    t = sum(times[w:])
    med = [sorted(x[i] for x in split_ms[w:])[len(split_ms[w:]) // 2] for i in range(3)]
    split = dict(micro_batch_gpu_ms=round(med[0], 2), optimizer_gpu_ms=round(med[1], 2), step_wall_ms=round(med[2], 2))
    real_tps = sum(real[w:]) / t
    proc_tps = sum(processed[w:]) / t
    replayed = [i for i in range(w, a.steps) if i not in captured_at]  # steps that only replayed a CUDA graph
    graphs = None if plan.graphs is None else dict(
        captures=plan.graphs.captures, captured_at_steps=captured_at,
        tokens_per_s_real_replay_steps=round(sum(real[i] for i in replayed) / max(sum(times[i] for i in replayed),
                                                                                  1e-9)))
    from torch._dynamo.utils import counters

    from loratune.speed.attention import PATH_COUNTS

    compiled = dict(graph_breaks=sum(counters["graph_break"].values()),
                    unique_graphs=counters["stats"].get("unique_graphs", 0))
    record(dict(compiled=compiled,
        attention_paths=dict(PATH_COUNTS), variant=a.name, arch=a.arch, overrides=a.set, speed_applied=plan.applied, step_s=round(t / (a.steps - w), 4),
        tokens_per_s_real=round(real_tps), tokens_per_s_processed=round(proc_tps),
        peak_mem_gib=round(max(peaks.values()) / 2**30, 3),
        peak_by_phase_gib={k: round(v / 2**30, 3) for k, v in peaks.items()},
        mem_weights_gib=round(mem_weights / 2**30, 3), mem_with_adam_gib=round(mem_states / 2**30, 3),
        max_step_tokens=max(real), step_split_median=split, cuda_graphs=graphs, graphs_prepare_s=prepare_s,
        max_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3), skip_guards=a.skip_guards, inductor=a.inductor, foreach_adam=a.foreach_adam,
        optimizer_graph=update.graph is not None,
        mfu_processed_vs_989=round(proc_tps * 4 * n_lin / PEAK_TFLOPS, 3),
        mfu_6n_real_vs_989=round(real_tps * 6 * n_lin / PEAK_TFLOPS, 3),
        loss_last=round(losses[-1], 4), loss_last5=round(sum(losses[-5:]) / len(losses[-5:]), 4),
        first_step_s=round(first_step_s, 2), setup_s=round(setup_s, 1), steps=a.steps, warmup=w,
        trainable=trainable, base_params=nbase, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
    ))


def probe() -> None:
    import importlib.util
    import inspect

    import torch
    import transformers

    info = {"variant": "probe", "torch": torch.__version__, "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    try:
        from torch.nn.attention.varlen import varlen_attn
        info["varlen_attn"] = str(inspect.signature(varlen_attn))
    except ImportError as e:
        info["varlen_attn"] = f"missing: {e}"
    for mod in ("bitsandbytes", "flash_attn", "liger_kernel", "unsloth", "triton", "pydantic", "rich", "yaml"):
        info[mod] = importlib.util.find_spec(mod) is not None
    record(info)


def ceiling() -> None:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / 20
    record(dict(variant="matmul_ceiling", tflops=round(2 * 8192**3 / dt / 1e12, 1), gpu=torch.cuda.get_device_name()))


def child(args: list[str], timeout: int, extra_path: str | None = None) -> None:
    """Run one variant in a fresh process; a crash or timeout is reported and the bench goes on."""
    t = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if extra_path:  # Unsloth's wheels (trl, torchao, ...) stay out of the other variants' imports
        env["PYTHONPATH"] = extra_path + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run([sys.executable, *args], timeout=timeout, env=env, capture_output=True, text=True)
        # faulthandler's list of extension modules after a crash would push its stack out of the tail
        out = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                         if not line.startswith("Extension modules"))
        tail = out[-3000:]
        if proc.returncode != 0:
            print(f"--- {' '.join(args)} failed (rc {proc.returncode}):\n{tail}", flush=True)
        else:
            print(f"--- {' '.join(args)}: {time.perf_counter() - t:.0f} s", flush=True)
            print("\n".join(line for line in tail.splitlines() if "RESULT" in line or "Error" in line), flush=True)
    except subprocess.TimeoutExpired:
        print(f"--- {' '.join(args)} timed out after {timeout} s", flush=True)


def table(arch: str) -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.exists() else []
    rows = [r for r in rows if "tokens_per_s_real" in r and (r.get("arch") or r["variant"].split("_")[1]) == arch]
    recipe = next((r for r in rows if r["variant"].startswith(f"recipe_{arch}")), None)
    unsloth = next((r for r in rows if r["variant"].startswith("unsloth_")), None)
    print(f"\n{arch}: real tok/s, padded (processed) tok/s, step s, peak GiB, MFU (4N x processed / 989 TF), "
          f"loss@last, ratios vs recipe / Unsloth")
    print(f"{'variant':28s} {'real':>7s} {'proc':>7s} {'step_s':>7s} {'GiB':>6s} {'MFU':>6s} {'loss':>8s} "
          f"{'x recipe':>8s} {'x unsloth':>9s}")
    for r in rows:
        x_rec = r["tokens_per_s_real"] / recipe["tokens_per_s_real"] if recipe else float("nan")
        x_uns = r["tokens_per_s_real"] / unsloth["tokens_per_s_real"] if unsloth else float("nan")
        mfu = r.get("mfu_processed_vs_989", float("nan"))
        print(f"{r['variant']:28s} {r['tokens_per_s_real']:7d} {r.get('tokens_per_s_processed', 0):7d} "
              f"{r['step_s']:7.3f} {r['peak_mem_gib']:6.2f} {mfu:6.3f} {r.get('loss_last') or float('nan'):8.4f} "
              f"{x_rec:8.2f} {x_uns:9.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="phi2", choices=["phi2", "llama1b"])
    p.add_argument("--only", default=None, help="ours | recipe | unsloth | probe | ceiling | table")
    p.add_argument("--name", default="ours")
    p.add_argument("--variants", default=",".join(ABLATIONS), help="comma list of ablation names for the driver")
    p.add_argument("--baselines", default="recipe,unsloth", help="comma list: recipe, unsloth (or empty)")
    p.add_argument("--set", action="append", default=[], help="config override, e.g. speed.compile=off")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--minlen", type=int, default=128)
    p.add_argument("--maxlen", type=int, default=1024)
    p.add_argument("--timeout", type=int, default=240, help="seconds per variant")
    p.add_argument("--no-probe", action="store_true", help="skip the environment probe and the matmul ceiling")
    p.add_argument("--no-dropout", action="store_true", help="with --only ours: set every dropout to 0")
    p.add_argument("--functorch", action="append", default=[], help="with --only ours: torch._functorch.config k=0/1")
    p.add_argument("--skip-guards", action="store_true", help="with --only ours: skip Dynamo guard evaluation "
                   "after the first step (torch.compiler.set_stance skip_guard_eval_unsafe)")
    p.add_argument("--eager-update", action="store_true", help="with --only ours: clip + AdamW + zero_grad run "
                   "eagerly even when the micro-batch replays as a CUDA graph (an A/B of speed.optimizer_graph)")
    p.add_argument("--foreach-adam", action="store_true", help="with --only ours: foreach AdamW, not fused")
    p.add_argument("--inductor", action="append", default=[], help="with --only ours: torch._inductor.config k=int")
    p.add_argument("--profile", type=int, default=0, help="with --only ours: profile this many steps after warm-up")
    p.add_argument("--memory-snapshot", action="store_true", help="with --only ours: record the allocator's history "
                   "of the first timed step, write $OUT/memory_snapshot.pickle, print what is live at its peak")
    a = p.parse_args()
    if a.only == "ours":
        return run_ours(a)
    if a.only == "probe":
        return probe()
    if a.only == "ceiling":
        return ceiling()
    if a.only == "table":
        return table(a.arch)
    me = str(Path(__file__).resolve())
    common = ["--steps", str(a.steps), "--minlen", str(a.minlen), "--maxlen", str(a.maxlen)]
    if not a.no_probe:
        child([me, "--only", "probe"], 120)
        child([me, "--only", "ceiling"], 120)
    for base in filter(None, a.baselines.split(",")):
        if base == "recipe":
            child([str(HERE / "baselines" / "seed_recipe_gpu.py"), "--arch", a.arch, "--name", f"recipe_{a.arch}",
                   "--bs", str(a.bs), *common], a.timeout)
        elif base == "unsloth":
            child([str(HERE / "baselines" / "unsloth_gpu.py"), "--arch", a.arch, "--bs", str(a.bs), *common], a.timeout,
                  extra_path=os.environ.get("UNSLOTH_SITE"))
    for name in filter(None, a.variants.split(",")):
        sets = [x for s in ABLATIONS[name] for x in ("--set", s)]
        child([me, "--only", "ours", "--arch", a.arch, "--name", name, "--bs", str(a.bs), "--warmup",
               str(a.warmup), *common, *sets], a.timeout)
    table(a.arch)


if __name__ == "__main__":
    main()
