"""Metrics sinks: metrics.jsonl always; TensorBoard events under runs/<name>/tb/ with the same numbers;
`report_to: none` writes no events; `report_to: wandb` without wandb installed is one clear line."""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from loratune.cli import app
from loratune.errors import LoratuneError
from loratune.runs import MetricsLog
from loratune.train import train
from loratune.training.tracking import check_report_to, open_tracker, scalar_items
from tests.conftest import tiny_run_config
from tests.test_resume import write_config


def tb_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_train_and_eval_curves(tiny_llama_dir, qa_file, tmp_path):
    cfg = tiny_run_config(tiny_llama_dir, qa_file, tmp_path, max_steps=4, eval_steps=2)
    cfg.data.split = "train[:24]"
    cfg.data.validation_split = "train[24:32]"
    run = train(cfg, show_progress=False).run_dir
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    scalars = tb_scalars(run / "tb")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in rows if "loss" in r], rel=1e-6)
    assert [s for s, _ in scalars["eval/val_loss"]] == [2, 4]
    assert [v for _, v in scalars["eval/val_ppl"]] == pytest.approx([r["val_ppl"] for r in rows if "val_ppl" in r])
    assert "train/lr" in scalars and "train/tokens_per_s" in scalars


def test_report_to_none_writes_only_metrics_jsonl(tiny_llama_dir, qa_file, tmp_path):
    run = train(tiny_run_config(tiny_llama_dir, qa_file, tmp_path, max_steps=2, report_to="none"),
                show_progress=False).run_dir
    assert not (run / "tb").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_resumed_tensorboard_drops_events_after_the_checkpoint(tmp_path):
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    first = open_tracker("tensorboard", tmp_path, metrics, config={}, resume_step=None)
    for step in range(1, 6):
        first.write({"step": step, "loss": float(step)})
    first.close()
    again = open_tracker("tensorboard", tmp_path, metrics, config={}, resume_step=3)
    again.write({"step": 4, "loss": 40.0})
    again.close()
    assert tb_scalars(tmp_path / "tb")["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_scalar_items_groups_and_skips_non_numbers():
    assert scalar_items({"step": 3, "loss": 1.5, "val_loss": 2.0, "note": "x", "flag": True}) == {
        "train/loss": 1.5, "eval/val_loss": 2.0}


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_missing_is_one_clear_line(tiny_llama_dir, qa_file, tmp_path):
    with pytest.raises(LoratuneError, match="report_to: wandb needs the wandb package"):
        check_report_to("wandb")
    config = write_config(tiny_run_config(tiny_llama_dir, qa_file, tmp_path, report_to="wandb"), tmp_path / "w.yaml")
    result = CliRunner().invoke(app, ["train", str(config)])
    assert isinstance(result.exception, LoratuneError)
    assert str(result.exception) == ("training.report_to: report_to: wandb needs the wandb package "
                                     "(pip install wandb, or set training.report_to: tensorboard (or none))")
    assert not (tmp_path / "t").exists()  # failed before creating a run folder
