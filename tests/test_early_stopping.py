"""Early stopping: with `patience`, training stops after that many evaluations without a better validation loss,
and `adapter/` holds the weights of the best step (not the last), while `checkpoints/last` holds the last."""

from __future__ import annotations

import json

import pytest

from loratune.train import train
from tests.conftest import tiny_run_config
from tests.test_resume import adapter_weights, max_abs_diff


@pytest.fixture(scope="module")
def stopped(tiny_llama_dir, tmp_path_factory):
    from tests.conftest import write_jsonl

    tmp = tmp_path_factory.mktemp("early")
    data = write_jsonl(tmp / "qa.jsonl")
    # A learning rate far too high: validation loss improves for a few steps, then climbs, and patience triggers.
    cfg = tiny_run_config(tiny_llama_dir, data, tmp / "runs", max_steps=60, learning_rate=0.1, scheduler="constant",
                          eval_steps=1, patience=3, save_total_limit=1, report_to="none", batch_size=4)
    cfg.data.split = "train[:24]"
    cfg.data.validation_split = "train[24:32]"
    return train(cfg, show_progress=False)


def test_stops_after_patience_evaluations_without_improvement(stopped):
    s = stopped.summary
    rows = [json.loads(x) for x in (stopped.run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    best_step, best_loss = min(val, key=lambda sv: sv[1])
    assert s["stopped_early"] is True and s["steps"] < 60
    assert s["best_step"] == best_step and s["best_val_loss"] == pytest.approx(best_loss, abs=1e-6)
    assert s["steps"] == best_step + 3  # exactly `patience` evaluations after the best one
    assert all(r["val_ppl"] == pytest.approx(2.718281828 ** r["val_loss"], rel=1e-3) for r in rows if "val_loss" in r)


def test_adapter_is_the_best_step_not_the_last(stopped):
    run, s = stopped.run_dir, stopped.summary
    best = adapter_weights(run / "checkpoints" / f"step-{s['best_step']:06d}" / "adapter")
    last = adapter_weights(run / "checkpoints" / "last" / "adapter")
    final = adapter_weights(run / "adapter")
    assert max_abs_diff(final, best) == 0.0
    assert max_abs_diff(final, last) > 1e-3
    assert json.loads((run / "checkpoints" / "last" / "state.json").read_text())["step"] == s["steps"]
