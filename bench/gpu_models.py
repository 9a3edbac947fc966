"""Phi-2-config random model through loratune's own loader: 4-bit and 8-bit load + 10 LoRA training steps each.

Builds Phi-2 from its published config (hidden 2560, 32 layers, 32 heads, intermediate 10240, vocab 51200, partial
rotary 0.4) with random weights and a synthetic word-level tokenizer (throughput and memory do not depend on the
values), loads it with `loratune.models.load.load_model` + `loratune.models.lora.add_lora` (k-bit preparation,
gradient checkpointing, the Phi-2 LoRA targets), and trains with loratune's answer-token loss `loss_sum`.
Prints one JSON line per variant: measured peak memory (CUDA: max allocated; CPU: peak RSS above the process
before loading), loratune's estimate for the same settings, median step time, and the device name.

    PYTHONPATH=src python3 bench/gpu_models.py                     # GPU: Phi-2 config, 4-bit and 8-bit
    PYTHONPATH=src python3 bench/gpu_models.py --tiny              # CPU smoke test on a 2-layer Phi config
    PYTHONPATH=src python3 bench/gpu_models.py --model smollm2-135m-instruct --variants none --batch 2 --seq 256 \
        --steps 3                                                   # CPU: estimate vs measured on the real model
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "baselines"))
from seed_recipe_gpu import PHI2, save_synthetic_tokenizer  # noqa: E402  the recipe's model and tokenizer

TINY_PHI = dict(PHI2, vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4)


def build_random_phi(path: Path, config: dict, device: str) -> Path:
    """Save a random-weight Phi model (bf16 on CUDA, fp32 on CPU) + tokenizer, once."""
    from transformers import PhiConfig, PhiForCausalLM

    if (path / "tokenizer_config.json").is_file():
        return path
    torch.manual_seed(0)
    with torch.device(device):
        model = PhiForCausalLM(PhiConfig(**config))
    if device == "cuda":
        model = model.to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    save_synthetic_tokenizer(path, config["vocab_size"])
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc; no psutil needed on the GPU machine)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident memory every few ms (CPU has no allocator statistics like CUDA's)."""

    def __init__(self) -> None:
        self.peak = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.002)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def synthetic_batch(vocab: int, batch: int, seq: int, device: str, seed: int) -> dict[str, torch.Tensor]:
    """Random tokens; the first half of each row is a prompt (label -100), the second half the answer."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def run_variant(model_dir: str, bits: int | str, args: argparse.Namespace, device: str) -> dict:
    import peft  # noqa: F401  (imported before the memory baseline: library code is not training memory)
    from transformers import AutoModelForCausalLM  # noqa: F401

    from loratune.config import LoraConfig, ModelConfig, QuantizationConfig
    from loratune.models.inspect import training_estimate
    from loratune.models.load import load_model
    from loratune.models.lora import add_lora, count_parameters
    from loratune.training.loss import loss_sum

    lora = LoraConfig(r=args.r, alpha=2 * args.r, dropout=0.05)
    cuda = device == "cuda"
    gc.collect()  # the previous variant's model is gone before this one's baseline
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss = PeakRSS()
    before = rss.peak
    with rss:
        t0 = time.perf_counter()
        loaded = load_model(ModelConfig(base=model_dir, device=device, gradient_checkpointing=True),
                            QuantizationConfig(bits=bits))
        load_s = time.perf_counter() - t0
        model = add_lora(loaded.model, lora, quantized=loaded.quantized, gradient_checkpointing=True)
        model.train()  # transformers only checkpoints (and drops out) in training mode
        trainable, total = count_parameters(model)
        loaded_bytes = torch.cuda.memory_allocated() if cuda else resident_bytes() - before
        rss.peak = resident_bytes()  # the load's own transient peak (file pages, copies) is not training
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        vocab = model.config.vocab_size
        times, losses = [], []
        for step in range(args.steps):
            batch = synthetic_batch(vocab, args.batch, args.seq, device, seed=step)
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            loss, n = loss_sum(model, batch)
            (loss / n).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            losses.append(loss.item() / n)
    estimate = training_estimate(loaded.model.config, lora, batch_size=args.batch, seq_len=args.seq, bits=bits,
                                 dtype=loaded.dtype, gradient_checkpointing=True)
    peak = torch.cuda.max_memory_allocated() if cuda else rss.peak - before
    training_part = estimate.total - estimate.weights
    result = {
        "variant": f"{bits}-bit" if bits != "none" else "full",
        "model": args.model or ("phi2-tiny-random" if args.tiny else "phi2-random"),
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "lora_r": args.r,
        "peak_memory_gib": round(peak / 2**30, 3),
        "peak_kind": "cuda_max_allocated" if cuda else "process_rss_above_start",
        "estimated_gib": round(estimate.total / 2**30, 3),
        "loaded_gib": round(loaded_bytes / 2**30, 3), "estimated_weights_gib": round(estimate.weights / 2**30, 3),
        "step_peak_above_loaded_gib": round((peak - loaded_bytes) / 2**30, 3),
        "estimated_step_gib": round(training_part / 2**30, 3),
        "median_step_s": round(statistics.median(times[1:] if len(times) > 1 else times), 4),
        "load_s": round(load_s, 1),
        "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
        "trainable_parameters": trainable, "total_parameters": total,
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
    }
    del model, loaded, optimizer
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="A 2-layer Phi config (CPU smoke test).")
    parser.add_argument("--model", help="Bench this model (alias/folder) instead of the random Phi-2.")
    parser.add_argument("--variants", default="4,8", help="Comma-separated bit widths: 4, 8, none.")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dir", default=None, help="Where to save the random model (default: a temp folder).")
    args = parser.parse_args()
    # bitsandbytes warns on every 8-bit matmul of fp32 inputs (CPU); once is enough to know.
    warnings.filterwarnings("once", message="MatMul8bitLt")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.model:
        model_dir = args.model
    else:
        folder = Path(args.dir or tempfile.gettempdir()) / ("phi2-tiny-random" if args.tiny else "phi2-random")
        model_dir = str(build_random_phi(folder, TINY_PHI if args.tiny else PHI2, device))
    for text in args.variants.split(","):
        bits: int | str = int(text) if text.strip().isdigit() else "none"
        print(json.dumps(run_variant(model_dir, bits, args, device)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
