"""Fault injection: `loratune train` is SIGKILLed five times at seeded random steps, resumed after each kill, and ends
with the same adapter as a run that was never stopped (max abs diff < 1e-6: CPU fp32, one thread, LoRA dropout on
so the saved RNG state matters).

A kill lands either in the middle of a training step (after the previous step's checkpoint is complete) or in the
middle of writing a checkpoint (its adapter is written, its optimizer state and state.json are not). After every
kill: every complete checkpoint loads, no `step-*` folder is incomplete, a checkpoint killed mid-save exists only as
a `.tmp-*` sibling, and `--resume` picks the newest complete checkpoint, never the partial one.

The kill is a real SIGKILL (uncatchable, no cleanup runs); the training process sends it to itself at the chosen
point, so the test does not depend on how fast a loaded machine runs the steps.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO, write_jsonl

STEPS = 24
KILLS = 5
SEED = 3  # kills: (6, save) (9, step) (13, step) (19, save) (20, save)

# Runs `loratune ARGS...` with a SIGKILL armed at step KILL_STEP: "step" kills inside the next step's forward pass
# after checkpoint KILL_STEP is complete; "save" kills while checkpoint KILL_STEP is being written.
KILLER = """
import os, signal, sys
kill_step, phase = int(sys.argv[1]), sys.argv[2]
from loratune.training import checkpoint, loop

real_save, real_accumulate, armed = checkpoint.save_checkpoint, loop.accumulate, []

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def save_checkpoint(folder, model, optimizer, scheduler, state, *args, **kwargs):
    if phase == "save" and state.step == kill_step:
        def dying_torch_save(*a, **k):  # the adapter is on disk; the optimizer state and state.json are not
            die()
        checkpoint.torch.save = dying_torch_save
    path = real_save(folder, model, optimizer, scheduler, state, *args, **kwargs)
    if phase == "step" and state.step == kill_step:
        armed.append(True)
    return path

def accumulate(*args, **kwargs):
    if armed:
        die()
    return real_accumulate(*args, **kwargs)

