"""Config: typed, validated once; unknown keys get a suggestion, wrong types name the type, lines are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratune.config import dump_config, load_config
from loratune.errors import LoratuneError

REPO = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_misspelled_key_names_key_file_line_and_suggestion(tmp_path):
    cfg = write(tmp_path / "c.yaml", "model:\n  base: x/y\ntraining:\n  learnig_rate: 1e-4\n")
    with pytest.raises(LoratuneError) as e:
        load_config(cfg)
    msg = str(e.value)
    assert "training.learnig_rate" in msg
    assert 'did you mean "learning_rate"' in msg
    assert f"{cfg}:4" in msg


def test_misspelled_section_suggests_section(tmp_path):
    cfg = write(tmp_path / "c.yaml", "trainng:\n  epochs: 1\n")
    with pytest.raises(LoratuneError, match='did you mean "training"'):
        load_config(cfg)


def test_wrong_type_names_key_and_expected_type(tmp_path):
    cfg = write(tmp_path / "c.yaml", "training:\n  batch_size: four\n")
    with pytest.raises(LoratuneError) as e:
        load_config(cfg)
    assert "training.batch_size" in str(e.value) and "expected int" in str(e.value)
    assert f"{cfg}:2" in str(e.value)


def test_negative_learning_rate_is_refused(tmp_path):
    cfg = write(tmp_path / "c.yaml", "training:\n  learning_rate: -0.1\n")
    with pytest.raises(LoratuneError, match="training.learning_rate.*greater than 0"):
        load_config(cfg)


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    cfg = write(tmp_path / "c.yaml", "model:\n  base: [unclosed\ntraining: {}\n")
    with pytest.raises(LoratuneError) as e:
        load_config(cfg)
    assert "YAML syntax error" in str(e.value)
    assert e.value.line is not None and e.value.column is not None


def test_set_overrides_parse_numbers_and_nested_keys(tmp_path):
    cfg = write(tmp_path / "run.yaml", "training:\n  learning_rate: 0.001\n")
    c = load_config(cfg, overrides=["training.learning_rate=1e-4", "lora.target_modules=[q_proj, v_proj]",
                                    "quantization.bits=4"])
    assert c.training.learning_rate == pytest.approx(1e-4)
    assert c.lora.target_modules == ["q_proj", "v_proj"]
    assert c.quantization.bits == 4
    assert c.output.name == "run"  # from the file name


def test_unknown_override_key_is_refused(tmp_path):
    with pytest.raises(LoratuneError, match='did you mean "max_steps"'):
        load_config(None, overrides=["training.max_step=3"])


def test_notebook_layout_training_yaml_plus_qlora_json(tmp_path):
    training = write(tmp_path / "training.yaml", "model_name: microsoft/phi-2\nlearning_rate: 2.0e-4\n"
                     "num_train_epochs: 2\nper_device_train_batch_size: 8\ngradient_accumulation_steps: 2\n"
                     "max_seq_length: 1024\ndataset_name: data/train.jsonl\n")
    qlora = write(tmp_path / "qlora.json", json.dumps({
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16", "r": 32, "lora_alpha": 64, "lora_dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"], "task_type": "CAUSAL_LM"}))
    c = load_config(training, qlora_config=qlora)
    assert c.model.base == "microsoft/phi-2"
    assert (c.training.epochs, c.training.batch_size, c.training.grad_accum) == (2, 8, 2)
    assert c.data.max_length == 1024 and c.data.path == "data/train.jsonl"
    assert (c.quantization.bits, c.quantization.quant_type, c.quantization.compute_dtype) == (4, "nf4", "bf16")
    assert (c.lora.r, c.lora.alpha) == (32, 64)
    assert c.lora.target_modules == ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]


def test_notebook_json_typo_names_the_json_file(tmp_path):
    qlora = write(tmp_path / "qlora.json", '{\n  "r": 8,\n  "lora_alpah": 16\n}\n')
    with pytest.raises(LoratuneError) as e:
        load_config(None, qlora_config=qlora)
    assert str(qlora) in str(e.value) and 'did you mean "lora_alpha"' in str(e.value)


def test_resolved_config_round_trips(tmp_path):
    c = load_config(None, overrides=["training.max_steps=5"])
    path = write(tmp_path / "resolved.yaml", dump_config(c))
    assert load_config(path).model_dump() == {**c.model_dump(), "output": {**c.model_dump()["output"], "name": "resolved"}}


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_validates(example):
    load_config(example)
