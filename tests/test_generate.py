"""Generation: settings, stop strings split over tokens, streaming == batched answers, JSONL files in and out,
generation defaults from generation_config.json, and the `generate` command."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from loratune.cli import app
from loratune.data.conversation import Message
from loratune.errors import LoratuneError
from loratune.generate import (
    SamplingSettings,
    StopCutter,
    generate_batch,
    load_for_inference,
    read_prompts,
    stream_answer,
)
from tests.conftest import write_jsonl

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_im(tiny_chat_dir):
    return load_for_inference(tiny_chat_dir, device="cpu")


def test_settings_override_keeps_defaults_and_validate_names_the_option():
    base = SamplingSettings(max_new_tokens=64, temperature=0.7, top_p=0.9)
    changed = base.override(max_new_tokens=8, temperature=None, top_k=5)
    assert (changed.max_new_tokens, changed.temperature, changed.top_p, changed.top_k) == (8, 0.7, 0.9, 5)
    assert changed.generate_kwargs() == {"max_new_tokens": 8, "repetition_penalty": 1.0, "do_sample": True,
                                         "temperature": 0.7, "top_p": 0.9, "top_k": 5}
    with pytest.raises(LoratuneError, match="top_p: must be in"):
        SamplingSettings(top_p=1.5).validate()
    with pytest.raises(LoratuneError, match="max_new_tokens: must be at least 1"):
        SamplingSettings(max_new_tokens=0).validate()


def test_generation_config_gives_defaults():
    sampled = SamplingSettings.from_generation_config({"do_sample": True, "temperature": 0.6, "top_p": 0.8,
                                                      "top_k": 40, "max_new_tokens": 50})
    assert (sampled.temperature, sampled.top_p, sampled.top_k, sampled.max_new_tokens) == (0.6, 0.8, 40, 50)
    greedy = SamplingSettings.from_generation_config({"temperature": 0.6, "repetition_penalty": 1.1})
    assert (greedy.temperature, greedy.repetition_penalty, greedy.max_new_tokens) == (0.0, 1.1, 128)


def test_stop_cutter_holds_back_a_stop_string_split_over_pieces():
    cutter = StopCutter(["<|im_end|>"])
    assert cutter.feed("Hello <|im") == "Hello "  # "<|im" might start the stop string: held back
    assert cutter.feed("_e") == ""
    assert cutter.feed("nd|> ignored") == ""
    assert cutter.stopped
    other = StopCutter(["<|im_end|>"])
    assert other.feed("a <|i") == "a " and other.feed("s not it") == "<|is not it" and not other.stopped


def test_streamed_answer_equals_batched_answer(tiny_im):
    settings = SamplingSettings(max_new_tokens=8)
    prompts = [[Message("user", "What is 2 plus 2?")], [Message("system", "Be brief."), Message("user", "Hi")]]
    batched = generate_batch(tiny_im, prompts, settings)
    streamed = ["".join(stream_answer(tiny_im, p, settings)).strip() for p in prompts]
    assert streamed == batched
    assert all(len(a) > 0 for a in batched)
    # left padding must not change an answer: alone or in a batch, greedy answers are identical
    assert generate_batch(tiny_im, prompts[1:], settings) == batched[1:]


def test_seeded_sampling_repeats(tiny_im):
    settings = SamplingSettings(max_new_tokens=10, temperature=1.0, seed=7)
    prompt = [[Message("user", "Tell me something")]]
    assert generate_batch(tiny_im, prompt, settings) == generate_batch(tiny_im, prompt, settings)


def test_prompt_too_long_for_context_is_one_clear_error(tiny_im):
    with pytest.raises(LoratuneError, match="exceeds the context of 512"):
        list(stream_answer(tiny_im, [Message("user", "x" * 600)], SamplingSettings(max_new_tokens=8)))


def test_read_prompts_accepts_the_usual_fields_and_names_bad_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"question": "b", "system": "s"}) + "\n" +
                    json.dumps({"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]})
                    + "\n")
    rows = read_prompts(path, system="default")
    assert [m for _, m in rows] == [
        [Message("system", "default"), Message("user", "a")],
        [Message("system", "s"), Message("user", "b")],
        [Message("system", "default"), Message("user", "c")],
    ]
    path.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"answer": "no prompt"}) + "\n")
    with pytest.raises(LoratuneError, match=r"p\.jsonl:2: row has no prompt"):
        read_prompts(path)


def test_generate_command_file_in_file_out(tiny_chat_dir, tiny_im, tmp_path):
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    rows = [{"id": i, "prompt": f"Question number {i}?"} for i in range(5)]
    write_jsonl(inp, rows)
    result = runner.invoke(app, ["generate", str(tiny_chat_dir), "--input", str(inp), "--output", str(out),
                                 "--max-new-tokens", "6", "--batch-size", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in written] == list(range(5))
    expected = generate_batch(tiny_im, [[Message("user", r["prompt"])] for r in rows], SamplingSettings(max_new_tokens=6))
    assert [r["answer"] for r in written] == expected
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # atomic write left nothing behind


def test_generate_command_single_prompt_and_defaults_from_model_folder(tiny_chat_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_chat_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3, "do_sample": False}))
    assert load_for_inference(folder, device="cpu").defaults.max_new_tokens == 3
    result = runner.invoke(app, ["generate", str(folder), "Hello?", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    im = load_for_inference(folder, device="cpu")
    assert result.stdout.strip() == generate_batch(im, [[Message("user", "Hello?")]], SamplingSettings(max_new_tokens=3))[0]


def test_generate_command_refuses_prompt_and_input_together(tiny_chat_dir, tmp_path):
    result = runner.invoke(app, ["generate", str(tiny_chat_dir), "hi", "--input", str(tmp_path / "x.jsonl")])
    assert result.exit_code != 0
    assert isinstance(result.exception, LoratuneError) and "either a prompt" in str(result.exception)
