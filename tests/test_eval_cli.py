"""`loratune eval` for real on a tiny trained run, the seed form, its one-line errors, and the generation probe
that `training.eval_generate_every` logs beside the validation loss."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from loratune.cli import app
from loratune.errors import LoratuneError
from loratune.evaluate.semantic import model_dir
from tests.conftest import QA_ROWS, tiny_run_config, write_jsonl

runner = CliRunner()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llama_dir):
    """8 steps on the tiny model; validation at 4 and 8; the generation probe every 8 steps (and at the last)."""
    from loratune.train import train

    root = tmp_path_factory.mktemp("eval-cli")
    data = write_jsonl(root / "qa.jsonl")
    cfg = tiny_run_config(tiny_llama_dir, data, root, max_steps=8, eval_steps=4, eval_generate_every=8)
    cfg.data.split, cfg.data.validation_split = "train[:24]", "train[24:32]"
    return train(cfg, show_progress=False).run_dir


def test_eval_generate_every_logs_token_f1_beside_validation_loss(trained_run):
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    evaluations = {r["step"]: r for r in records if "val_loss" in r}
    assert sorted(evaluations) == [4, 8]
    assert "gen_token_f1" not in evaluations[4]  # 4 is not a multiple of 8
    for step in (8,):  # a multiple of 8 (and the last step)
        assert 0.0 <= evaluations[step]["gen_token_f1"] <= 100.0


def test_eval_run_folder_against_its_base(trained_run, tiny_llama_dir, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, ["eval", str(trained_run), "--max-new-tokens", "4", "--batch-size", "4",
                                 "--no-semantic", "--output", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["examples"] == 8 and metrics["models"] == {trained_run.name: str(trained_run),
                                                              tiny_llama_dir.name: str(tiny_llama_dir)}
    # 8 steps of LoRA on answers like these lower their perplexity compared with the untouched base
    tuned, base = metrics["metrics"][trained_run.name], metrics["metrics"][tiny_llama_dir.name]
    assert tuned["answer_perplexity"] < base["answer_perplexity"]
    assert metrics["settings"]["max_new_tokens"] == 4 and metrics["settings"]["semantic_similarity"].startswith("skipped")
    assert (out / "report.html").is_file() and (out / "report.md").is_file()


def test_seed_form_with_lists_of_acceptable_answers(tiny_llama_dir, tmp_path):
    # WebGLM's evaluation layout: several acceptable answers per question
    rows = [{"question": "the era of the great mughals began with the accession of", "answer": ["Akbar", "Babur"]},
            {"question": "when did houston go to the american league", "answer": ["2013"]},
            {"question": "who wrote hamlet", "answer": ["Shakespeare", "William Shakespeare"]}]
    data = write_jsonl(tmp_path / "eval.jsonl", rows)
    out = tmp_path / "report"
    args = ["eval", "--model_path", str(tiny_llama_dir), "--data_path", str(data), "--max-examples", "2",
            "--max-new-tokens", "3", "--output", str(out)] + ([] if model_dir() else ["--no-semantic"])
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["examples"] == 2 and list(metrics["models"]) == [tiny_llama_dir.name]
    assert "relative_change" not in metrics  # nothing to compare with: a base model has no base
    if model_dir():
        assert 0 <= metrics["metrics"][tiny_llama_dir.name]["semantic_similarity"] <= 100
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["references"] for p in predictions] == [["Akbar", "Babur"], ["2013"]]


def test_eval_errors_are_one_line_with_exit_2(tiny_llama_dir):
    proc = subprocess.run([sys.executable, "-m", "loratune.cli", "eval"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --model_path: give the model once: as MODEL or with --model_path (loratune eval runs/my-run)"]
    from loratune.evaluate.runner import EvalOptions, run_eval

    with pytest.raises(LoratuneError, match="no evaluation data given"):
        run_eval(EvalOptions(str(tiny_llama_dir)))
    with pytest.raises(LoratuneError, match="--batch-size: must be at least 1"):
        run_eval(EvalOptions(str(tiny_llama_dir), batch_size=0))


def test_run_without_validation_split_names_the_fix(trained_run, tmp_path):
    from loratune.config import load_config
    from loratune.evaluate.runner import EvalOptions, eval_data

    cfg = load_config(trained_run / "config.yaml")
    cfg.data.validation_split = None
    with pytest.raises(LoratuneError, match="no validation split.*pass --data FILE"):
        eval_data(EvalOptions(str(trained_run)), cfg)
    # --split alone slices the run's own data file
    data = eval_data(EvalOptions(str(trained_run), split="train[30:32]"), cfg)
    assert [c.answer for c in data.conversations] == [QA_ROWS[30]["answer"], QA_ROWS[31]["answer"]]
