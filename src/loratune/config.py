"""The run configuration: typed, validated once at the edge, then passed around as plain objects.

Sections: `model`, `quantization`, `lora`, `data`, `training`, `output`, `speed`. This module is the only place defaults
live. Unknown keys are refused with a "did you mean" suggestion, wrong types name the expected type, and every
error names the file and line of the offending key.

Two layouts load:
- one YAML file with the six sections (`loratune train config.yaml`);
- the notebook layout: training settings in YAML plus quantization/LoRA settings in a JSON file
  (`loratune train --config training.yaml --qlora_config qlora.json`), in our section names or in the
  bitsandbytes/peft names the notebooks use (`load_in_4bit`, `bnb_4bit_quant_type`, `lora_alpha`, ...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loratune.errors import LoratuneError, did_you_mean


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    base: str = Field(
        "smollm2-135m-instruct",
        description="Hub id (microsoft/phi-2), local folder, .gguf file, or the alias smollm2-135m-instruct.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Weights/compute dtype: auto = bf16 where supported, else fp16 on CUDA, else fp32."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available, else CPU.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; auto = sdpa."
    )
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with a hub model. Off by default.")
    allow_pickle: bool = Field(False, description="Allow pickle (.bin/.pt) weights. Off: safetensors only.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward to save memory.")


class QuantizationConfig(Section):
    bits: Literal[4, 8, "none"] = Field("none", description="Load the base in 4-bit or 8-bit (bitsandbytes).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too.")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="Dtype of 4-bit matmuls.")

    @field_validator("bits", mode="before")
    @classmethod
    def _bits(cls, v: Any) -> Any:
        if v is None or v is False or (isinstance(v, str) and v.lower() in ("none", "null", "no", "off", "16")):
            return "none"
        if isinstance(v, str) and v.isdigit():
            return int(v)
        return v


class LoraConfig(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Union[Literal["auto", "all-linear"], list[str]] = Field(
        "auto", description="auto = the right projections for the architecture; all-linear; or a list of names."
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    modules_to_save: list[str] = Field(default_factory=list, description="Modules trained in full and saved.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")


class FieldMap(Section):
    """Which record fields hold the prompt and the answer (generic sources)."""

    instruction: str | None = Field(None, description="Field with the instruction (Alpaca).")
    input: str | None = Field(None, description="Field with the question or extra input.")
    output: str | None = Field(None, description="Field with the answer.")
    messages: str | None = Field(None, description="Field with an OpenAI-style list of {role, content}.")
    text: str | None = Field(None, description="Field with plain text (trained on in full).")
    system: str | None = Field(None, description="Field with a per-record system prompt.")


class Oasst1Options(Section):
    lang: list[str] | None = Field(default_factory=lambda: ["en"], description="Keep messages in these languages.")
    mode: Literal["best_path", "pairs"] = Field(
        "best_path", description="best_path: rank-0 replies from each root; pairs: every prompter->assistant pair."
    )
    multi_turn: bool = Field(True, description="best_path: whole conversations, else only the first exchange.")
    include_synthetic: bool = Field(False, description="Keep model-written (synthetic) messages.")


class DataConfig(Section):
    source: Literal["auto", "jsonl", "json", "csv", "parquet", "oasst1", "webglm", "hf"] = Field(
        "auto", description="Loader: auto picks by file extension; hf = a Hugging Face dataset name."
    )
    path: str | None = Field(None, description="File, folder or hub dataset name of the training data.")
    revision: str | None = Field(None, description="Hub dataset revision (commit/tag); pinned ones are cached.")
    split: str = Field("train", description="Split and optional slice, e.g. train[5000:10000] or train[:10%].")
    validation_path: str | None = Field(None, description="Separate validation file or dataset.")
    validation_split: str | None = Field(None, description="Split (and slice) for validation from the same source.")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="Hold out this fraction of training examples.")
    fields: FieldMap = Field(default_factory=FieldMap, description="Field mapping for generic sources.")
    oasst1: Oasst1Options = Field(default_factory=Oasst1Options, description="OASST1 tree options.")
    template: str = Field("auto", description="Prompt template: auto, chat-template, phi2, chatml, llama2, ...")
    system_prompt: str | None = Field(None, description="System prompt added to every conversation.")
    max_length: Union[int, Literal["auto"]] = Field(512, description="Max tokens per example, or auto (p99).")
    train_on_prompt: bool = Field(False, description="Also compute the loss on prompt tokens.")
    packing: bool = Field(True, description="Padding-free batches: examples concatenated, attention kept apart.")
    max_examples: int | None = Field(None, gt=0, description="Use at most this many training examples.")
    truncation: Literal["drop", "truncate"] = Field(
        "truncate", description="Examples longer than max_length: truncate (default) or drop."
    )

    @field_validator("max_length")
    @classmethod
    def _positive(cls, v: Any) -> Any:
        if isinstance(v, int) and v <= 0:
            raise ValueError("must be a positive number of tokens or 'auto'")
        return v


class TrainingConfig(Section):
    epochs: float = Field(1, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(4, gt=0, description="Examples per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warm-up as a fraction of all steps.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = Field(
        "adamw", description="adamw (torch) or a bitsandbytes optimizer (CUDA)."
    )
    max_grad_norm: float | None = Field(1.0, description="Clip gradients to this norm; null disables.")
    seed: int = Field(42, description="Seed for weights init, dropout and data order.")
    logging_steps: int = Field(1, gt=0, description="Log every N optimizer steps.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps (needs validation data).")
    save_steps: int | None = Field(None, gt=0, description="Checkpoint every N steps.")
    save_total_limit: int = Field(2, gt=0, description="Keep the last N checkpoints (plus the best).")
    patience: int | None = Field(None, gt=0, description="Early stop after N evaluations without improvement.")
    report_to: Literal["tensorboard", "wandb", "none"] = Field("tensorboard", description="Metrics sink.")
    eval_generate_every: int | None = Field(
        None, gt=0, description="Every N steps, greedy-generate on a small fixed sample and log a token-F1."
    )
    num_threads: int | None = Field(None, gt=0, description="CPU threads for torch (default: all cores).")
    fast_path: bool = Field(True, description="Use loratune's fused/chunked loss where correct.")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With several processes (--nproc, accelerate launch): ddp = each holds the whole model; "
        "fsdp = base weights (4-bit too) sharded across processes with FSDP2, for bases too big for one GPU."
    )


class SpeedConfig(Section):
    """Fast paths (loratune.speed). Each is exact, except cpu_bf16 (bf16 compute on the CPU, as on a GPU); each
    can be switched off."""

    varlen_attention: bool = Field(
        True, description="Packed rows: attention per example (flash varlen on CUDA, SDPA per segment elsewhere), "
                          "no [T x T] mask built.")
    compute_dtype_frozen: bool = Field(
        True, description="Keep frozen non-4-bit weights (embeddings, norms, head, biases) in the compute dtype "
                          "instead of the fp32 copies prepare_model_for_kbit_training makes.")
    autocast: bool = Field(
        False, description="On CUDA, run the forward under bf16/fp16 autocast (the notebook recipe's mixed precision). "
                           "Off by default: autocast runs LayerNorm in fp32, which turns the whole residual stream "
                           "and attention fp32 (2x slower on an H100); the fused LoRA node computes in the compute dtype anyway.")
    fused_lora: bool = Field(
        True, description="Each LoRA projection (4-bit or plain base) as one fused autograd node instead of peft's "
                          "module chain: same maths, fewer autograd nodes and saved tensors (-0.2 GiB on Phi-2 QLoRA).")
    fused_cross_entropy: bool = Field(
        True, description="Output head + cross-entropy per chunk with the gradient computed in the same pass; full "
                          "logits never exist (-1 GiB on Phi-2 at batch 4 x 1024; off = checkpointed chunks).")
    ce_chunk_tokens: int = Field(1024, gt=0, description="Tokens per chunk of the fused head + cross-entropy.")
    cpu_bf16: bool = Field(
        True, description="On a CPU that multiplies bf16 natively (AVX512-BF16 or AMX), run the forward under bf16 "
                          "autocast over fp32 LoRA weights, gradients and optimizer states: the CPU counterpart of "
                          "the bf16 compute used on GPUs (as Axolotl's bf16: auto). 2-core EPYC: 1.38x fp32, 2.7x the "
                          "CPU recipe; loss +0.4% after 12 steps. Other CPUs stay fp32 (bf16 is emulated there, "
                          "slower). false = fp32 everywhere.")
    offload_activations: bool = Field(
        True, description="With compiled layers on CUDA (recomputation inside), move each layer's saved input to "
                          "pinned CPU memory on a side stream and prefetch it back for backward. H100, Phi-2 under "
                          "CUDA graphs: 3.60 -> 3.01 GiB peak (below Unsloth's 3.25) for 1.6% of the step rate. "
                          "No effect on the CPU, without recomputation, or under FSDP.")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile each decoder layer (regional) into one forward and one backward graph, "
                            "recomputation and counter-based dropout inside; auto = on for CUDA, off on the CPU "
                            "(there the per-example attention is not traceable, so `on` leaves the layers eager). "
                            "The first step pays the compilation (~85 s for Phi-2 on an H100).")
    folded_lora: bool = Field(
        True, description="In compiled layers, each LoRA projection's B runs inside the base matmul ([x | h] @ "
                          "[W | s B]^T, one matmul; its backward gives dx and dh together): no [tokens x out] LoRA "
                          "product is written and added. Exact. H100 peak: Llama ~1B 1.83 -> 1.62 GiB, Phi-2 3.01 -> "
                          "2.86 GiB.")
    mlp_chunks: int = Field(
        1, ge=1, le=64, description="In compiled layers, compute a gated MLP (Llama-style gate/up/down) in this many "
                                    "slices of its intermediate dimension, so that its backward holds one slice's "
                                    "buffers at a time (a memory lever; the same masks and maths). 1 = off. Its GPU "
                                    "speed and memory have not been measured yet (bench/NOTES.md).")
    cuda_graphs: bool = Field(
        True, description="On CUDA with compiled layers, record each packed micro-batch's forward, loss and backward "
                          "as one CUDA graph per packed length (rows padded to bucket_tokens, 128 if unset) and "
                          "replay it: the CPU no longer issues ~6,000 kernels per step (H100, Phi-2 QLoRA: 1.8x the "
                          "step rate). The optimizer update (clipping, AdamW, zeroing) is recorded too (-9.6 ms per "
                          "Phi-2 step). Every length the data can make is recorded before the first step (~20 s "
                          "after compilation for Phi-2). The activation offload is recorded with it.")
    bucket_tokens: int | None = Field(
        None, gt=0, description="Pad each packed row at its end to a multiple of this many tokens with an ignored "
                                "segment of its own (labels ignored, positions restarting at 0): a few shapes for "
                                "CUDA graphs; null = no padding (128 under cuda_graphs).")

    @field_validator("compile", mode="before")
    @classmethod
    def _on_off(cls, v: Any) -> Any:
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # YAML reads on/off as booleans


class OutputConfig(Section):
    dir: str = Field("runs", description="Folder that holds run folders.")
    name: str | None = Field(None, description="Run folder name (default: from the config file name).")
    overwrite: bool = Field(False, description="Replace an existing run folder of the same name.")


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    speed: SpeedConfig = Field(default_factory=SpeedConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.training.patience and not self.training.eval_steps:
            raise ValueError("training.patience needs training.eval_steps (early stopping watches validation loss)")
        return self


# --- notebook (seed) layout -----------------------------------------------------------------------------------------
# Flat keys our users' notebooks put in training.yaml / qlora.json, mapped to their place in our schema.
SEED_KEYS: dict[str, str] = {
    "model_name": "model.base",
    "model_name_or_path": "model.base",
    "base_model": "model.base",
    "dataset_name": "data.path",
    "dataset": "data.path",
    "data_path": "data.path",
    "train_file": "data.path",
    "validation_file": "data.validation_path",
    "max_seq_length": "data.max_length",
    "max_length": "data.max_length",
    "template": "data.template",
    "output_dir": "output.dir",
    "run_name": "output.name",
    "num_train_epochs": "training.epochs",
    "max_steps": "training.max_steps",
    "per_device_train_batch_size": "training.batch_size",
    "batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.grad_accum",
    "learning_rate": "training.learning_rate",
    "weight_decay": "training.weight_decay",
    "warmup_steps": "training.warmup_steps",
    "warmup_ratio": "training.warmup_ratio",
    "lr_scheduler_type": "training.scheduler",
    "optim": "training.optimizer",
    "max_grad_norm": "training.max_grad_norm",
    "seed": "training.seed",
    "logging_steps": "training.logging_steps",
    "eval_steps": "training.eval_steps",
    "save_steps": "training.save_steps",
    "save_total_limit": "training.save_total_limit",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "trust_remote_code": "model.trust_remote_code",
    # bitsandbytes names
    "bnb_4bit_quant_type": "quantization.quant_type",
    "bnb_4bit_use_double_quant": "quantization.double_quant",
    "bnb_4bit_compute_dtype": "quantization.compute_dtype",
    # peft names
    "r": "lora.r",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "target_modules": "lora.target_modules",
    "bias": "lora.bias",
    "use_dora": "lora.use_dora",
    "use_rslora": "lora.use_rslora",
    "modules_to_save": "lora.modules_to_save",
}
_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "torch.bfloat16": "bf16",
                "torch.float16": "fp16", "torch.float32": "fp32"}
_OPTIM_NAMES = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_bnb_8bit": "adamw_8bit",
                "paged_adamw_8bit": "paged_adamw_8bit", "paged_adamw_32bit": "paged_adamw_32bit"}
_IGNORED_SEED_KEYS = {"task_type", "load_in_4bit", "load_in_8bit", "fp16", "bf16"}  # implied or handled below
SECTIONS = tuple(Config.model_fields)


# --- loading with line numbers ---------------------------------------------------------------------------------------
class SourceMap:
    """Where each dotted key came from (file, line), so errors can point at it."""

    def __init__(self) -> None:
        self.where: dict[str, tuple[str, int | None]] = {}

    def locate(self, dotted: str) -> tuple[str | None, int | None]:
        parts = dotted.split(".")
        while parts:
            hit = self.where.get(".".join(parts))
            if hit:
                return hit
            parts.pop()
        return (next(iter(self.where.values()))[0], None) if self.where else (None, None)


def _yaml_lines(node: yaml.Node, prefix: str, file: str, out: SourceMap) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            out.where[dotted] = (file, key_node.start_mark.line + 1)
            _yaml_lines(value_node, dotted, file, out)


def read_mapping(path: Path, smap: SourceMap) -> dict[str, Any]:
    """Read a YAML or JSON mapping, recording the line of every key."""
    if not path.is_file():
        raise LoratuneError("config file not found", file=path, hint="check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LoratuneError(f"not UTF-8 text (byte {e.start})", file=path, hint="save the file as UTF-8") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LoratuneError(f"invalid JSON: {e.msg}", file=path, line=e.lineno, column=e.colno) from None
        for key in data if isinstance(data, dict) else {}:
            line = next((i + 1 for i, t in enumerate(text.splitlines()) if f'"{key}"' in t), None)
            smap.where[key] = (str(path), line)
            if isinstance(data[key], dict):
                for sub in data[key]:
                    smap.where[f"{key}.{sub}"] = (str(path), line)
    else:
        try:
            node = yaml.compose(text)
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise LoratuneError(
                f"YAML syntax error: {problem}",
                file=path,
                line=mark.line + 1 if mark else None,
                column=mark.column + 1 if mark else None,
                hint="fix the indentation or quoting there",
            ) from None
        if node is not None:
            _yaml_lines(node, "", str(path), smap)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LoratuneError("the top level must be a mapping of sections", file=path, line=1)
    return data


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise LoratuneError(f"cannot set {dotted}: {part} is not a section", key=dotted)
    node[parts[-1]] = value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def normalize_seed_layout(raw: dict[str, Any], file: str, smap: SourceMap) -> dict[str, Any]:
    """Turn flat notebook keys into sections; leave section keys as they are. Unknown flat keys stay at the
    top level so that validation reports them with a suggestion."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS:
            _merge(out.setdefault(key, {}), value if isinstance(value, dict) else {})
            if not isinstance(value, dict):
                out[key] = value  # let validation name the wrong type
            continue
        if key in _IGNORED_SEED_KEYS:
            if key == "load_in_4bit" and value:
                _set_dotted(out, "quantization.bits", 4)
            elif key == "load_in_8bit" and value:
                _set_dotted(out, "quantization.bits", 8)
            continue
        target = SEED_KEYS.get(key)
        if target is None:
            out[key] = value
            continue
        if target.endswith("compute_dtype") and isinstance(value, str):
            value = _DTYPE_NAMES.get(value, value)
        if target == "training.optimizer" and isinstance(value, str):
            value = _OPTIM_NAMES.get(value, value)
        if target == "lora.target_modules" and value == "all-linear":
            value = "all-linear"
        _set_dotted(out, target, value)
        smap.where.setdefault(target, smap.where.get(key, (file, None)))
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """`training.learning_rate=1e-4` -> ("training.learning_rate", 0.0001). Values are parsed as YAML."""
    if "=" not in item:
        raise LoratuneError(f'--set "{item}" is not KEY=VALUE', hint="e.g. --set training.learning_rate=1e-4")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    # YAML 1.1 reads 1e-4 as a string; numbers written that way are numbers to our users.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("Literal", "one of ").replace("NoneType", "null")


