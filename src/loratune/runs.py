"""The run folder: never-overwrite naming, atomic writes, metrics, summary and the files later commands read.

Layout of `runs/<name>/`:
    config.yaml       the fully resolved config
    template.json     the prompt template used in training (reused by eval, generate, serve)
    adapter/          the final (best) adapter in plain PEFT format
    checkpoints/      step-N/ folders (adapter + optimizer/scheduler/RNG state) and `last`
    metrics.jsonl     one JSON object per logged step or evaluation
    loss.png          train/validation loss curves
    summary.json      wall time, tokens, tokens/s, peak memory, best validation loss
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loratune.errors import LoratuneError


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it over `final`, on failure remove it.

    Works for files and folders. A crash mid-write leaves only a `.tmp-*` sibling, never a half-written `final`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    target = tmp / final.name
    try:
        try:
            yield target
        except OSError as e:  # name the file the user asked for, not our temporary sibling
            if e.filename and str(e.filename).startswith(str(target)):
                e.filename = str(final) + str(e.filename)[len(str(target)):]
            raise
        if final.is_dir() and not final.is_symlink():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(target, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, final)
        _fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def new_run_dir(root: str | Path, name: str, *, overwrite: bool = False) -> Path:
    """Create `root/name`, or `root/name-2`, `-3`, ... if it exists (unless overwrite)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    candidate = root / name
    if candidate.exists() and overwrite:
        # --overwrite replaces a run, never whatever else happens to carry the name
        if candidate.is_dir() and any(candidate.iterdir()) and not (candidate / "config.yaml").is_file():
            raise LoratuneError("exists and is not a loratune run folder (no config.yaml); refusing to overwrite it",
                                file=candidate, hint="choose another output.name or output.dir")
        shutil.rmtree(candidate) if candidate.is_dir() else candidate.unlink()
    n = 2
    while candidate.exists():
        candidate = root / f"{name}-{n}"
        n += 1
    candidate.mkdir(parents=True)
    return candidate


class MetricsLog:
    """Append-only JSON lines; each line is flushed so a killed run keeps what it logged."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill is skipped
                rows.append(json.loads(line))
        return rows

    def truncate_after(self, step: int) -> None:
        """On resume, drop records logged after the checkpoint we resume from (they will be logged again)."""
        rows = [r for r in self.read() if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))


def find_run_dir(path: str | Path) -> Path:
    """A run folder given itself or anything inside it (an adapter/ or checkpoint folder)."""
    p = Path(path).resolve()
    for candidate in (p, *p.parents):
        if (candidate / "config.yaml").is_file() and (candidate / "template.json").exists():
            return candidate
    raise LoratuneError("not a loratune run folder (no config.yaml + template.json)", file=path,
                        hint="pass the folder that `loratune train` created under runs/")
