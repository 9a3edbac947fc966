"""Publishing a run to the Hugging Face Hub: the repository folder (adapter or merged weights, tokenizer,
template, resolved config, loss curve, model card) and the upload.

The folder is complete on its own: an adapter repository loads with plain `PeftModel.from_pretrained`, a merged
one with plain `AutoModelForCausalLM.from_pretrained`. The token comes from `HF_TOKEN` or the
`hf auth login` / `huggingface-cli login` cache (huggingface_hub's own lookup), never from a config file, and is
never written anywhere: it is handed to `HfApi` in memory only.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loratune.config import Config, load_config
from loratune.errors import LoratuneError
from loratune.runs import atomic_path, find_run_dir

# Hub ids and licenses of the aliases, for the model card (a local path is no use to someone on the Hub).
ALIAS_HUB_IDS = {"smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
# Tokenizer and adapter files the run's adapter/ folder holds; optimizer state and checkpoints never travel.
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclass
class PushResult:
    folder: Path
    repo_id: str
    uploaded: bool
    url: str | None = None


def check_repo_id(repo_id: str) -> str:
    if not REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise LoratuneError(f'"{repo_id}" is not a Hub repository id', key="--repo-id",
                            hint="use owner/name, e.g. alice/smollm2-gsm8k-lora")
    return repo_id


def hub_base(cfg: Config) -> tuple[str | None, str]:
    """(hub id of the base model or None when it is a local file, license for the card)."""
    base = cfg.model.base
    if base in ALIAS_HUB_IDS:
        return ALIAS_HUB_IDS[base]
    looks_local = base.startswith((".", "/", "~")) or base.endswith(".gguf") or Path(base).expanduser().exists()
    if not looks_local and base.count("/") == 1:
        return base, "other"
    return None, "other"


def _hub_dataset(path: str | None) -> str | None:
    if path and path.count("/") == 1 and not Path(path).exists() and not path.startswith((".", "/", "~")):
        return path
    return None


# -- the repository folder -----------------------------------------------------------------------------------------------
def build_repo(run: str | Path, out: str | Path, *, repo_id: str, merged: bool = False,
               license: str | None = None) -> Path:
    """Write the complete repository folder to `out` in one atomic step; returns `out`."""
    run_dir = find_run_dir(run)
    check_repo_id(repo_id)
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise LoratuneError("the run has no finished adapter (adapter/adapter_config.json)", file=run_dir,
                            hint="push a run that `loratune train` completed")
    cfg = load_config(run_dir / "config.yaml")
    out = Path(out)
    protected = {run_dir.resolve(), *(run_dir.resolve() / name for name in ("adapter", "checkpoints", "eval"))}
    if out.resolve() in protected:  # atomic_path replaces the folder: it must never be part of the run itself
        raise LoratuneError("the output folder would replace part of the run", file=out, hint="choose another --out")
    with atomic_path(out) as tmp:
        if merged:  # bf16 weights merged in fp32 by models/merge.py, with the template as a Jinja chat template
            from loratune.models.merge import merge_run

            merge_run(run_dir, tmp, dtype="bf16")
        else:
            tmp.mkdir()
            _copy_adapter(run_dir / "adapter", tmp)
        shutil.copy2(run_dir / "template.json", tmp / "template.json")
        shutil.copy2(run_dir / "config.yaml", tmp / "loratune_config.yaml")
        if (run_dir / "loss.png").is_file():
            shutil.copy2(run_dir / "loss.png", tmp / "loss.png")
        (tmp / "README.md").write_text(model_card(run_dir, cfg, repo_id=repo_id, merged=merged, license=license),
                                       encoding="utf-8")
    return out


def _copy_adapter(adapter: Path, dest: Path) -> None:
    for item in adapter.iterdir():
        if item.is_file() and (item.name in _ADAPTER_FILES or item.name.startswith(("tokenizer", "special_tokens"))
                               or item.name in ("chat_template.jinja", "loratune_template.json")):
            shutil.copy2(item, dest / item.name)


# -- the model card ------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LoratuneError(f"unreadable JSON: {e.msg}", file=path, line=e.lineno) from None
    return data if isinstance(data, dict) else None


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_flatten(value, name + "."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            rows.append((name, value))
    return rows


def _table(rows: list[tuple[str, Any]], header: tuple[str, str] = ("key", "value")) -> str:
    def cell(v: Any) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {cell(k)} | {cell(v)} |" for k, v in rows]
    return "\n".join(lines)


def model_card(run_dir: Path, cfg: Config, *, repo_id: str, merged: bool, license: str | None = None) -> str:
    """README.md: YAML front matter the Hub reads, then data, config, training summary, metrics and evaluation."""
    base_id, base_license = hub_base(cfg)
    dataset = _hub_dataset(cfg.data.path)
    quantized = cfg.quantization.bits != "none"
    tags = ["loratune", "lora", *(["qlora"] if quantized else []), "text-generation"]
    meta: dict[str, Any] = {"library_name": "transformers" if merged else "peft", "license": license or base_license,
                            "tags": tags, "pipeline_tag": "text-generation"}
    if base_id:
        meta["base_model"] = base_id
    if dataset:
        meta["datasets"] = [dataset]
    summary = _read_json(run_dir / "summary.json")
    metrics = _read_json(run_dir / "eval" / "metrics.json")
    name = repo_id.split("/", 1)[1]
    base_text = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{cfg.model.base}` (a local model)"
    kind = "merged model (LoRA weights folded into the base)" if merged else "LoRA adapter"
    parts = [f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n", f"# {name}\n",
             f"A {kind} for {base_text}, fine-tuned with "
             f"{'QLoRA (' + str(cfg.quantization.bits) + '-bit base)' if quantized else 'LoRA'} using loratune.\n"]
    load_base = base_id or cfg.model.base
    if merged:
        usage = (f'from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
                 f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
                 f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")')
    else:
        usage = (f'from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
                 f'base = AutoModelForCausalLM.from_pretrained("{load_base}")\n'
                 f'model = PeftModel.from_pretrained(base, "{repo_id}")\n'
                 f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")')
    template = json.loads((run_dir / "template.json").read_text())
    parts.append(f"## Usage\n\n```python\n{usage}\n```\n\nPrompts must use the training template "
                 f"(`{template.get('name')}`, saved as `template.json`); `loratune generate/chat/serve` apply it.\n")
    d = cfg.data
    data_rows = [("source", d.source), ("path", d.path), ("split", d.split), ("validation", d.validation_path or
                 d.validation_split or (f"{d.val_fraction:.0%} held out" if d.val_fraction else "none")),
                 ("template", template.get("name")), ("max_length", d.max_length),
                 ("system_prompt", d.system_prompt or "none"), ("loss on", "prompt + answer" if d.train_on_prompt
                                                                  else "answer tokens only")]
    parts.append("## Data\n\n" + _table(data_rows) + "\n")
    lora, t = cfg.lora, cfg.training
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    config_rows = [("lora.r", lora.r), ("lora.alpha", lora.alpha), ("lora.dropout", lora.dropout),
                   ("lora.target_modules", targets), ("quantization", cfg.quantization.bits),
                   ("learning_rate", t.learning_rate), ("scheduler", t.scheduler), ("batch_size", t.batch_size),
                   ("grad_accum", t.grad_accum), ("max_steps", t.max_steps or f"{t.epochs} epochs"),
                   ("seed", t.seed)]
    parts.append("## Training configuration\n\n" + _table(config_rows) +
                 "\n\nThe full resolved config is `loratune_config.yaml`.\n")
    if summary:
        keys = ("steps", "wall_time_s", "train_tokens", "tokens_per_s", "first_loss", "final_loss", "best_val_loss",
                "best_step", "trainable_parameters", "peak_memory_gib", "device")
        rows = [(k, summary[k]) for k in keys if summary.get(k) is not None]
        parts.append("## Training summary\n\n" + _table(rows) + "\n" +
                     ("\n![loss curve](loss.png)\n" if (run_dir / "loss.png").is_file() else ""))
    if metrics:
        parts.append("## Evaluation\n\n" + _table(_flatten(metrics), ("metric", "value")) + "\n")
    else:
        parts.append("## Evaluation\n\nNo evaluation results were recorded for this run "
                     "(`eval/metrics.json` is absent).\n")
    return "\n".join(parts)


# -- upload --------------------------------------------------------------------------------------------------------------
def hf_token() -> str | None:
    """HF_TOKEN, or the token saved by `hf auth login` (huggingface_hub's lookup order)."""
    from huggingface_hub import get_token

    return get_token()


def push(run: str | Path, repo_id: str, *, merged: bool = False, private: bool = False, dry_run: bool = False,
         out: str | Path | None = None, license: str | None = None, api: Any = None) -> PushResult:
    """Build the folder, then (unless `dry_run`) create the repository and upload the folder in one commit."""
    run_dir = find_run_dir(run)
    check_repo_id(repo_id)
    token = None
    if not dry_run and api is None:
        token = hf_token()
        if not token:
            raise LoratuneError("no Hugging Face token found", key="HF_TOKEN",
                                hint="export HF_TOKEN=hf_... or run `hf auth login`; or use --dry-run")
    folder = Path(out) if out else run_dir / "hub" / repo_id.replace("/", "--")
    build_repo(run_dir, folder, repo_id=repo_id, merged=merged, license=license)
    if dry_run:
        return PushResult(folder, repo_id, uploaded=False)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = api or HfApi(token=token)
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                                   commit_message=f"loratune: {'merged model' if merged else 'adapter'} from "
                                                  f"{run_dir.name}")
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        raise LoratuneError(f"the Hub refused the upload ({status or 'no response'}): {str(e).splitlines()[0][:200]}",
                            key="--repo-id", hint="check the token's write access and the repository name") from None
    except OSError as e:  # no network
        raise LoratuneError(f"cannot reach the Hub: {e}", hint="check the connection; --dry-run builds the folder only") from None
    url = getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    return PushResult(folder, repo_id, uploaded=True, url=url)
