"""Merging into a full-precision base: exact against base + adapter, and QLoRA adapters merged without 4-bit."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from loratune.data.conversation import Message
from loratune.data.templates import TEMPLATES, Template
from loratune.errors import LoratuneError
from loratune.models.merge import merge_run, template_jinja
from tests.conftest import build_tokenizer, tiny_run_config

IDS = torch.tensor([[5, 80, 81, 82, 40, 41, 42, 43, 90, 91, 92, 2], [7, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]])


def _train(tmp_path_factory, model_dir, bits, learning_rate=3e-2):
    from loratune.train import train
    from tests.conftest import write_jsonl

    data = write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl")
    cfg = tiny_run_config(model_dir, data, tmp_path_factory.mktemp("runs"), max_steps=6, learning_rate=learning_rate)
    cfg.quantization.bits = bits
    return train(cfg, show_progress=False).run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama_dir):
    return _train(tmp_path_factory, tiny_llama_dir, "none")


@pytest.fixture(scope="module")
def qlora_base_dir(tmp_path_factory):
    """A wider tiny Llama (hidden 128, init std 0.02) whose NF4 error is realistic; the 32-wide fixture with std 0.2
    is so chaotic that NF4 alone moves its logits by almost their whole range."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    tokenizer = build_tokenizer()
    config = tiny_config("llama", len(tokenizer))
    config.hidden_size, config.intermediate_size, config.initializer_range = 128, 256, 0.02
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("qlora-base")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, qlora_base_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitsandbytes' CPU 4-bit path is far faster single-threaded on a busy machine
    try:
        return _train(tmp_path_factory, qlora_base_dir, 4, learning_rate=5e-3)
    finally:
        torch.set_num_threads(threads)


def _base(model_dir, bits="none"):
    from loratune.config import ModelConfig, QuantizationConfig
    from loratune.models.load import load_model

    cfg = ModelConfig(base=str(model_dir), device="cpu", dtype="fp32")
    return load_model(cfg, QuantizationConfig(bits=bits), for_training=False).model.eval()


def _base_plus_adapter(model_dir, run, bits="none"):
    from peft import PeftModel

    return PeftModel.from_pretrained(_base(model_dir, bits), str(run / "adapter")).eval()


@torch.no_grad()
def _logits(model, *, training_mode: bool = False) -> torch.Tensor:
    # bitsandbytes repacks 4-bit weights for a bf16 CPU kernel in eval mode (which needs in_features >= 64, more
    # than the tiny model has); training mode (no dropout here) keeps the path training used.
    model.train(training_mode)
    return model(input_ids=IDS).logits.float()


def test_merged_logits_equal_base_plus_adapter(lora_run, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = merge_run(lora_run, tmp_path / "merged", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # plain transformers, no loratune, no peft
    reference = _logits(_base_plus_adapter(tiny_llama_dir, lora_run))
    base = _logits(_base(tiny_llama_dir))
    assert (reference - base).abs().max() > 1e-2  # the adapter really changes the model (the test has teeth)
    assert (_logits(merged) - reference).abs().max() < 1e-4
    assert not any("lora" in n for n, _ in merged.named_parameters())

    names = sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "template.json", "loratune_merge.json"} <= set(names)
    assert not any(p.name.startswith(".tmp-") for p in out.parent.iterdir())  # written atomically
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(str(out)).eos_token_id == im_end  # chatml's end of turn stops it
    template = Template.from_dict(json.loads((out / "template.json").read_text()))
    messages = [Message("user", "What is 2 plus 3?")]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == template.prompt(messages, tokenizer)


def test_merge_never_loads_the_base_in_4bit(qlora_run, qlora_base_dir, tmp_path):
    """A QLoRA adapter merged into the fp32 base stays as close to 4-bit base + adapter (what training saw) as the
    base's own NF4 error allows; the merge is done in fp32 even though the run trained in 4-bit."""
    from transformers import AutoModelForCausalLM

    out = merge_run(qlora_run, tmp_path / "merged", dtype="fp32")
    assert json.loads((out / "loratune_merge.json").read_text())["trained_bits"] == 4
    merged = _logits(AutoModelForCausalLM.from_pretrained(str(out)).eval())
    qlora = _logits(_base_plus_adapter(qlora_base_dir, qlora_run, bits=4), training_mode=True)  # what training saw
    exact = _logits(_base_plus_adapter(qlora_base_dir, qlora_run))
    base_fp, base_q4 = _logits(_base(qlora_base_dir)), _logits(_base(qlora_base_dir, bits=4), training_mode=True)
    assert (merged - exact).abs().max() < 1e-4  # the merge itself is exact
    gap = (merged - qlora).abs().max().item()
    quantization_error = (base_fp - base_q4).abs().max().item()
    adapter_effect = (exact - base_fp).abs().max().item()
    print(f"QLoRA merge: adapter effect {adapter_effect:.4f}; gap {gap:.4f}; base NF4 error {quantization_error:.4f}")
    # Measured (6 QLoRA steps at lr 5e-3, logits of magnitude ~1.1-1.6). 4-bit training on the CPU is not
    # reproducible across processes (the first step's loss already differs by ~1% with LoRA B at zero; cause not
    # found, it is in the 4-bit CPU setup, not in any speed switch), so the adapter differs run to run: over 12 runs
    # it moved logits by 0.8-2.3 and the merged model was 0.15-0.50 from 4-bit base + adapter, with NF4 alone moving
    # the base by 0.21. Stated tolerance: within 3x the base's own NF4 error and under 0.65 absolute, i.e. the gap
    # is quantization-sized while the adapter's own effect is larger still.
    assert adapter_effect > 0.1
    assert gap < 3 * quantization_error and gap < 0.65 and gap < adapter_effect


def test_merge_cli_bf16_and_refuses_to_overwrite(lora_run, tmp_path):
    from loratune.cli import app

    runner = CliRunner()
    out = tmp_path / "m16"
    result = runner.invoke(app, ["merge", str(lora_run), "--out", str(out), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(LoratuneError, match="output folder exists and is not empty"):
        merge_run(lora_run, out)


def test_merge_bad_inputs(tmp_path):
    with pytest.raises(LoratuneError, match="not a loratune run folder"):
        merge_run(tmp_path, tmp_path / "out")
    with pytest.raises(LoratuneError, match='unknown dtype "int4"'):
        merge_run(tmp_path, tmp_path / "out", dtype="int4")


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_named_templates_become_equivalent_jinja(name):
    """Every named template, written as a Jinja chat template, renders multi-turn prompts identically."""
    tokenizer = build_tokenizer()
    template = TEMPLATES[name]
    jinja = template_jinja(template, tokenizer)
    conversation = [Message("system", "Be brief."), Message("user", "Hi\nthere"), Message("assistant", "Hello!"),
                    Message("user", 'Say "2+2"?')]
    for messages in (conversation, conversation[1:]):
        expected = template.prompt(messages, tokenizer)
        got = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                            chat_template=jinja, tokenize=False, add_generation_prompt=True)
        assert got == expected
