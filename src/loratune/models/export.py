"""GGUF export of a merged model with the `gguf` Python package: no llama.cpp build needed.

What llama.cpp's `convert_hf_to_gguf.py` does for the Llama architecture (SmolLM2, Llama 2, TinyLlama...), and what
transformers' GGUF loader expects back, so a round trip is exact up to the tensor type:
- tensor names through gguf's own `TensorNameMap` (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`);
- the Q and K projections permuted from Hugging Face's rotate-half layout to llama.cpp's interleaved rotary layout
  (transformers' `LlamaTensorProcessor._reverse_permute_weights` undoes exactly this);
- `output.weight` only when the head is not tied to the embedding (the loader infers tying from its absence);
- 1-D tensors (norms, biases) stay fp32; matrices are f16, or q8_0 (blocks of 32 with one f16 scale) where the
  row length allows;
- the tokenizer as GGUF metadata: tokens, token types, merges, scores, special ids and the chat template.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from loratune.errors import LoratuneError

SUPPORTED_ARCHITECTURES = {"llama": "llama"}  # transformers model_type -> GGUF architecture
GGUF_TYPES = ("f16", "q8_0")
Q8_BLOCK = 32

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def check_architecture(model_type: str, where: str | Path) -> str:
    arch = SUPPORTED_ARCHITECTURES.get(model_type)
    if arch is None:
        raise LoratuneError(f'GGUF export does not support the "{model_type}" architecture', file=where,
                            hint=f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}; use the merged "
                                 "safetensors folder (loratune merge) for other models")
    return arch


def permute_qk(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: rotate-half pairs (i, i + d/2) become adjacent pairs (2i, 2i + 1)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


# --- tokenizer metadata -------------------------------------------------------------------------------------------------
def _walk(node: Any):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def tokenizer_kind(tokenizer: Any) -> tuple[str, str, list[str]]:
    """(GGUF tokenizer model, pre-tokenizer name, merges) of a fast BPE tokenizer, or a one-line error."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LoratuneError("GGUF export needs a fast (tokenizers) tokenizer", key="tokenizer",
                            hint="save the tokenizer with tokenizer.json")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise LoratuneError(f"GGUF export supports BPE tokenizers, this one is {model.get('type')}", key="tokenizer",
                            hint="supported: byte-level BPE (GPT-2/SmolLM2 style) and sentencepiece BPE (Llama 2)")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    types = [n.get("type") for n in _walk([spec.get("pre_tokenizer"), spec.get("decoder")]) if "type" in n]
    if "ByteLevel" in types:
        pre_types = [n for n in _walk(spec.get("pre_tokenizer")) if "type" in n]
        digits = any(n["type"] == "Digits" and n.get("individual_digits") for n in pre_types)
        # llama.cpp names pre-tokenizers by model family; these two are recognisable from the structure.
        pre = "smollm" if digits else "gpt2" if any(n.get("use_regex") for n in pre_types) else "default"
        return "gpt2", pre, merges
    if "Metaspace" in types or (spec.get("normalizer") and "\u2581" in json.dumps(spec.get("normalizer"))) \
            or any(n.get("type") == "Replace" and "\u2581" in json.dumps(n) for n in _walk(spec.get("decoder"))):
        return "llama", "default", merges
    raise LoratuneError("GGUF export cannot describe this BPE tokenizer (neither byte-level nor sentencepiece)",
                        key="tokenizer", hint="supported: byte-level BPE and sentencepiece BPE")


def tokenizer_metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """Tokens (by id, padded to the model's vocabulary), token types, scores and merges."""
    kind, pre, merges = tokenizer_kind(tokenizer)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(max(vocab_size, len(by_id))):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")  # llama.cpp's filler for ids the tokenizer does not use
            types.append(UNUSED)
            continue
        tokens.append(token)
        if i in added:
            types.append(CONTROL if added[i].special else USER_DEFINED)
        elif i == tokenizer.unk_token_id:
            types.append(UNKNOWN)
        elif kind == "llama" and token.startswith("<0x") and token.endswith(">") and len(token) == 6:
            types.append(BYTE)
        else:
            types.append(NORMAL)
    # Scores rank tokens by merge priority, which in a BPE vocabulary is the id order. Sentencepiece-style files
    # need them; byte-level ones carry them too, so a loader can rebuild merges a vocabulary without any lacks.
    scores = [-float(i) for i in range(len(tokens))]
    return {"model": kind, "pre": pre, "tokens": tokens, "types": types, "scores": scores, "merges": merges}


def _add_bos(tokenizer: Any) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


