"""The CPU acceptance run for the training engine (about 3 minutes on 2 cores): LoRA on the embedded SmolLM2-135M
with validation every few steps, then checks that loss.png has both curves and that adapter/ is the checkpoint
with the lowest validation loss.

    python bench/cpu_curves.py                                   # examples/smollm2-evalcurve.yaml -> runs/
    python bench/cpu_curves.py --set training.max_steps=60       # any config override

Prints the summary numbers as JSON (wall time, tokens/s, peak RSS, best validation loss and step) for
BENCHMARKS.md. Never run by CI.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file

from loratune.config import load_config
from loratune.train import train

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "examples" / "smollm2-evalcurve.yaml"))
    p.add_argument("--set", action="append", default=[], dest="overrides", help="key=value config override")
    a = p.parse_args()
    cfg = load_config(a.config, overrides=a.overrides)
    if not Path(cfg.data.path).is_absolute():  # the example's data path is relative to the repository
        cfg.data.path = str(REPO / cfg.data.path)
    result = train(cfg)
    run, summary = result.run_dir, result.summary
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    best_step, best_loss = min(val, key=lambda sv: sv[1])
    best = load_file(str(run / "checkpoints" / f"step-{best_step:06d}" / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    same = all(bool((best[k] == final[k]).all()) for k in best)
    report = {
        "run": str(run), "steps": summary["steps"], "stopped_early": summary["stopped_early"],
        "wall_time_s": summary["wall_time_s"], "train_tokens": summary["train_tokens"],
        "tokens_per_s": summary["tokens_per_s"], "peak_memory_gib": summary["peak_memory_gib"],
        "first_loss": summary["first_loss"], "final_loss": summary["final_loss"],
        "validation": [{"step": s, "val_loss": v} for s, v in val],
        "best_step": best_step, "best_val_loss": best_loss, "adapter_is_best_checkpoint": same,
        "loss_png": str(run / "loss.png"),
    }
    print(json.dumps(report, indent=2))
    if not same or summary["best_step"] != best_step or len(val) < 2:
        raise SystemExit("acceptance failed: adapter/ is not the best checkpoint by validation loss")


if __name__ == "__main__":
    main()