def _explain(err: dict[str, Any], root: type[BaseModel]) -> tuple[str, str]:
    """(dotted key, message) for one pydantic error, with suggestions for unknown keys."""
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    dotted = ".".join(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        model: Any = root
        for part in loc[:-1]:
            field = model.model_fields.get(part)
            model = field.annotation if field else None
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                model = None
                break
        choices = list(model.model_fields) if model else []
        if model is root:
            choices += list(SEED_KEYS)
        hint = did_you_mean(loc[-1], choices)
        section = ".".join(loc[:-1]) or "top level"
        return dotted, f"unknown key in {section}" + (f"; {hint}" if hint else f"; valid: {', '.join(choices)}")
    if kind == "literal_error":
        return dotted, f"got {err.get('input')!r}, expected {err['ctx']['expected']}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return dotted, f"got {err.get('input')!r}, {err['msg'].lower()}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        expected = kind.replace("_parsing", "").replace("_type", "")
        return dotted, f"expected {expected}, got {type(err.get('input')).__name__} {err.get('input')!r}"
    if kind == "value_error":  # our own validators: drop pydantic's "Value error, " prefix
        text = err["msg"].removeprefix("Value error, ")
        first, _, rest = text.partition(" ")
        if not dotted and "." in first and rest:  # a cross-section check names its key first: locate that key
            return first, rest
        return dotted, text
    return dotted, err["msg"]


def validate(raw: dict[str, Any], smap: SourceMap | None = None) -> Config:
    """Validate a raw mapping into a Config, turning every problem into one LoratuneError line."""
    smap = smap or SourceMap()
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()
        key, message = _explain(errors[0], Config)
        file, line = smap.locate(key) if key else (None, None)
        more = f" (+{len(errors) - 1} more: " + ", ".join(_explain(x, Config)[0] for x in errors[1:]) + ")" \
            if len(errors) > 1 else ""
        raise LoratuneError(message + more, file=file, line=line, key=key or None) from None


def load_config(
    path: str | Path | None = None,
    *,
    qlora_config: str | Path | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Load YAML (+ optional notebook-style JSON) and `--set` overrides into a validated Config."""
    smap = SourceMap()
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        raw = normalize_seed_layout(read_mapping(p, smap), str(p), smap)
    if qlora_config is not None:
        q = Path(qlora_config)
        extra = normalize_seed_layout(read_mapping(q, smap), str(q), smap)
        _merge(raw, extra)
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
        smap.where[key] = ("--set", None)
    cfg = validate(raw, smap)
    if path is not None and cfg.output.name is None:
        cfg.output.name = Path(path).stem
    return cfg


def dump_config(cfg: Config) -> str:
    """The fully resolved config as YAML, in section order."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
