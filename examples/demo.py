"""`make demo`: fine-tune the embedded SmolLM2-135M-Instruct on GSM8K and show answers before and after.

Runs `loratune train examples/smollm2-demo.yaml`, then asks the base model and the fine-tuned one the same three
held-back questions (greedy, the run's own template) and prints them side by side.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "smollm2-demo.yaml"
console = Console()


def main() -> int:
    t0 = time.time()
    cmd = [sys.executable, "-m", "loratune.cli", "train", str(CONFIG), "--overwrite"]
    console.print(f"[bold]$ loratune train {CONFIG.relative_to(ROOT)} --overwrite")
    if subprocess.call(cmd, cwd=ROOT) != 0:
        return 1
    run_dir = ROOT / "runs" / "smollm2-demo"

    from loratune.data.conversation import Message
    from loratune.generate import SamplingSettings, generate_batch, load_for_inference

    held_back = [json.loads(line) for line in (ROOT / "data/gsm8k/train.head400.jsonl").read_text().splitlines()[397:400]]
    questions = [[Message("user", row["question"])] for row in held_back]
    settings = SamplingSettings(max_new_tokens=120)
    tuned = load_for_inference(run_dir, device="cpu")
    base = load_for_inference("smollm2-135m-instruct", device="cpu")
    base_answers = generate_batch(base, questions, settings, batch_size=3)
    tuned_answers = generate_batch(tuned, questions, settings, batch_size=3)

    table = Table(title="held-back GSM8K questions: base vs fine-tuned (greedy)", show_lines=True)
    table.add_column("question", max_width=40)
    table.add_column("base SmolLM2-135M-Instruct", max_width=45)
    table.add_column("fine-tuned (LoRA, 40 steps)", max_width=45)
    table.add_column("reference", max_width=12)
    for row, b, t in zip(held_back, base_answers, tuned_answers):
        table.add_row(row["question"][:160] + ("..." if len(row["question"]) > 160 else ""), b, t, row["answer"].split("####")[-1].strip())
    console.print(table)
    summary = json.loads((run_dir / "summary.json").read_text())
    drop = 1 - summary["final_loss"] / summary["first_loss"]
    console.print(f"loss: first {summary['first_loss']:.3f} -> final {summary['final_loss']:.3f} ({drop:.0%} lower); "
                  f"best validation loss {summary['best_val_loss']:.3f} at step {summary['best_step']}")
    console.print(f"loss curve: {summary['loss_png']}")
    console.print(f"adapter:    {summary['adapter']}")
    console.print(f"demo finished in {time.time() - t0:.0f} s")
    differ = sum(b != t for b, t in zip(base_answers, tuned_answers))
    if drop < 0.2 or differ < 3:
        console.print(f"[red]demo check failed: loss drop {drop:.0%} (want >= 20%), {differ}/3 answers differ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
