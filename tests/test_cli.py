"""The command line: --help everywhere, one-line errors with exit code 2, a real `train` run."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from loratune.cli import app

runner = CliRunner()


def test_help_lists_train_and_every_command_has_help():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "train" in result.output
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        sub = runner.invoke(app, [name, "--help"])
        assert sub.exit_code == 0, name
        assert "Usage" in sub.output


def test_misspelled_key_is_one_line_exit_2_no_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data:\n  pth: x.jsonl\n")
    proc = subprocess.run([sys.executable, "-m", "loratune.cli", "train", str(cfg)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stderr
    assert f"{cfg}:2" in lines[0] and "data.pth" in lines[0] and 'did you mean "path"' in lines[0]
    assert "Traceback" not in proc.stderr


def test_train_command_runs_and_honours_set(tiny_llama_dir, qa_file, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: {{base: {tiny_llama_dir}, device: cpu, gradient_checkpointing: false}}\n"
        f"data: {{path: {qa_file}, template: chatml, max_length: 128}}\n"
        f"training: {{max_steps: 50, batch_size: 4}}\n"
        f"output: {{dir: {tmp_path / 'runs'}}}\n"
    )
    result = runner.invoke(app, ["train", str(cfg), "--set", "training.max_steps=3", "--set", "lora.r=4"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "runs" / "run" / "summary.json").read_text())
    assert summary["steps"] == 3
    resolved = (tmp_path / "runs" / "run" / "config.yaml").read_text()
    assert "r: 4" in resolved and "max_steps: 3" in resolved
