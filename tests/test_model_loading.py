"""Loading: dtype choice, tokenizer padding fixes, gradient checkpointing switch, and every bad input as one line."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from loratune.config import LoraConfig, ModelConfig, QuantizationConfig
from loratune.errors import LoratuneError
from loratune.models import load
from loratune.models.load import fix_padding, load_model, load_tokenizer, resolve_dtype
from loratune.models.lora import add_lora
from tests.conftest import build_tokenizer, save_tiny_model


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# --- dtype ------------------------------------------------------------------------------------------------------------
def test_dtype_auto_per_device(monkeypatch):
    assert resolve_dtype("auto", "cpu") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda") is torch.float16
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16


def test_cuda_requested_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LoratuneError) as err:
        load.resolve_device("cuda")
    assert "model.device" in _one_line(err)


# --- tokenizer fixes ----------------------------------------------------------------------------------------------------
def test_pad_distinct_from_eos_when_vocab_allows():
    tok = build_tokenizer(pad_is_eos=True)
    assert tok.pad_token == tok.eos_token
    fix_padding(tok)
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token == "<|endoftext|>"  # the unk/endoftext token, never BOS
    assert tok.padding_side == "right"


def test_pad_falls_back_to_eos_when_nothing_else_exists():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(vocab={"a": 0, "b": 1, "</s>": 2, "<s>": 3}, unk_token="a"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", bos_token="<s>")
    tok.unk_token = None
    fix_padding(tok)
    assert tok.pad_token_id == tok.eos_token_id == 2


def test_padding_sides_training_right_inference_left(tiny_llama_dir):
    cfg = ModelConfig(base=str(tiny_llama_dir), device="cpu")
    train_tok = load_tokenizer(str(tiny_llama_dir), cfg)
    infer_tok = load_tokenizer(str(tiny_llama_dir), cfg, for_training=False)
    assert (train_tok.padding_side, infer_tok.padding_side) == ("right", "left")
    enc = infer_tok(["hi", "a longer prompt"], padding=True)
    assert enc["input_ids"][0][0] == infer_tok.pad_token_id  # pads in front, prompt ends at the right edge
    assert enc["input_ids"][0][-1] != infer_tok.pad_token_id


def test_left_padding_makes_batched_greedy_match_single(tiny_llama_dir):
    loaded = load_model(ModelConfig(base=str(tiny_llama_dir), device="cpu"), QuantizationConfig(), for_training=False)
    model, tok = loaded.model.eval(), loaded.tokenizer
    prompts = ["hi", "what is two plus two?"]
    single = [model.generate(**tok([p], return_tensors="pt"), max_new_tokens=6, do_sample=False)[0, -6:].tolist()
              for p in prompts]
    enc = tok(prompts, return_tensors="pt", padding=True)
    batched = model.generate(**enc, max_new_tokens=6, do_sample=False)[:, -6:].tolist()
    assert batched == single


def test_real_tokenizer_fixes(smollm2_dir):
    tok = load_tokenizer(str(smollm2_dir), ModelConfig(base=str(smollm2_dir)))
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token_id != tok.bos_token_id
    assert tok.padding_side == "right"


# --- gradient checkpointing switch -------------------------------------------------------------------------------------
@pytest.mark.parametrize("enabled", [True, False])
def test_gradient_checkpointing_switch(tiny_llama_dir, enabled):
    loaded = load_model(ModelConfig(base=str(tiny_llama_dir), device="cpu", gradient_checkpointing=enabled),
                        QuantizationConfig())
    model = add_lora(loaded.model, LoraConfig(r=4, dropout=0.0), quantized=False, gradient_checkpointing=enabled)
    assert model.get_base_model().is_gradient_checkpointing is enabled
    model.train()
    ids = torch.arange(4, 40).reshape(2, 18)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_checkpointing_gives_the_same_gradients(tiny_llama_dir):
    def lora_grads(enabled: bool) -> dict[str, torch.Tensor]:
        loaded = load_model(ModelConfig(base=str(tiny_llama_dir), device="cpu"), QuantizationConfig())
        torch.manual_seed(0)
        model = add_lora(loaded.model, LoraConfig(r=4, dropout=0.0), quantized=False, gradient_checkpointing=enabled)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        ids = torch.arange(4, 40).reshape(2, 18)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    with_ckpt, without = lora_grads(True), lora_grads(False)
    assert with_ckpt.keys() == without.keys()
    for name in with_ckpt:
        torch.testing.assert_close(with_ckpt[name], without[name], rtol=1e-5, atol=1e-6)


# --- bad input: one clear line each -----------------------------------------------------------------------------------
def test_missing_model_path():
    with pytest.raises(LoratuneError) as err:
        load_model(ModelConfig(base="./no/such/model"), QuantizationConfig())
    assert "model path not found" in _one_line(err)


def test_hub_id_while_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing to fall back on
    with pytest.raises(LoratuneError) as err:
        load_model(ModelConfig(base="someone/not-cached-model"), QuantizationConfig())
    text = _one_line(err)
    assert text.startswith("model.base: cannot load someone/not-cached-model") and "offline" in text


def test_gguf_of_unsupported_architecture(tmp_path, monkeypatch):
    import gguf
    import numpy as np

    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LoratuneError) as err:
        load_model(ModelConfig(base=str(path)), QuantizationConfig())
    text = _one_line(err)
    assert str(path) in text and "rwkv6" in text and "supported: llama" in text


def test_four_bit_without_bitsandbytes(monkeypatch, tiny_llama_dir):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(LoratuneError) as err:
        load_model(ModelConfig(base=str(tiny_llama_dir), device="cpu"), QuantizationConfig(bits=4))
    assert _one_line(err) == ("quantization.bits: 4-bit loading needs bitsandbytes "
                              "(pip install 'bitsandbytes>=0.50.2' (or set quantization.bits: none))")


def test_folder_without_weights(tmp_path, tiny_llama_dir):
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(LoratuneError) as err:
        load_model(ModelConfig(base=str(tmp_path)), QuantizationConfig())
    assert "has no weights" in _one_line(err)


def test_corrupt_safetensors(tmp_path, tiny_llama_dir):
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
    with pytest.raises(LoratuneError) as err:
        load_model(ModelConfig(base=str(folder), device="cpu"), QuantizationConfig())
    assert "corrupt or truncated" in _one_line(err)


def test_pickle_only_weights_refused_unless_allowed(tmp_path):
    from safetensors.torch import load_file

    folder = save_tiny_model(tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(LoratuneError) as err:
        load_model(ModelConfig(base=str(folder)), QuantizationConfig())
    assert "--allow-pickle" in _one_line(err)
    loaded = load_model(ModelConfig(base=str(folder), device="cpu", allow_pickle=True), QuantizationConfig())
    torch.testing.assert_close(loaded.model.model.embed_tokens.weight, state["model.embed_tokens.weight"])


def test_trust_remote_code_off_by_default(tmp_path, tiny_llama_dir):
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my_custom_arch", auto_map={"AutoConfig": "modeling_custom.CustomConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoratuneError) as err:
        load_model(ModelConfig(base=str(folder)), QuantizationConfig())
    assert "model.trust_remote_code" in _one_line(err)
