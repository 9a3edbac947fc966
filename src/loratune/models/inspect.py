"""Look inside a base model before training it: the module tree, what a LoRA would target, parameter counts and an
estimate of training memory.

Everything here works on a model built on the `meta` device (shapes, no storage), so inspecting a Phi-2-size
config from a folder that holds only `config.json`, or from a hub id's config, needs no RAM for weights.

The memory estimate follows what a loratune training step really allocates (bytes):
- weights: linear layers at the bit width (bitsandbytes NF4/FP4: 4 bits + block constants; LLM.int8: 1 byte +
  a per-row scale); everything else (embeddings, norms, head) in the compute dtype, or in fp32 once
  `prepare_model_for_kbit_training` upcasts it for a quantized base;
- LoRA: parameters, gradients and the two AdamW moments, all fp32 (peft keeps adapters in fp32 for 16-bit bases);
- activations: what autograd saves per token and layer (an empirical count per architecture family, validated
  against measured peaks in BENCHMARKS.md); with gradient checkpointing only each layer's input is kept, plus one
  layer's working set while it is recomputed;
- logits and loss: loratune's chunked head never materialises more than `CHUNK_TOKENS` rows of fp32 logits (and
  their gradient); architectures outside the fast path pay for the full [tokens x vocab] logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loratune.config import LoraConfig
from loratune.errors import LoratuneError

GIB = 1024**3
DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


# --- building on the meta device ---------------------------------------------------------------------------------------
def hf_config_for(ref: str, *, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The transformers config of a model reference (alias, .gguf, folder with config.json, or hub id); no weights
    are read, so a folder with only config.json is enough."""
    from transformers import AutoConfig

    from loratune.models.load import ALIASES, _hub_error, convert_gguf, gguf_path_for_alias

    path = Path(ref).expanduser()
    if ref in ALIASES:
        source = str(convert_gguf(gguf_path_for_alias(ref)))
    elif ref.endswith(".gguf"):
        if not path.is_file():
            raise LoratuneError("GGUF file not found", file=ref, key="model.base")
        source = str(convert_gguf(path))
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise LoratuneError("model folder has no config.json", file=path, hint="point at a saved model folder")
        source = str(path)
    elif ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise LoratuneError("model path not found", file=ref, key="model.base",
                            hint="check the path, or use a hub id like microsoft/phi-2")
    else:
        source = ref
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        raise _hub_error(source, e) from None


