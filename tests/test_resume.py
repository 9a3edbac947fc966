"""Killed and resumed equals uninterrupted: a real SIGKILL of `loratune train`, then `--resume`, ends with the
same adapter weights as a run that was never stopped (CPU fp32, LoRA dropout on so the RNG state matters).
Also: a save killed midway is never resumed from, and two runs with one seed give identical adapters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from loratune.cli import app
from loratune.config import dump_config
from loratune.train import train
from loratune.training.checkpoint import find_resume_checkpoint, list_checkpoints
from tests.conftest import REPO, tiny_run_config


def resumable_config(model_dir: Path, data: Path, out: Path, name: str, **training):
    """Tiny CPU run (fp32 weights) with dropout (so RNG matters), one thread (bit-for-bit), checkpoints every 2 steps.

    80 steps (about 2 s) leave a wide window to kill the subprocess in, even on a loaded machine.
    """
    t = dict(max_steps=80, batch_size=4, grad_accum=2, save_steps=2, save_total_limit=2, num_threads=1,
             report_to="none", warmup_steps=3)
    t.update(training)
    cfg = tiny_run_config(model_dir, data, out, **t)
    cfg.lora.dropout = 0.1
    cfg.output.name = name
    return cfg


def write_config(cfg, path: Path) -> Path:
    path.write_text(dump_config(cfg))
    return path


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + str(REPO), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return env


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tmp_path_factory):
    """The uninterrupted run every resumed run must match."""
    from tests.conftest import write_jsonl

    tmp = tmp_path_factory.mktemp("reference")
    data = write_jsonl(tmp / "qa.jsonl")
    result = train(resumable_config(tiny_llama_dir, data, tmp / "runs", "ref"), show_progress=False)
    return data, adapter_weights(result.run_dir / "adapter")


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited (rc {proc.returncode}) before the kill point")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("kill point not reached in time")
        time.sleep(0.002)


def test_sigkill_then_resume_matches_uninterrupted(reference, tiny_llama_dir, tmp_path):
    data, expected = reference
    cfg = resumable_config(tiny_llama_dir, data, tmp_path / "runs", "killed")
    config = write_config(cfg, tmp_path / "killed.yaml")
    run = tmp_path / "runs" / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "loratune.cli", "train", str(config)], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def mid_run() -> bool:  # step 4 is logged and a complete checkpoint exists
        metrics = run / "metrics.jsonl"
        return metrics.exists() and '"step": 4,' in metrics.read_text() and bool(list_checkpoints(run / "checkpoints"))

    wait_for(mid_run, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists() and not (run / "adapter").exists()  # really killed mid-run
    killed_at = int(find_resume_checkpoint(run).name.split("-")[1])
    assert 2 <= killed_at < 80

    result = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 80
    assert max_abs_diff(adapter_weights(run / "adapter"), expected) < 1e-6
    # metrics.jsonl has every step exactly once, even though the killed run may have logged past its checkpoint
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 81))


KILL_IN_THIRD_SAVE = """
import os, sys, torch
from loratune.training import checkpoint
real_save, calls = torch.save, []
def dying_save(obj, f, *args, **kwargs):
    # the adapter of this checkpoint is already written; die before its optimizer state and state.json
    calls.append(f)
    if len(calls) == 3:
        os._exit(9)
    return real_save(obj, f, *args, **kwargs)
checkpoint.torch.save = dying_save
from loratune.cli import main
sys.argv = ["loratune", "train", sys.argv[1]]
main()
"""


def test_kill_during_save_is_never_resumed_and_is_cleaned(reference, tiny_llama_dir, tmp_path):
    data, expected = reference
    config = write_config(resumable_config(tiny_llama_dir, data, tmp_path / "runs", "torn"), tmp_path / "torn.yaml")
    run = tmp_path / "runs" / "torn"
    proc = subprocess.run([sys.executable, "-c", KILL_IN_THIRD_SAVE, str(config)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 9, proc.stderr[-2000:]
    ckpts = run / "checkpoints"
    leftovers = sorted(p.name for p in ckpts.iterdir() if p.name.startswith(".tmp-"))
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-step-000006-")
    half = next(ckpts.glob(".tmp-*/step-000006"))
    assert (half / "adapter" / "adapter_model.safetensors").exists() and not (half / "state.json").exists()
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-000002", "step-000004"]
    assert find_resume_checkpoint(run).name == "step-000004"

    result = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and "step-000004" in result.output
    assert not list(ckpts.glob(".tmp-*")) and not list(ckpts.glob(".old-*"))
    assert max_abs_diff(adapter_weights(run / "adapter"), expected) < 1e-6


def test_same_seed_same_adapter_other_seed_differs(reference, tiny_llama_dir, tmp_path):
    data, _ = reference

    def run(name: str, seed: int) -> dict[str, torch.Tensor]:
        cfg = resumable_config(tiny_llama_dir, data, tmp_path / "runs", name, max_steps=6, seed=seed)
        return adapter_weights(train(cfg, show_progress=False).run_dir / "adapter")

    first = run("a", 0)
    assert max_abs_diff(run("b", 0), first) == 0.0
    assert max_abs_diff(run("c", 1), first) > 1e-3


def test_resume_from_nothing_is_one_clear_line(tmp_path):
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path)])
    assert result.exit_code != 0
    assert "no complete checkpoint to resume from" in str(result.exception)
