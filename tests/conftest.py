"""Shared fixtures: tiny random models built in-process (no network, well under a second each).

`tiny_tokenizer` is a byte-level tokenizer (every byte one token, no merges) with ChatML special tokens and a
ChatML chat template, so masks, offsets and templates behave like a real fast tokenizer's. `tiny_model_dir`
saves a 2-layer Llama-like or Phi-like model with it, so the real loading code paths (folder -> from_pretrained)
are exercised.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def build_tokenizer(pad_is_eos: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {tok: i for i, tok in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab = {**{s: i for i, s in enumerate(SPECIALS)}, **{t: i + len(SPECIALS) for t, i in byte_vocab.items()}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>" if pad_is_eos else "<pad>",
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIALS})
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


def tiny_config(kind: str, vocab_size: int, hidden: int = 32):
    from transformers import LlamaConfig, PhiConfig

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512, initializer_range=0.2, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    if kind == "phi":
        return PhiConfig(**common, num_key_value_heads=4, partial_rotary_factor=0.5, resid_pdrop=0.0,
                         embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False)
    return LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False)


def save_tiny_model(path: Path, kind: str = "llama", seed: int = 0, pad_is_eos: bool = False,
                    edit=None, hidden: int = 32) -> Path:
    """Build, optionally edit in memory (`edit(model, tokenizer)`), then save once. Never re-save over a file the
    model was loaded from: loaded safetensors may still be memory-mapped and would be read half-rewritten."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(pad_is_eos)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, len(tokenizer), hidden))
    if edit is not None:
        edit(model, tokenizer)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory) -> Path:
    """A tiny Llama for generation tests: its output head only writes printable ASCII, with logit margins far
    above float noise. A random head gives near-uniform logits, so greedy choices flip between a batched and a
    single-prompt run (different matmul shapes), and byte tokens decode to broken UTF-8."""

    def printable_head(model, tokenizer) -> None:
        printable = [i for i in range(len(tokenizer)) if i >= len(SPECIALS)
                     and len(text := tokenizer.decode([i])) == 1 and text.isascii() and text.isprintable()]
        with torch.no_grad():
            head = model.get_output_embeddings().weight
            scaled = head[printable] * 8.0
            head.zero_()
            head[printable] = scaled

    return save_tiny_model(tmp_path_factory.mktemp("tiny-chat"), "llama", seed=1, edit=printable_head)


@pytest.fixture(scope="session")
def tiny_phi_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-phi"), "phi")


QA_ROWS = [
    {"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}."}
    for a in range(1, 9) for b in range(1, 5)
]


@pytest.fixture()
def qa_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl")


def write_jsonl(path: Path, rows: list[dict] = QA_ROWS) -> Path:
    """`rows` (default: the QA_ROWS arithmetic questions) as a JSONL file, one object per line; returns its path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_run_config(model_dir: Path, data: Path, out: Path, **training):
    """A validated Config for a fast CPU run on a tiny model."""
    from loratune.config import validate

    t = dict(max_steps=8, batch_size=4, learning_rate=5e-3, logging_steps=1, seed=0)
    t.update(training)
    return validate({
        "model": {"base": str(model_dir), "device": "cpu", "gradient_checkpointing": False},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(data), "max_length": 128, "template": "chatml"},
        "training": t,
        "output": {"dir": str(out), "name": "t"},
    })


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once to a safetensors folder (cached)."""
    from loratune.models.load import convert_gguf, gguf_path_for_alias

    return convert_gguf(gguf_path_for_alias("smollm2-135m-instruct"))