checkpoint.save_checkpoint = save_checkpoint
loop.accumulate = accumulate
sys.argv = ["loratune", *sys.argv[3:]]
from loratune.cli import main
main()
"""


def run_config(model_dir: Path, data: Path, out: Path, name: str) -> dict:
    return {
        "model": {"base": str(model_dir), "device": "cpu", "dtype": "fp32", "gradient_checkpointing": False},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"path": str(data), "max_length": 128, "template": "chatml"},
        "training": {"max_steps": STEPS, "batch_size": 4, "grad_accum": 2, "learning_rate": 5e-3, "warmup_steps": 2,
                     "save_steps": 1, "save_total_limit": 2, "seed": 0, "num_threads": 1, "report_to": "none"},
        "output": {"dir": str(out), "name": name},
    }


def kill_plan(seed: int = SEED) -> list[tuple[int, str]]:
    """Five (step, phase) pairs at distinct, increasing, seeded random steps."""
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(2, STEPS - 1), KILLS))
    return [(step, rng.choice(("step", "save"))) for step in steps]


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def check_checkpoints(run: Path) -> list[int]:
    """Every step-* folder is complete and loads; returns their steps."""
    from loratune.training.checkpoint import STEP_RE, is_complete, load_state

    steps = []
    for folder in sorted((run / "checkpoints").glob("step-*")):
        assert STEP_RE.match(folder.name) and is_complete(folder), f"half-written checkpoint {folder}"
        state = load_state(folder)
        assert f"step-{state.step:06d}" == folder.name
        weights = adapter(folder / "adapter")
        assert weights and all(torch.isfinite(w).all() for w in weights.values())
        blob = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=False)
        assert {"optimizer", "scheduler", "rng"} <= set(blob)
        json.loads((folder / "adapter" / "adapter_config.json").read_text())
        steps.append(state.step)
    return steps


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    """The data, and the adapter of the uninterrupted reference run (in-process)."""
    from loratune.config import validate
    from loratune.train import train

    root = tmp_path_factory.mktemp("fault")
    data = write_jsonl(root / "qa.jsonl")
    result = train(validate(run_config(tiny_llama_dir, data, root / "runs", "reference")), show_progress=False)
    return root, data, adapter(result.run_dir / "adapter")


def test_kill_plan_is_seeded_and_covers_both_phases():
    plan = kill_plan()
    assert plan == kill_plan() and len({s for s, _ in plan}) == KILLS
    assert {p for _, p in plan} == {"step", "save"}  # the seed gives kills mid-step and mid-save


def test_five_sigkills_then_resume_equals_uninterrupted(setup, tiny_llama_dir, capsys, monkeypatch):
    from loratune import cli
    from loratune.training.checkpoint import find_resume_checkpoint

    root, data, expected = setup
    config = root / "killed.yaml"
    config.write_text(yaml.safe_dump(run_config(tiny_llama_dir, data, root / "runs", "killed")))
    run = root / "runs" / "killed"
    killer = root / "killer.py"
    killer.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1",
           "LORATUNE_DATA_CACHE": str(root / "data-cache")}
    resumed_from = 0
    for i, (kill_step, phase) in enumerate(kill_plan()):
        args = ["train", str(config)] if i == 0 else ["train", "--resume", str(run)]
        proc = subprocess.run([sys.executable, str(killer), str(kill_step), phase, *args], env=env, cwd=root,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        steps = check_checkpoints(run)
        newest = find_resume_checkpoint(run)
        partial = list((run / "checkpoints").glob(".tmp-*"))
        if phase == "save":  # died mid-save: only a .tmp-* sibling, never resumed from
            assert partial and f"step-{kill_step:06d}" not in [p.name for p in (run / "checkpoints").iterdir()]
            assert newest.name == f"step-{kill_step - 1:06d}"
        else:
            assert newest.name == f"step-{kill_step:06d}"
        assert steps[-1] == int(newest.name.split("-")[1]) > resumed_from
        assert not (run / "summary.json").exists() and not (run / "adapter").exists()
        resumed_from = steps[-1]

    monkeypatch.setattr(sys, "argv", ["loratune", "train", "--resume", str(run)])
    monkeypatch.setenv("LORATUNE_DATA_CACHE", str(root / "data-cache"))
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 0, capsys.readouterr().err[-2000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS
    assert not list((run / "checkpoints").glob(".tmp-*")) and not list((run / "checkpoints").glob(".old-*"))
    final = adapter(run / "adapter")
    assert final.keys() == expected.keys()
    diff = max((final[k] - expected[k]).abs().max().item() for k in final)
    assert diff < 1e-6, diff
    moved = max((final[k] - adapter(run / "checkpoints" / "last" / "adapter")[k]).abs().max().item() for k in final)
    assert moved == 0.0  # the final adapter is the last checkpoint's (no validation: best == last)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))  # each step logged once


# --- a full disk during an atomic write ---------------------------------------------------------------------------------
def test_disk_full_mid_write_keeps_the_old_version_and_no_temp(tmp_path, monkeypatch):
    import builtins
    import errno

    from loratune.runs import atomic_path, write_json_atomic

    summary = tmp_path / "run" / "summary.json"
    write_json_atomic(summary, {"steps": 1})
    adapter_dir = tmp_path / "run" / "adapter"
    with atomic_path(adapter_dir) as tmp:
        tmp.mkdir()
        (tmp / "adapter_model.safetensors").write_bytes(b"old")
    real_open = builtins.open

    def full_disk_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if "w" in mode:
            handle.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device", file))
        return handle

    monkeypatch.setattr(builtins, "open", full_disk_open)
    with pytest.raises(OSError) as exc:
        write_json_atomic(summary, {"steps": 2})
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(summary)  # the real name, not the temp's
    with pytest.raises(OSError), atomic_path(adapter_dir) as tmp:
        tmp.mkdir()
        with open(tmp / "adapter_model.safetensors", "w") as f:
            f.write("new")
    monkeypatch.undo()
    assert json.loads(summary.read_text()) == {"steps": 1}
    assert (adapter_dir / "adapter_model.safetensors").read_bytes() == b"old"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["adapter", "summary.json"]
