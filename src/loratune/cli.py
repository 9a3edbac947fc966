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
    if not debug:
        import logging
        import warnings

        # Library deprecation chatter (transformers 5 renames) and bitsandbytes' note about an optional CPU
        # kernel package are not the user's problem; --debug shows them.
        warnings.filterwarnings("ignore", category=FutureWarning)
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


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
    nproc: int = typer.Option(
        1, "--nproc", min=1, help="Data-parallel processes on this machine (one per GPU; on CPU over gloo). "
        "Multi-node: accelerate launch --num_machines ... -m loratune.cli train cfg.yaml."
    ),
) -> None:
    """Fine-tune a model as described by a config file."""
    from loratune.config import load_config
    from loratune.errors import LoratuneError
    from loratune.train import train as run_train

    if config is not None and config_opt is not None:
        raise LoratuneError("give the config once: as an argument or with --config", hint="drop one of them")
    if nproc > 1:  # re-run this same command in N processes under torch.distributed.run
        from loratune.training.distributed import launch

        argv = [*([str(config)] if config else []), *(["--config", str(config_opt)] if config_opt else []),
                *(["--qlora_config", str(qlora_config)] if qlora_config else []),
                *[arg for item in set_ for arg in ("--set", item)], *(["--resume", resume] if resume else []),
                *(["--overwrite"] if overwrite else []), *(["--allow-pickle"] if allow_pickle else [])]
        raise typer.Exit(launch(nproc, argv))
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


@app.command()
def prepare(
    config: Path = typer.Argument(..., help="Run config (YAML); its model and data sections are used."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default: <output.dir>/<name>-data)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set data.max_length=auto"),
) -> None:
    """Load, render, tokenize and check the data; write it with data_report.md and a length histogram."""
    from loratune.config import load_config
    from loratune.data.prepare import run_prepare
    from loratune.training.progress import console

    cfg = load_config(config, overrides=list(set_))
    folder = out or Path(cfg.output.dir) / f"{cfg.output.name}-data"
    with console.status("preparing data"):
        run_prepare(cfg, folder, config_path=str(config), log=console.print)
    console.print(f"wrote {folder}/ (data_report.md, lengths.png, train.jsonl)")


@app.command("eval")
def eval_(
    model: str | None = typer.Argument(None, help="Run folder, adapter folder, merged folder or base model."),
    model_path: str | None = typer.Option(None, "--model_path", "--model-path", help="Same as MODEL (seed form)."),
    data: str | None = typer.Option(None, "--data", "--data_path", "--data-path",
                                    help="Evaluation data (default: the run's validation split)."),
    split: str | None = typer.Option(None, "--split", help='Split and slice, e.g. validation or "train[300:400]".'),
    compare: str | None = typer.Option(None, "--compare", help="Model to compare with (default: the run's base)."),
    no_compare: bool = typer.Option(False, "--no-compare", help="Evaluate MODEL alone."),
    max_examples: int | None = typer.Option(None, "--max-examples", help="Evaluate the first N examples."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Longest generated answer, in tokens."),
    batch_size: int = typer.Option(16, "--batch-size", help="Examples per forward/generate batch."),
    output: Path | None = typer.Option(None, "--output", help="Report folder (default: MODEL/eval)."),
    no_semantic: bool = typer.Option(False, "--no-semantic", help="Skip the sentence-embedding similarity."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CPUs with bf16 units), bf16, fp16 or fp32."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads (1 is faster on a busy CPU)."),
) -> None:
    """Answer perplexity and answer metrics; with a comparison model, eval/report.md + report.html side by side."""
    from loratune.errors import LoratuneError

    if (model is None) == (model_path is None):
        raise LoratuneError("give the model once: as MODEL or with --model_path", key="--model_path",
                            hint="loratune eval runs/my-run")
    from loratune.evaluate.runner import EvalOptions, run_eval
    from loratune.training.progress import console

    ref = model or model_path or ""
    opts = EvalOptions(ref, data=data, split=split, compare=compare, no_compare=no_compare, max_examples=max_examples,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, output=output,
                       semantic=not no_semantic, device=device, dtype=dtype, threads=threads)
    summary = run_eval(opts)
    console.print(f"wrote {summary['output']}/ (report.md, report.html, metrics.json, metrics.png, predictions.jsonl)")


