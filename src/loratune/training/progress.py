"""Live progress (rich): step, loss, tokens/s, ETA; plain log lines when output is not a terminal (CI logs)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int = 0, *, enabled: bool = True) -> None:
        self.total = total_steps
        self.enabled = enabled
        self.interactive = console.is_terminal
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.start_step = start_step
        self.every = max(1, total_steps // 10)
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
            disable=not (enabled and self.interactive),
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, stats="")

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, step: int, loss: float, tokens: int, lr: float, extra: str = "") -> None:
        self.tokens += tokens
        stats = f"loss {loss:.4f}  {self.tokens_per_s():,.0f} tok/s  lr {lr:.2e}{extra}"
        self.progress.update(self.task, completed=step, stats=stats)
        if self.enabled and not self.interactive and (step % self.every == 0 or step == self.total or step == 1):
            elapsed = time.perf_counter() - self.t0
            done = step - self.start_step
            eta = elapsed / max(done, 1) * (self.total - step)
            console.print(f"step {step}/{self.total}  {stats}  elapsed {elapsed:.0f}s  ETA {eta:.0f}s")

    def note(self, text: str) -> None:
        if self.enabled:
            console.print(text)
