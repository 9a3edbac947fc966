"""The `loratune` command line: one short function per verb. Heavy imports stay inside the commands so that
`--help` is instant. Every LoratuneError is printed as one line with a non-zero exit; `--debug` shows the
traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

app = typer.Typer(
    name="loratune",
    help="Fine-tune small causal language models with QLoRA and LoRA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
STATE = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.")) -> None:
    STATE["debug"] = debug
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@app.command()
def train(
    config: Path | None = typer.Argument(None, help="Run config (YAML with model/data/lora/... sections)."),
    config_opt: Path | None = typer.Option(None, "--config", help="Training settings (notebook layout)."),
    qlora_config: Path | None = typer.Option(
        None, "--qlora_config", "--qlora-config", help="Quantization + LoRA settings as JSON (notebook layout)."
    ),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set training.learning_rate=1e-4"),
    resume: str | None = typer.Option(
        None, "--resume", help="Continue a run folder (its newest checkpoint) or a checkpoint folder."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run folder with the same name."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin/.pt) model weights."),
) -> None:
    """Fine-tune a model as described by a config file."""
    from loratune.config import load_config
    from loratune.errors import LoratuneError
    from loratune.train import train as run_train

    if config is not None and config_opt is not None:
        raise LoratuneError("give the config once: as an argument or with --config", hint="drop one of them")
    overrides = list(set_)
    if overwrite:
        overrides.append("output.overwrite=true")
    if allow_pickle:
        overrides.append("model.allow_pickle=true")
    if resume is not None:
        run_train(load_config(None), resume=resume)
        return
    path = config or config_opt
    if path is None and qlora_config is None:
        raise LoratuneError("no config given", hint="loratune train config.yaml (see examples/)")
    cfg = load_config(path, qlora_config=qlora_config, overrides=overrides)
    run_train(cfg)


def main() -> None:
    from loratune.errors import LoratuneError

    try:
        app()
    except LoratuneError as e:
        if STATE["debug"]:
            raise
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