# --- tensors -------------------------------------------------------------------------------------------------------------
def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind not in ("default", None):
        raise LoratuneError(f'GGUF export does not write rope scaling "{kind}" yet', key="rope_parameters",
                            hint="export a model without rope scaling, or use the merged safetensors folder")
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def _tensor_data(name: str, tensor: Any, gguf_type: str):
    """(array, raw GGML type or None) for one tensor at the requested type."""
    import gguf

    data = tensor.detach().float().cpu().numpy()
    if data.ndim <= 1:
        return data.astype(np.float32), None
    if gguf_type == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
        quantized = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        return quantized, gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def write_gguf(model: Any, tokenizer: Any, path: str | Path, *, gguf_type: str = "f16", name: str = "model",
               stop_ids: list[int] | None = None, log=None) -> Path:
    """Write `model` (a transformers Llama-architecture causal LM, full precision) and its tokenizer as GGUF."""
    import gguf

    config = model.config
    arch = check_architecture(getattr(config, "model_type", "?"), path)
    if gguf_type not in GGUF_TYPES:
        raise LoratuneError(f'unknown GGUF type "{gguf_type}"', key="--type", hint=f"choose {' or '.join(GGUF_TYPES)}")
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    meta = tokenizer_metadata(tokenizer, config.vocab_size)
    path = Path(path)
    from loratune.runs import atomic_path

    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(len(meta["tokens"]))
        if head_dim != config.hidden_size // n_head:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        # tokenizer
        writer.add_tokenizer_model(meta["model"])
        writer.add_tokenizer_pre(meta["pre"])
        writer.add_token_list(meta["tokens"])
        writer.add_token_types(meta["types"])
        writer.add_token_scores(meta["scores"])
        if meta["merges"]:
            writer.add_token_merges(meta["merges"])
        for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                                 (writer.add_eos_token_id, tokenizer.eos_token_id),
                                 (writer.add_unk_token_id, tokenizer.unk_token_id),
                                 (writer.add_pad_token_id, tokenizer.pad_token_id)):
            if token_id is not None:
                setter(token_id)
        writer.add_add_bos_token(_add_bos(tokenizer))
        writer.add_add_eos_token(False)
        end_of_turn = [i for i in (stop_ids or []) if i != tokenizer.eos_token_id]
        if end_of_turn:
            writer.add_eot_token_id(end_of_turn[0])  # llama.cpp stops on end-of-turn as well as EOS
        if getattr(tokenizer, "chat_template", None):
            writer.add_chat_template(tokenizer.chat_template)
        # tensors
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        state = model.state_dict()
        for hf_name, tensor in state.items():
            if tied and hf_name == "lm_head.weight":
                continue
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise LoratuneError(f"no GGUF name for tensor {hf_name}", key="export",
                                    hint="this model has layers the Llama GGUF layout cannot hold")
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                tensor = permute_qk(tensor.detach().float().cpu().numpy(), n_head, n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                tensor = permute_qk(tensor.detach().float().cpu().numpy(), n_head, n_kv)
            if isinstance(tensor, np.ndarray):
                import torch

                tensor = torch.from_numpy(np.ascontiguousarray(tensor))
            data, raw_type = _tensor_data(gguf_name, tensor, gguf_type)
            if raw_type is None:
                writer.add_tensor(gguf_name, data)
            else:
                writer.add_tensor(gguf_name, data, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    if log:
        log(f"GGUF ({gguf_type}): {len(state)} tensors, {len(meta['tokens'])} tokens, {path.stat().st_size / 2**20:.1f} MiB")
    return path


# --- from a run or a merged folder ---------------------------------------------------------------------------------------
def export_gguf(ref: str | Path, out: str | Path | None = None, *, gguf_type: str = "f16", overwrite: bool = False,
                log=None) -> Path:
    """Export a run folder (merged on the fly, in fp32) or a merged model folder to one GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratune.config import load_config
    from loratune.data.templates import Template
    from loratune.models.inspect import hf_config_for
    from loratune.models.merge import merge_run

    ref = Path(ref)
    if gguf_type not in GGUF_TYPES:
        raise LoratuneError(f'unknown GGUF type "{gguf_type}"', key="--type", hint=f"choose {' or '.join(GGUF_TYPES)}")
    is_run = (ref / "config.yaml").is_file() and (ref / "template.json").is_file()
    if not is_run and not (ref / "config.json").is_file():
        raise LoratuneError("not a run folder or a merged model folder", file=ref,
                            hint="pass the folder loratune train created, or one written by loratune merge")
    base_config = hf_config_for(load_config(ref / "config.yaml").model.base) if is_run else hf_config_for(str(ref))
    check_architecture(getattr(base_config, "model_type", "?"), ref)
    out = Path(out) if out else ref / f"{ref.name}-{gguf_type}.gguf"
    if out.exists() and not overwrite:
        raise LoratuneError("output file exists", file=out, hint="choose another --out, or pass --overwrite")
    with tempfile.TemporaryDirectory(prefix="loratune-export-") as scratch:
        folder = merge_run(ref, Path(scratch) / "merged", dtype="fp32", log=log) if is_run else ref
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        template_file = Path(folder) / "template.json"
        stop_ids = Template.from_dict(json.loads(template_file.read_text())).stop_token_ids(tokenizer) \
            if template_file.is_file() else None
        return write_gguf(model, tokenizer, out, gguf_type=gguf_type, name=ref.name, stop_ids=stop_ids, log=log)
