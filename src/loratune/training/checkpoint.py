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


def save_checkpoint(folder: Path, model: Any, optimizer: Any, scheduler: Any, state: TrainerState) -> Path:
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp / "adapter", safe_serialization=True)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   tmp / "training_state.pt")
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
    for tmp in folder.glob(".tmp-*"):  # left by a killed save
        shutil.rmtree(tmp, ignore_errors=True)


def load_state(folder: Path) -> TrainerState:
    return TrainerState(**json.loads((folder / "state.json").read_text()))


def load_training_state(folder: Path, optimizer: Any, scheduler: Any) -> None:
    # weights_only=False is needed for numpy's RNG tuple; the file is one we wrote ourselves in this run folder.
    blob = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])


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
