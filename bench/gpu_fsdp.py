"""FSDP + QLoRA throughput: the Phi-2-config model (random weights, 4-bit NF4 base) trained with loratune's own
FSDP path (training/distributed.py: FSDP2 per decoder layer, 4-bit storage in bf16) on 1 GPU and on 2 GPUs.

Weak scaling: every GPU gets the same micro-batch (batch x seq_len tokens), so tokens/s per GPU on 2 GPUs against
1 GPU shows what sharding + gradient reduce-scatter cost. The loss is normalised by the global answer-token count
(loop.accumulate), exactly as `loratune train` does.

    PYTHONPATH=src python3 bench/gpu_fsdp.py --gpus 1,2 --steps 20           # on a 2-GPU machine
    PYTHONPATH=src python bench/gpu_fsdp.py --tiny --gpus 1,2 --steps 3      # CPU processes over gloo (a check)

Results: one JSON line per configuration in $OUT/gpu_fsdp.jsonl (or ./gpu_fsdp.jsonl), and a Markdown table on
stdout for BENCHMARKS.md. Never run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "baselines"))
from seed_recipe_gpu import PHI2, save_synthetic_tokenizer  # noqa: E402  the recipe's model and tokenizer

# Same architecture, small enough for two CPU processes: hidden 128 keeps whole 4-bit blocks (blocksize 64).
PHI_TINY = dict(PHI2, vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, resid_pdrop=0.0)


def make_model_dir(path: Path, tiny: bool) -> Path:
    from transformers import PhiConfig, PhiForCausalLM

    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    with torch.device(device):
        model = PhiForCausalLM(PhiConfig(**(PHI_TINY if tiny else PHI2)))
    model.to(torch.float32 if tiny else torch.bfloat16).save_pretrained(path)
    save_synthetic_tokenizer(path, model.config.vocab_size)
    return path


def worker(a: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    from loratune.config import LoraConfig, QuantizationConfig
    from loratune.data.tokenize import IGNORE
    from loratune.models.load import bnb_config
    from loratune.models.lora import add_lora
    from loratune.training.distributed import init_distributed, shard_model, shutdown
    from loratune.training.loop import accumulate

    cuda = not a.tiny
    dist = init_distributed("cuda" if cuda else "cpu", "fsdp")
    dtype = torch.bfloat16 if cuda else torch.float32
    # 4-bit storage dtype = compute dtype (bnb_config does this) so FSDP can shard the packed weights.
    qconfig = bnb_config(QuantizationConfig(bits=4), dtype)
    device_map = {"": dist.local_rank} if cuda else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=qconfig, device_map=device_map,
                                                 dtype=dtype, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = add_lora(model, LoraConfig(r=a.lora_r, alpha=2 * a.lora_r, dropout=0.05), quantized=True,
                     gradient_checkpointing=a.gc)
    if dist.enabled:
        shard_model(model, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    device = f"cuda:{dist.local_rank}" if cuda else "cpu"
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1000 + dist.rank)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(a.steps):
        ids = torch.randint(4, vocab, (a.batch, a.seq_len), generator=g)
        labels = ids.clone()
        labels[:, : a.seq_len // 4] = IGNORE  # a prompt quarter, as in question-answer data
        batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = accumulate(model, [batch], device=device, fast=False, dist=dist)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    warm = min(a.warmup, a.steps - 1)
    step_s = sum(times[warm:]) / len(times[warm:])
    tokens_per_gpu = a.batch * a.seq_len / step_s
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    peaks = dist.gather(round(peak, 2))
    if dist.is_main:
        result = dict(model="phi-2 config (random)" if not a.tiny else "phi tiny (random)", quant="nf4",
                      gpus=dist.world_size, device=torch.cuda.get_device_name() if cuda else "cpu (gloo)",
                      batch_per_gpu=a.batch, seq_len=a.seq_len, lora_r=a.lora_r, gradient_checkpointing=a.gc,
                      steps=a.steps, step_s=round(step_s, 4), tokens_per_s_per_gpu=round(tokens_per_gpu, 1),
                      tokens_per_s_total=round(tokens_per_gpu * dist.world_size, 1), peak_mem_gib_per_gpu=peaks,
                      first_loss=round(losses[0], 4), last_loss=round(losses[-1], 4), torch=torch.__version__)
        print("RESULT " + json.dumps(result), flush=True)
    shutdown(dist)


def driver(a: argparse.Namespace) -> None:
    model = make_model_dir(Path(a.model), a.tiny)
    out = Path(os.environ.get("OUT", ".")) / "gpu_fsdp.jsonl"
    rows = []
    for n in [int(x) for x in a.gpus.split(",")]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
               "--worker", "--model", str(model), "--steps", str(a.steps), "--batch", str(a.batch),
               "--seq-len", str(a.seq_len), "--lora-r", str(a.lora_r), "--gc", str(int(a.gc)), "--warmup", str(a.warmup),
               *(["--tiny"] if a.tiny else [])]
        env = dict(os.environ)
        if a.tiny:
            env["OMP_NUM_THREADS"] = "1"
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{n} process(es) failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        row = json.loads(lines[-1][len("RESULT "):])
        rows.append(row)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
    base = rows[0]["tokens_per_s_per_gpu"]
    print("| GPUs | step s | tokens/s per GPU | tokens/s total | vs 1 GPU per GPU | peak GiB per GPU | loss first -> last |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['gpus']} | {r['step_s']} | {r['tokens_per_s_per_gpu']:,.0f} | {r['tokens_per_s_total']:,.0f} | "
              f"{r['tokens_per_s_per_gpu'] / base:.2f}x | {r['peak_mem_gib_per_gpu']} | "
              f"{r['first_loss']} -> {r['last_loss']} |")
    print(f"results appended to {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", default="1,2", help="process counts to compare, e.g. 1,2")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    p.add_argument("--batch", type=int, default=4, help="sequences per GPU per step")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--gc", type=int, default=1, help="gradient checkpointing (1/0)")
    p.add_argument("--tiny", action="store_true", help="tiny Phi on CPU processes over gloo (checks the path)")
    p.add_argument("--model", default=None, help="model folder (created once; default /tmp/phi2-random[-tiny])")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.model is None:
        a.model = "/tmp/phi2-random-tiny" if a.tiny else "/tmp/phi2-random"
    if a.tiny and not a.worker:
        a.seq_len, a.batch = min(a.seq_len, 64), min(a.batch, 2)
    worker(a) if a.worker else driver(a)


if __name__ == "__main__":
    main()