@app.command("inspect")
def inspect_(
    model: str = typer.Argument(..., help="Hub id, model folder (config.json is enough), .gguf file or alias."),
    r: int = typer.Option(16, "--r", min=1, help="LoRA rank."),
    target_modules: str = typer.Option("auto", "--target-modules",
                                       help="auto, all-linear, or comma-separated module names."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Micro-batch size for the memory estimate."),
    seq_len: int = typer.Option(512, "--seq-len", min=1, help="Tokens per example for the memory estimate."),
    bits: str = typer.Option("4", "--bits", help="Weight bit width: 4, 8 or none."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto, bf16, fp16 or fp32."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the model's own code."),
) -> None:
    """Module tree, LoRA targets, parameter counts and a training-memory estimate (no weights are loaded)."""
    from loratune.config import LoraConfig
    from loratune.errors import choose
    from loratune.models.inspect import format_report, inspect_model
    from loratune.training.progress import console

    choose(bits, ("4", "8", "none"), what="bit width", key="--bits")
    choose(dtype, ("auto", "bf16", "fp16", "fp32"), what="dtype", key="--dtype")
    targets = target_modules if target_modules in ("auto", "all-linear") else \
        [t.strip() for t in target_modules.split(",") if t.strip()]
    lora = LoraConfig(r=r, alpha=2 * r, target_modules=targets)
    report = inspect_model(model, lora, batch_size=batch_size, seq_len=seq_len,
                           bits=int(bits) if bits.isdigit() else "none", dtype=dtype,
                           trust_remote_code=trust_remote_code)
    for line in format_report(report):
        console.print(line, markup=False, highlight=False, soft_wrap=True)  # tree lines stay one line each


@app.command()
def merge(
    run_dir: Path = typer.Argument(..., help="Run folder written by loratune train."),
    out: Path = typer.Option(..., "--out", help="Folder for the merged model."),
    dtype: str = typer.Option("bf16", "--dtype", help="Dtype of the merged weights: bf16, fp16 or fp32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
) -> None:
    """Merge the run's adapter into its base loaded in full precision; write a plain transformers folder."""
    from loratune.models.merge import merge_run
    from loratune.training.progress import console

    with console.status("merging"):
        merge_run(run_dir, out, dtype=dtype, overwrite=overwrite, log=console.print)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="Run folder (merged on the fly) or a merged model folder."),
    format_: str = typer.Option("gguf", "--format", help="Export format (gguf)."),
    type_: str = typer.Option("f16", "--type", help="GGUF tensor type: f16 or q8_0."),
    out: Path | None = typer.Option(None, "--out", help="Output file (default: RUN_DIR/<name>-<type>.gguf)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
) -> None:
    """Write the merged model as a GGUF file (llama.cpp, Ollama, LM Studio) with the gguf package."""
    from loratune.errors import choose
    from loratune.models.export import export_gguf
    from loratune.training.progress import console

    choose(format_, ("gguf",), what="export format", key="--format")
    path = export_gguf(run_dir, out, gguf_type=type_, overwrite=overwrite, log=console.print)
    console.print(f"wrote {path}")


@app.command()
def generate(
    model: str = typer.Argument(..., help="Run folder, adapter folder, merged model folder, or base model."),
    prompt: str | None = typer.Argument(None, help="One prompt; or give --input."),
    input_: Path | None = typer.Option(None, "--input", "-i", help="JSONL prompts (messages, prompt, question, ...)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="JSONL answers: each input row plus `answer`."),
    system: str | None = typer.Option(None, "--system", help="System prompt (rows may carry their own)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Answer length limit in tokens."),
    temperature: float | None = typer.Option(None, "--temperature", help="0 = greedy (default unless the run says)."),
    top_p: float | None = typer.Option(None, "--top-p", help="Nucleus sampling mass."),
    top_k: int | None = typer.Option(None, "--top-k", help="Sample from the k most likely tokens (0 = off)."),
    repetition_penalty: float | None = typer.Option(None, "--repetition-penalty", help="> 1 discourages repeats."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for sampling."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts per generate call (--input)."),
    template: str | None = typer.Option(None, "--template", help="Override the saved template (e.g. chatml)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """Answer one prompt, or a JSONL file of prompts in batches, with the run's own template."""
    from loratune.data.conversation import Message
    from loratune.errors import LoratuneError
    from loratune.generate import generate_batch, generate_file, load_for_inference

    if (prompt is None) == (input_ is None) or (input_ is None) != (output is None):
        raise LoratuneError("give either a prompt, or --input FILE with --output FILE",
                            hint='loratune generate runs/x "What is 2+2?"')
    im = load_for_inference(model, device=device, template=template)
    settings = im.defaults.override(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                    repetition_penalty=repetition_penalty, seed=seed).validate()
    if input_ is not None:
        n = generate_file(im, input_, output, settings, system=system, batch_size=batch_size)
        typer.echo(f"wrote {n} answers to {output}", err=True)
        return
    messages = ([Message("system", system)] if system else []) + [Message("user", prompt)]
    typer.echo(generate_batch(im, [messages], settings)[0])


@app.command()
def chat(
    model: str = typer.Argument(..., help="Run folder, adapter folder, merged model folder, or base model."),
    system: str | None = typer.Option(None, "--system", help="System prompt (change it later with /system)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Answer length limit in tokens."),
    temperature: float | None = typer.Option(None, "--temperature", help="0 = greedy."),
    top_p: float | None = typer.Option(None, "--top-p", help="Nucleus sampling mass."),
    top_k: int | None = typer.Option(None, "--top-k", help="Sample from the k most likely tokens (0 = off)."),
    repetition_penalty: float | None = typer.Option(None, "--repetition-penalty", help="> 1 discourages repeats."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for sampling."),
    template: str | None = typer.Option(None, "--template", help="Override the saved template."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """Chat in the terminal; answers stream as they are written. Commands: /reset, /system TEXT, /exit."""
    from loratune.chat import ChatSession, run_chat
    from loratune.generate import load_for_inference

    im = load_for_inference(model, device=device, template=template)
    settings = im.defaults.override(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                    repetition_penalty=repetition_penalty, seed=seed).validate()
    run_chat(ChatSession(im, settings, system=system))


@app.command()
def serve(
    model: str = typer.Argument(..., help="Run folder, adapter folder, merged model folder, or base model."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback only by default)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="LORATUNE_API_KEY",
                                       help="Require 'Authorization: Bearer KEY' (or set LORATUNE_API_KEY)."),
    ui: bool = typer.Option(False, "--ui", help="Serve the web chat page at /."),
    model_name: str | None = typer.Option(None, "--model-name", help="Model id clients send (default: folder name)."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Requests per batched generate call."),
    max_wait_ms: float = typer.Option(10.0, "--max-wait-ms", min=0, help="How long a batch waits to fill up."),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="Waiting requests before answering 429."),
    max_tokens: int = typer.Option(1024, "--max-tokens", min=1, help="Largest max_tokens a request may ask for."),
    max_prompt_tokens: int | None = typer.Option(None, "--max-prompt-tokens", help="Longest prompt (413 above)."),
    rate_limit: int = typer.Option(0, "--rate-limit", min=0, help="Requests per minute per client (0 = off)."),
    template: str | None = typer.Option(None, "--template", help="Override the saved template."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    threads: int | None = typer.Option(None, "--threads", min=1,
                                       help="CPU threads for torch (default: all cores; 1 is faster on a busy CPU)."),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (and a web chat page with --ui)."""
    import torch
    import uvicorn

    from loratune.generate import load_for_inference
    from loratune.serve.api import Limits, build

    if threads:
        torch.set_num_threads(threads)

    im = load_for_inference(model, device=device, template=template)
    limits = Limits(max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens, rate_limit_per_minute=rate_limit)
    app_ = build(im, model_name=model_name, api_key=api_key, ui=ui, limits=limits, max_batch=max_batch,
                 max_wait_ms=max_wait_ms, max_queue=max_queue)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        typer.secho(f"warning: listening on {host} without --api-key: anyone who can reach it can use it",
                    fg=typer.colors.YELLOW, err=True)
    typer.echo(f"serving {model_name or im.name} on http://{host}:{port}/v1" + (f" (chat page: http://{host}:{port}/)"
               if ui else "") + (" (API key required)" if api_key else ""), err=True)
    uvicorn.run(app_, host=host, port=port, log_level="info")


@app.command()
def push(
    run_dir: Path = typer.Argument(..., help="The run folder to publish."),
    repo_id: str = typer.Option(..., "--repo-id", help="Hub repository, owner/name."),
    merged: bool = typer.Option(False, "--merged", help="Publish merged full weights instead of the adapter."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only write the repository folder; upload nothing."),
    out: Path | None = typer.Option(None, "--out", help="Where to write the folder (default: RUN/hub/OWNER--NAME)."),
    license_: str | None = typer.Option(None, "--license", help="License for the model card (default: the base's)."),
) -> None:
    """Build the Hub repository folder (weights, tokenizer, template, model card) and upload it.
    The token comes from HF_TOKEN or `hf auth login`, never from a config file."""
    from loratune.hub import push as run_push

    result = run_push(run_dir, repo_id, merged=merged, private=private, dry_run=dry_run, out=out, license=license_)
    if result.uploaded:
        typer.echo(f"uploaded {result.folder} to {result.url}")
    else:
        typer.echo(f"wrote {result.folder} (dry run: nothing uploaded)")


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
    except OSError as e:
        if STATE["debug"]:
            raise
        import errno

        where = f"{e.filename}: " if e.filename else ""
        if e.errno == errno.ENOSPC:
            message = f"{where}disk full while writing (free space or set output.dir elsewhere; nothing half-written was kept)"
        else:
            message = f"{where}{e.strerror or e}"
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        sys.exit(1)
    except Exception as e:  # an unexpected failure still gets one line; --debug shows the traceback
        if STATE["debug"]:
            raise
        text = str(e).splitlines()[0][:300] if str(e) else ""
        typer.secho(f"error: {type(e).__name__}: {text} (rerun with --debug for the traceback)",
                    fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
