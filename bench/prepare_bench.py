"""`loratune prepare` wall time on the OASST1 sample with the embedded SmolLM2 tokenizer (issue 3 acceptance: < 30 s
on the 2-core machine), cold (empty tokenized cache) and warm (cache hit), for each OASST1 mode.

    python bench/prepare_bench.py                 # prints a Markdown table

Each run is a fresh `loratune prepare` process, as a user's would be, so the times include Python and
transformers start-up. Every case gets its own empty data cache (`LORATUNE_DATA_CACHE`); the converted model
stays in the usual cache, since converting the GGUF once is not part of preparing data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OASST1 = REPO.parent / "shared" / "data" / "oasst1" / "oasst1_validation_en.shared.jsonl"
CASES = {
    "best_path, multi-turn": ["data.oasst1.mode=best_path"],
    "best_path, first exchange only": ["data.oasst1.mode=best_path", "data.oasst1.multi_turn=false"],
    "pairs": ["data.oasst1.mode=pairs"],
}


def run(config: Path, out: Path, overrides: list[str], env: dict[str, str]) -> float:
    cmd = [sys.executable, "-m", "loratune.cli", "prepare", str(config), "--out", str(out)]
    for item in overrides:
        cmd += ["--set", item]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="prepare-bench-"))
    config = work / "oasst1.yaml"
    config.write_text(f"model: {{base: smollm2-135m-instruct}}\ndata: {{path: {OASST1}, max_length: auto}}\n")
    print("| OASST1 mode | cold (s) | warm (s) | examples | max_length (auto) |\n|---|---:|---:|---:|---:|")
    for i, (name, overrides) in enumerate(CASES.items()):
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "LORATUNE_DATA_CACHE": str(work / f"cache-{i}")}
        out = work / f"out-{i}"
        cold = run(config, out, overrides, env)
        warm = run(config, out, overrides, env)
        meta = json.loads((out / "meta.json").read_text())
        print(f"| {name} | {cold:.1f} | {warm:.1f} | {meta['stats']['train']['count']} | {meta['max_length']} |")


if __name__ == "__main__":
    main()
