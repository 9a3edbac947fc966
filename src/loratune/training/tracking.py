"""Where training metrics go: `metrics.jsonl` always, plus TensorBoard (`runs/<name>/tb/`) or Weights & Biases.

`metrics.jsonl` is the record loratune itself reads (plots, summaries, resume); the other sinks are for people
watching a run. One `Tracker.write(record)` feeds them all, so the loop logs each number once. Only the main
process of a data-parallel run writes anything (`NullTracker` elsewhere).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Protocol

from loratune.errors import LoratuneError
from loratune.runs import MetricsLog

# Records carry train numbers ("loss", "lr", ...) or evaluation numbers ("val_loss", "val_ppl", ...); the prefix
# groups them into two panels in TensorBoard and wandb.
EVAL_PREFIX = "val_"


class Sink(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


def scalar_items(record: dict[str, Any]) -> dict[str, float]:
    """The plottable numbers of a record, named `train/loss` or `eval/val_loss`; `step` is the x axis."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        group = "eval" if key.startswith(EVAL_PREFIX) else "train"
        out[f"{group}/{key}"] = float(value)
    return out


class TensorBoardSink:
    def __init__(self, folder: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run logged after the checkpoint we resume from, so the curves do not
        # fold back on themselves (metrics.jsonl is truncated the same way).
        self.writer = SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step else None)

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run_dir: Path, config: dict[str, Any], resume: bool) -> None:
        import wandb

        # The wandb run id is kept in the run folder so that `--resume` continues the same wandb run.
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id)
        self.run = wandb.init(project="loratune", name=run_dir.name, id=run_id, dir=str(run_dir), config=config,
                              resume="allow")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """metrics.jsonl plus the configured sinks."""

    def __init__(self, metrics: MetricsLog, sinks: list[Sink]) -> None:
        self.metrics = metrics
        self.sinks = sinks

    def write(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        values = scalar_items(record)
        if values and "step" in record:
            for sink in self.sinks:
                sink.log(values, int(record["step"]))

    def read(self) -> list[dict[str, Any]]:
        return self.metrics.read()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class NullTracker:
    """What non-main ranks log to: nothing (rank 0 owns the run folder)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def read(self) -> list[dict[str, Any]]:
        return []

    def close(self) -> None:
        pass


def check_report_to(report_to: str) -> None:
    """Fail before any work if the chosen sink cannot run (one line, not an ImportError mid-training)."""
    if report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise LoratuneError("report_to: wandb needs the wandb package", key="training.report_to",
                            hint="pip install wandb, or set training.report_to: tensorboard (or none)")
    if report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise LoratuneError("report_to: tensorboard needs the tensorboard package", key="training.report_to",
                            hint="pip install tensorboard, or set training.report_to: none")


def open_tracker(report_to: str, run_dir: Path, metrics: MetricsLog, *, config: dict[str, Any],
                 resume_step: int | None) -> Tracker:
    """The tracker for a run folder: `report_to` is tensorboard (default), wandb or none."""
    check_report_to(report_to)
    sinks: list[Sink] = []
    if report_to == "tensorboard":
        sinks.append(TensorBoardSink(run_dir / "tb", resume_step))
    elif report_to == "wandb":
        sinks.append(WandbSink(run_dir, json.loads(json.dumps(config, default=str)), resume=resume_step is not None))
    return Tracker(metrics, sinks)