def meta_model(hf_config: Any, *, trust_remote_code: bool = False) -> Any:
    """The causal LM for `hf_config` with every tensor on the meta device (shapes only, zero bytes)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
        except ValueError as e:
            raise LoratuneError(f"not a causal language model: {str(e).splitlines()[0][:160]}",
                                key="model.base") from None


# --- the module tree ---------------------------------------------------------------------------------------------------
@dataclass
class ModuleRow:
    """One line of the compact tree: every module whose path matches `pattern` (numbers folded into ranges)."""

    pattern: str
    kind: str
    shape: str
    count: int
    targeted: bool


def _fold(indices: list[int]) -> str:
    ordered = sorted(set(indices))
    if len(ordered) > 1 and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{{{ordered[0]}..{ordered[-1]}}}"
    return "{" + ",".join(map(str, ordered)) + "}" if len(ordered) > 1 else str(ordered[0])


def linear_shape(module: Any) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear-like layer (nn.Linear, bitsandbytes layers, gpt2 Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):  # gpt2 stores the weight transposed: [in, out]
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    return None


def _describe(module: Any) -> str:
    shape = linear_shape(module)
    if shape:
        return f"{shape[0]}->{shape[1]}"
    if isinstance(module, torch.nn.Embedding):
        return f"{module.num_embeddings}x{module.embedding_dim}"
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return "(" + ",".join(str(d) for d in weight.shape) + ")"
    return ""


def module_tree(model: Any, targets: list[str]) -> list[ModuleRow]:
    """Leaf modules grouped by path pattern, in model order: `model.layers.{0..29}.self_attn.q_proj`."""
    groups: dict[tuple[str, str, str], list[list[int]]] = {}
    order: list[tuple[str, str, str]] = []
    for name, module in model.named_modules():
        if not name or any(True for _ in module.children()):
            continue
        parts = name.split(".")
        numbers = [int(p) for p in parts if p.isdigit()]
        skeleton = ".".join("#" if p.isdigit() else p for p in parts)
        key = (skeleton, type(module).__name__, _describe(module))
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(numbers)
    rows = []
    for skeleton, kind, shape in order:
        members = groups[(skeleton, kind, shape)]
        pattern_parts, slot = [], 0
        for part in skeleton.split("."):
            if part == "#":
                pattern_parts.append(_fold([m[slot] for m in members]))
                slot += 1
            else:
                pattern_parts.append(part)
        leaf = skeleton.rsplit(".", 1)[-1]
        rows.append(ModuleRow(".".join(pattern_parts), kind, shape, len(members), leaf in targets))
    return rows


# --- parameter counts ----------------------------------------------------------------------------------------------------
@dataclass
class ParameterCounts:
    total: int  # base parameters (logical, unpacked)
    trainable: int  # LoRA (+ DoRA magnitudes, + modules_to_save copies)
    lora_modules: int  # how many layers get an adapter


def _targeted(model: Any, targets: list[str]) -> list[tuple[str, tuple[int, int]]]:
    out = []
    for name, module in model.named_modules():
        shape = linear_shape(module)
        if shape and name.rsplit(".", 1)[-1] in targets:
            out.append((name, shape))
    return out


def count_lora(model: Any, cfg: LoraConfig, targets: list[str]) -> ParameterCounts:
    """Counts from shapes alone, exactly what peft will create: r x (in + out) per adapted layer, plus one
    magnitude per output feature with DoRA, plus full copies of `modules_to_save`."""
    total = sum(p.numel() for p in model.parameters())
    targeted = _targeted(model, targets)
    trainable = sum(cfg.r * (i + o) + (o if cfg.use_dora else 0) for _, (i, o) in targeted)
    for name, module in model.named_modules():
        if name and name.rsplit(".", 1)[-1] in cfg.modules_to_save:
            trainable += sum(p.numel() for p in module.parameters())
    return ParameterCounts(total, trainable, len(targeted))


# --- memory ---------------------------------------------------------------------------------------------------------------
def quantized_bytes_per_param(bits: int | str, double_quant: bool = True) -> float:
    """Storage per weight of a quantized linear layer. NF4/FP4: 4 bits plus one absmax per block of 64 (fp32, or
    8-bit with a fp32 constant per 256 blocks under double quantization). LLM.int8: 1 byte (row scales separate)."""
    if bits == 4:
        return 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)
    if bits == 8:
        return 1.0
    raise ValueError(bits)


# Activations whose MLP nonlinearity is a composite of elementwise ops (each saving its input for backward), as
# opposed to one fused op (silu, exact gelu, gelu_pytorch_tanh) that saves only its input.
_COMPOSITE_ACTIVATIONS = {"gelu_new", "gelu_fast", "quick_gelu"}


def activation_elements_per_token(hf_config: Any, lora_inputs_per_layer: int) -> int:
    """Elements autograd saves per token in one decoder layer without checkpointing.

    Calibrated by counting the tensors autograd keeps (saved-tensor hooks) on 1- and 2-layer Llama and Phi models
    of several widths: Llama keeps 8h + 4i per token and layer (with kv heads = heads), Phi 7h + 5i. The attention
    part is the residual stream and norm outputs (4h), q, k, v (h + 2 kv) and the attention output (h); a gated MLP
    (Llama family) keeps gate, up, act(gate) and their product (4i); gelu_new (Phi-2, GPT-2) is five elementwise
    ops (5i); a fused activation keeps fc1's output and its own (2i). LoRA adds the dropped-out input of every
    adapted layer when dropout is on.
    """
    h = int(getattr(hf_config, "hidden_size", 0) or getattr(hf_config, "n_embd", 0))
    inter = int(getattr(hf_config, "intermediate_size", 0) or getattr(hf_config, "n_inner", 0) or 4 * h)
    heads = int(getattr(hf_config, "num_attention_heads", 0) or getattr(hf_config, "n_head", 1))
    kv = int(getattr(hf_config, "num_key_value_heads", 0) or heads)
    kv_dim = h * kv // heads
    act = str(getattr(hf_config, "hidden_act", "") or getattr(hf_config, "activation_function", ""))
    gated = act in ("silu", "swish") or hasattr(hf_config, "mlp_bias")
    attention = 6 * h + 2 * kv_dim
    mlp = 4 * inter if gated else 5 * inter if act in _COMPOSITE_ACTIVATIONS else 2 * inter
    return attention + mlp + lora_inputs_per_layer


@dataclass
class MemoryEstimate:
    """Training memory in bytes for one configuration; `rows()` gives the printable breakdown."""

    weights: int
    lora_params: int
    lora_grads: int
    optimizer: int
    activations: int
    logits: int
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.lora_params + self.lora_grads + self.optimizer + self.activations + self.logits

    def rows(self) -> list[tuple[str, float]]:
        return [("weights", self.weights / GIB), ("LoRA parameters", self.lora_params / GIB),
                ("LoRA gradients", self.lora_grads / GIB), ("AdamW states", self.optimizer / GIB),
                ("activations", self.activations / GIB), ("logits + loss", self.logits / GIB),
                ("total", self.total / GIB)]

    def one_line(self) -> str:
        s = self.settings
        ckpt = "with" if s.get("gradient_checkpointing") else "without"
        bits = "unquantized" if s.get("bits") == "none" else f"{s.get('bits')}-bit"
        unit, scale = ("GiB", GIB) if self.total >= GIB else ("MiB", 1024**2)
        return (f"estimated training memory: {self.total / scale:.2f} {unit} (weights {self.weights / scale:.2f}, "
                f"LoRA+grads+AdamW {(self.lora_params + self.lora_grads + self.optimizer) / scale:.2f}, activations "
                f"{self.activations / scale:.2f}, logits {self.logits / scale:.2f}) for batch {s.get('batch_size')} x "
                f"{s.get('seq_len')} tokens, {bits} weights, {ckpt} gradient checkpointing")


def _head_names(model: Any) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def estimate_memory(model: Any, lora: LoraConfig, targets: list[str], *, batch_size: int, seq_len: int,
                    bits: int | str, dtype: torch.dtype, gradient_checkpointing: bool, double_quant: bool = True,
                    fast_loss: bool | None = None) -> MemoryEstimate:
    """Bytes a training step needs for `model` (real or meta) with this LoRA, batch, sequence length and bit width."""
    from loratune.training.loss import CHUNK_TOKENS, PLAIN_HEAD_TYPES

    hf_config = model.config
    act_bytes = DTYPE_BYTES.get(dtype, 4)
    quantized = bits in (4, 8)
    # k-bit preparation upcasts every 16-bit parameter that is not a packed 4-bit weight to fp32.
    plain_bytes = 4 if quantized else act_bytes
    heads = _head_names(model)
    weights = 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        is_linear = linear_shape(module) is not None and name not in heads
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied embeddings are stored once
                continue
            seen.add(id(p))
            if quantized and is_linear and pname == "weight":
                weights += int(p.numel() * quantized_bytes_per_param(bits, double_quant))
                if bits == 8:
                    weights += linear_shape(module)[1] * 4  # per-row fp32 scale
            else:
                weights += p.numel() * plain_bytes
    counts = count_lora(model, lora, targets)
    lora_params = counts.trainable * 4
    tokens = batch_size * seq_len
    layers = int(getattr(hf_config, "num_hidden_layers", 0) or getattr(hf_config, "n_layer", 1))
    targeted = _targeted(model, targets)
    lora_inputs = sum(i for _, (i, _) in targeted) // max(layers, 1) if lora.dropout > 0 else 0
    per_layer = activation_elements_per_token(hf_config, lora_inputs) * tokens * act_bytes
    hidden = int(getattr(hf_config, "hidden_size", 0) or getattr(hf_config, "n_embd", 0))
    if gradient_checkpointing:
        activations = layers * hidden * tokens * act_bytes + per_layer
    else:
        activations = layers * per_layer
    vocab = int(getattr(hf_config, "vocab_size", 0))
    if fast_loss is None:
        fast_loss = getattr(hf_config, "model_type", "") in PLAIN_HEAD_TYPES
    if fast_loss:
        logits = min(tokens, CHUNK_TOKENS) * vocab * 4 * 2  # one chunk's fp32 logits and their gradient
    else:
        logits = tokens * vocab * (act_bytes + 4 + 4)  # logits, their fp32 copy, the gradient
    return MemoryEstimate(weights, lora_params, lora_params, lora_params * 2, activations, logits,
                          settings=dict(batch_size=batch_size, seq_len=seq_len, bits=bits, dtype=str(dtype),
                                        gradient_checkpointing=gradient_checkpointing))


# --- the whole report -------------------------------------------------------------------------------------------------
@dataclass
class InspectReport:
    name: str
    model_type: str
    rows: list[ModuleRow]
    targets: list[str]
    target_shapes: dict[str, tuple[int, int]]
    counts: ParameterCounts
    estimate: MemoryEstimate
    estimate_no_ckpt: MemoryEstimate


def inspect_model(ref: str, lora: LoraConfig, *, batch_size: int = 4, seq_len: int = 512, bits: int | str = 4,
                  dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False) -> InspectReport:
    """Everything `loratune inspect` prints, computed on the meta device."""
    from loratune.models.load import resolve_dtype
    from loratune.models.lora import linear_module_names, resolve_targets

    hf_config = hf_config_for(ref, trust_remote_code=trust_remote_code)
    model = meta_model(hf_config, trust_remote_code=trust_remote_code)
    target_device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    torch_dtype = resolve_dtype(dtype, target_device)
    targets = resolve_targets(model, lora)
    shapes = {k: v for k, v in linear_module_names(model).items() if k in targets}
    kwargs = dict(batch_size=batch_size, seq_len=seq_len, bits=bits, dtype=torch_dtype)
    return InspectReport(
        name=ref, model_type=getattr(hf_config, "model_type", "?"), rows=module_tree(model, targets), targets=targets,
        target_shapes=shapes, counts=count_lora(model, lora, targets),
        estimate=estimate_memory(model, lora, targets, gradient_checkpointing=True, **kwargs),
        estimate_no_ckpt=estimate_memory(model, lora, targets, gradient_checkpointing=False, **kwargs),
    )


def format_report(report: InspectReport) -> list[str]:
    """Plain text lines (the CLI prints them through rich)."""
    lines = [f"{report.name} ({report.model_type})", "", "module tree (one line per path pattern):"]
    width = max(len(r.pattern) for r in report.rows) if report.rows else 0
    for r in report.rows:
        mark = " [LoRA]" if r.targeted else ""
        lines.append(f"  {r.pattern:<{width}}  {r.kind} {r.shape}{mark}".rstrip())
    lines += ["", "LoRA targets: " + ", ".join(f"{n} {i}->{o}" for n, (i, o) in report.target_shapes.items())]
    c = report.counts
    lines.append(f"parameters: {c.total:,} total; {c.trainable:,} trainable ({100 * c.trainable / max(c.total, 1):.3f}%) "
                 f"in {c.lora_modules} adapted layers")
    s = report.estimate.settings
    lines += ["", f"training memory estimate (GiB), batch {s['batch_size']} x {s['seq_len']} tokens, "
                  f"{'unquantized' if s['bits'] == 'none' else str(s['bits']) + '-bit'} weights, "
                  f"{s['dtype'].replace('torch.', '')} compute:",
              f"  {'':<18}{'checkpointing':>14}{'no checkpointing':>18}"]
    for (label, with_ckpt), (_, without) in zip(report.estimate.rows(), report.estimate_no_ckpt.rows()):
        lines.append(f"  {label:<18}{with_ckpt:>14.3f}{without:>18.3f}")
    return lines


def training_estimate(hf_config: Any, lora: LoraConfig, *, batch_size: int, seq_len: int, bits: int | str,
                      dtype: torch.dtype, gradient_checkpointing: bool, double_quant: bool = True,
                      trust_remote_code: bool = False) -> MemoryEstimate:
    """The estimate for a run about to start (printed by `train` before the first step), built from the loaded
    model's config on the meta device so a 4-bit model's packed weights do not skew the counts."""
    import copy

    from loratune.models.lora import resolve_targets

    config = copy.deepcopy(hf_config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = meta_model(config, trust_remote_code=trust_remote_code)
    return estimate_memory(model, lora, resolve_targets(model, lora), batch_size=batch_size, seq_len=seq_len,
                           bits=bits, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
                           double_quant=double_quant)
