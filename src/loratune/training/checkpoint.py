"""Checkpoints: adapter + optimizer + scheduler + RNG state, written atomically, pruned, found again on resume.

A checkpoint folder `checkpoints/step-000040/` appears only complete: it is written under a temporary name and
renamed (one atomic `rename(2)`), so a kill during a save never leaves a folder `--resume` would pick up half
written. Its `state.json` is written last inside the folder and is what marks it valid.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loratune.errors import LoratuneError
from loratune.runs import atomic_path

STEP_RE = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    step: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    train_tokens: int = 0  # real (non-padding) tokens seen
    wall_time_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, model: Any, optimizer: Any, scheduler: Any, state: TrainerState,
                    rng_states: list[dict[str, Any]] | None = None,
                    adapter_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapter, optimizer, scheduler, RNG (one per rank: `rng_states`, default this process's) and state.

    `optimizer` is an optimizer or its state dict (FSDP gathers it first); `adapter_state` the full LoRA weights
    when the model's own are sharded. The folder only appears once complete (atomic rename); `state.json` is
    written last inside it.
    """
    optimizer_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp / "adapter", safe_serialization=True, state_dict=adapter_state)
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "rng": rng_states or [rng_state()]}, tmp / "training_state.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
    return folder


def is_complete(folder: Path) -> bool:
    return (folder / "state.json").is_file() and (folder / "training_state.pt").is_file() and \
        (folder / "adapter" / "adapter_config.json").is_file()


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and STEP_RE.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def prune(folder: Path, keep_last: int, protect: Path | None) -> None:
    for old in list_checkpoints(folder)[:-keep_last]:
        if protect is None or old.resolve() != protect.resolve():
            shutil.rmtree(old, ignore_errors=True)
    clean_partial(folder)


def clean_partial(folder: Path) -> list[Path]:
    """Remove what a killed save leaves: `.tmp-*` (being written) and `.old-*` (being replaced) siblings."""
    leftovers = [*folder.glob(".tmp-*"), *folder.glob(".old-*")] if folder.is_dir() else []
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def load_state(folder: Path) -> TrainerState:
    return TrainerState(**json.loads((folder / "state.json").read_text()))


def load_training_state(folder: Path, optimizer: Any, scheduler: Any, rank: int = 0,
                        load_optimizer: Any = None) -> None:
    """Restore optimizer, scheduler and this rank's RNG (dropout masks continue exactly where they were).

    `load_optimizer(state)` replaces `optimizer.load_state_dict` where the optimizer holds sharded state (FSDP).
    """
    # weights_only=False is needed for numpy's RNG tuple; the file is one we wrote ourselves in this run folder.
    blob = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=False)
    (load_optimizer or optimizer.load_state_dict)(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    states = blob["rng"] if isinstance(blob["rng"], list) else [blob["rng"]]
    if rank >= len(states):
        raise LoratuneError(f"checkpoint holds RNG state for {len(states)} processes, this is process {rank}",
                            file=folder, hint="resume with the same number of processes (--nproc) as the run used")
    set_rng_state(states[rank])


def find_resume_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest complete checkpoint of a run folder."""
    p = Path(path)
    if is_complete(p):
        return p
    candidates = list_checkpoints(p / "checkpoints")
    if not candidates:
        raise LoratuneError("no complete checkpoint to resume from", file=p,
                            hint="set training.save_steps so that checkpoints are written")
    return candidates[-1]
