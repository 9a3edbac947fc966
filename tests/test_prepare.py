"""`loratune prepare`, the tokenized-dataset cache, length statistics, max_length auto and the pre-flight check."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from loratune.cli import app
from loratune.config import DataConfig
from loratune.data import cache as data_cache
from loratune.data.prepare import prepare
from loratune.data.templates import TEMPLATES
from loratune.data.tokenize import NO_ANSWER_AFTER_TRUNCATION, auto_max_length, encode, length_stats, preflight
from loratune.errors import LoratuneError
from tests.conftest import SHARED, write_jsonl

OASST1 = SHARED / "oasst1" / "oasst1_validation_en.shared.jsonl"


@pytest.fixture()
def cache_in_tmp(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setattr(data_cache, "cache_dir", lambda key: root / key)
    return root


def run(cfg: DataConfig, tokenizer, template="chatml", **kw):
    return prepare(cfg, tokenizer, TEMPLATES[template], seed=0, model_max=None, **kw)


# --- statistics and max_length: auto ---------------------------------------------------------------------------------------
def test_length_stats_and_auto_max_length_numbers():
    stats = length_stats(list(range(1, 101)))
    assert stats == {"count": 100, "min": 1, "mean": 50.5, "max": 100, "p50": 51, "p90": 91, "p95": 96, "p99": 100}
    assert auto_max_length(list(range(1, 101))) == 128  # p99 = 100, rounded up to a multiple of 64
    assert auto_max_length([64] * 50) == 64
    assert auto_max_length(list(range(1, 101)), model_max=96) == 96


def test_max_length_auto_is_the_p99_rounded_up(tmp_path, tiny_tokenizer):
    """100 ordinary rows and one outlier: the p99 ignores the outlier, which is then truncated (and reported)."""
    rows = [{"question": "q", "answer": "x" * (k + 1)} for k in range(100)] + [{"question": "q", "answer": "y" * 900}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    data = run(DataConfig(path=str(path), max_length="auto"), tiny_tokenizer)
    lengths = sorted(len(encode(c, TEMPLATES["chatml"], tiny_tokenizer).input_ids) for c in data.train_conversations)
    assert lengths[-2] == 121 and lengths[-1] == 921  # byte tokenizer: 21 template tokens + the answer
    assert data.max_length == 128  # p99 of 101 lengths ("higher") = the second longest, 121 -> 128
    assert data.train.n_truncated == 1 and len(data.train.examples) == 101
    assert data.stats["train"]["max"] == 128 and data.stats["train"]["p99"] == 121


# --- pre-flight: zero trainable tokens ------------------------------------------------------------------------------------
def test_example_with_no_answer_tokens_fails_loudly_naming_the_row(tmp_path, tiny_tokenizer):
    path = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    no_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "anyone?"}]}
    path.write_text("\n".join(json.dumps(r) for r in (good, good, no_answer, good)) + "\n")
    with pytest.raises(LoratuneError) as e:
        run(DataConfig(path=str(path)), tiny_tokenizer)
    assert str(e.value).startswith(f"{path}:3: this example has no trainable (answer) tokens (give every record")


def test_truncation_that_removes_the_answer_is_reported_not_fatal(tmp_path, tiny_tokenizer):
    rows = [{"question": "short?", "answer": "yes"}, {"question": "x" * 200, "answer": "long"}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    data = run(DataConfig(path=str(path), max_length=64), tiny_tokenizer)
    assert len(data.train.examples) == 1 and data.train.n_truncated == 0  # counted as dropped, not kept
    assert data.train.dropped == {NO_ANSWER_AFTER_TRUNCATION: [f"{path}:2"]}
    shown = preflight(data.train, tiny_tokenizer, where=str(path))
    assert shown == "⟦<|im_start|>user\nshort?<|im_end|>\n<|im_start|>assistant\n⟧yes<|im_end|>"


# --- the tokenized cache -----------------------------------------------------------------------------------------------------
def test_cache_hit_reproduces_the_examples_exactly(qa_file, tiny_tokenizer, cache_in_tmp):
    cfg = DataConfig(path=str(qa_file), val_fraction=0.25)
    first = run(cfg, tiny_tokenizer, cache=True)
    second = run(cfg, tiny_tokenizer, cache=True)
    assert not first.from_cache and second.from_cache and first.cache_key == second.cache_key
    assert [(e.input_ids, e.labels, e.origin) for e in second.train.examples] == \
        [(e.input_ids, e.labels, e.origin) for e in first.train.examples]
    assert [c.messages for c in second.validation_conversations] == [c.messages for c in first.validation_conversations]
    assert second.stats == first.stats and second.max_length == first.max_length
    assert sorted(p.name for p in cache_in_tmp.iterdir()) == [first.cache_key]


def test_cache_key_changes_with_everything_that_shapes_tokens(qa_file, tmp_path, tiny_tokenizer):
    from tests.conftest import build_tokenizer

    def key(cfg=None, template="chatml", tokenizer=tiny_tokenizer):
        return data_cache.cache_key(cfg or DataConfig(path=str(qa_file)), tokenizer, TEMPLATES[template], seed=0,
                                    model_max=None)

    base = key()
    other_tokenizer = build_tokenizer()
    other_tokenizer.add_tokens(["<extra>"])
    changed = [key(DataConfig(path=str(qa_file), max_length=256)), key(template="phi2"),
               key(DataConfig(path=str(qa_file), train_on_prompt=True)),
               key(DataConfig(path=str(qa_file), truncation="drop")),
               key(DataConfig(path=str(qa_file), split="train[:10]")), key(tokenizer=other_tokenizer)]
    assert len({base, *changed}) == 1 + len(changed)
    assert key(DataConfig(path=str(qa_file), packing=False)) == base  # packing changes batches, not tokens
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(qa_file.read_bytes())
    same_bytes = key(DataConfig(path=str(copy)))
    copy.write_text(qa_file.read_text().replace("plus", "and"))
    assert key(DataConfig(path=str(copy))) != same_bytes
    assert key(DataConfig(source="hf", path="owner/name")) is None  # unpinned hub data is never cached
    assert key(DataConfig(source="hf", path="owner/name", revision="abc123")) is not None


def test_failed_cache_write_leaves_nothing_behind(qa_file, tiny_tokenizer, cache_in_tmp, monkeypatch):
    def broken(path, data):
        path.write_text('{"input_ids": [1, 2')  # half a line, then the disk "fails"
        raise OSError("disk full")

    monkeypatch.setattr(data_cache, "_write_examples", broken)
    data = run(DataConfig(path=str(qa_file)), tiny_tokenizer, cache=True)  # training goes on without the cache
    assert len(data.train.examples) == 32
    assert not cache_in_tmp.exists() or list(cache_in_tmp.iterdir()) == []
    monkeypatch.undo()
    assert not run(DataConfig(path=str(qa_file)), tiny_tokenizer, cache=True).from_cache


# --- loratune prepare -------------------------------------------------------------------------------------------------------
def test_prepare_command_on_oasst1_sample_with_embedded_tokenizer(smollm2_dir, tmp_path, cache_in_tmp):
    config = tmp_path / "oasst.yaml"
    config.write_text(f"model: {{base: smollm2-135m-instruct}}\n"
                      f"data: {{path: {OASST1}, max_length: auto}}\n")
    out = tmp_path / "prepared"
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["prepare", str(config), "--out", str(out)])
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    assert seconds < 30, f"prepare took {seconds:.1f} s"
    assert sorted(p.name for p in out.iterdir()) == ["conversations.jsonl", "data_report.md", "lengths.png",
                                                     "meta.json", "template.json", "train.jsonl"]
    meta = json.loads((out / "meta.json").read_text())
    examples = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(examples) == meta["stats"]["train"]["count"] == 172
    assert meta["max_length"] % 64 == 0 and max(lengths) <= meta["max_length"]
    assert len(meta["source_dropped"]["parent message not in the data (subtree skipped: its question is missing)"]) == 3
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "data_report.md").read_text()
    for needle in ("| train | 172 | 172 |", "3 × parent message not in the data", "| train | 172 | ",
                   "## One training example", "⟦<|im_start|>", "template: `chat-template`"):
        assert needle in report, needle
    assert json.loads((out / "template.json").read_text())["name"] == "chat-template"


def test_prepare_command_bad_data_is_one_line_exit_2(tiny_llama_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n{"question": "q2"}\n')
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{base: {tiny_llama_dir}}}\ndata: {{path: {data}, template: chatml}}\n")
    proc = subprocess.run([sys.executable, "-m", "loratune.cli", "prepare", str(config), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines == [f'error: {data}:2: answer: record has no "answer" (fill the field or fix data.fields)']
    assert not (tmp_path / "o").exists()
