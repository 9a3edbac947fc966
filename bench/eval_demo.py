"""Timing acceptance of `loratune eval` (issue 6): the demo run vs its base on 100 unseen GSM8K problems.

    .venv/bin/python bench/eval_demo.py [--examples 100] [--threads N] [--dtype auto|bf16] [--batch-size 16]

Needs `runs/smollm2-demo` (`make demo`). The demo trained on train[:160] and validated on train[390:400], so
train[300:400] holds 100 problems it never trained on. Runs the real command line once, then prints the wall time,
the load average around it and the CPU seconds used (the machine is shared: a busy CPU slows everything), the
metrics and the two checks: under 5 minutes, and the fine-tuned model's answer perplexity below the base model's.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "runs" / "smollm2-demo"
LIMIT_S = 300.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--split", default="train[300:400]")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    if not (RUN / "adapter").is_dir():
        print(f"{RUN} is missing: run `make demo` first", file=sys.stderr)
        return 2
    out = RUN / "eval"
    cmd = [sys.executable, "-m", "loratune.cli", "eval", str(RUN), "--data", "data/gsm8k/train.head400.jsonl",
           "--split", args.split, "--max-examples", str(args.examples), "--batch-size", str(args.batch_size),
           "--max-new-tokens", str(args.max_new_tokens), "--dtype", args.dtype, "--output", str(out)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print("$ " + " ".join(cmd[2:]).replace(str(ROOT) + "/", ""), flush=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    code = subprocess.call(cmd, cwd=ROOT)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    # CPU seconds the command used: on a machine shared with other jobs, wall time / CPU time shows how much of
    # the wall time was spent waiting for a core rather than computing.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    if code != 0:
        return code
    metrics = json.loads((out / "metrics.json").read_text())
    tuned, base = (metrics["metrics"][label] for label in metrics["models"])
    print(f"\nwall time {wall:.1f} s for {metrics['examples']} examples x 2 models on {os.cpu_count()} cores "
          f"(load average {load_before[0]:.1f} before, {load_after[0]:.1f} after); {cpu:.1f} CPU seconds used "
          f"({cpu / wall:.2f} cores busy on average)")
    for label, m in metrics["metrics"].items():
        print(f"  {label:>28}: perplexity {m['answer_perplexity']:.3f} over {m['answer_tokens']} answer tokens "
              f"({m['seconds']['perplexity']:.0f} s), generation {m['seconds']['generate']:.0f} s, "
              f"GSM8K accuracy {m.get('gsm8k_accuracy', float('nan')):.1f}, token F1 {m['token_f1']:.1f}")
    fast = wall < LIMIT_S
    better = tuned["answer_perplexity"] < base["answer_perplexity"]
    print(f"check: under {LIMIT_S:.0f} s: {'yes' if fast else 'NO'}; fine-tuned perplexity below base: "
          f"{'yes' if better else 'NO'} ({tuned['answer_perplexity']:.3f} vs {base['answer_perplexity']:.3f})")
    print(f"report: {out / 'report.md'}")
    return 0 if fast and better else 1


if __name__ == "__main__":
    sys.exit(main())
