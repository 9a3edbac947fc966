"""Generic sources (JSONL/JSON/CSV/Parquet, field maps, messages, text), slices, hub datasets on local files, and
every kind of bad input as one line naming file, line and field."""

from __future__ import annotations

import csv
import json

import pytest

from loratune.config import DataConfig, FieldMap
from loratune.data.prepare import load_splits
from loratune.data.sources import MAX_RECORD_BYTES, load_conversations
from loratune.data.templates import resolve_template
from loratune.errors import LoratuneError
from tests.conftest import QA_ROWS, SHARED, write_jsonl


def load(path, split="train", **cfg):
    return load_conversations(DataConfig(path=str(path), **cfg), str(path), split)


def pairs(convs):
    return [(c.messages[-2].content, c.messages[-1].content) for c in convs]


def one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# --- formats --------------------------------------------------------------------------------------------------------------
def test_csv_parquet_and_jsonl_give_the_same_conversations(tmp_path, qa_file):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(tmp_path / "qa.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer"])
        writer.writeheader()
        writer.writerows(QA_ROWS)
    pq.write_table(pa.Table.from_pylist(QA_ROWS), tmp_path / "qa.parquet")
    expected = [(r["question"], r["answer"]) for r in QA_ROWS]
    assert pairs(load(qa_file)) == pairs(load(tmp_path / "qa.csv")) == pairs(load(tmp_path / "qa.parquet")) == expected
    assert load(tmp_path / "qa.csv")[2].origin == f"{tmp_path / 'qa.csv'}:4"  # header is line 1


def test_json_array_records_keep_their_line_numbers(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"},
                                {"instruction": "Add", "input": "2 and 3", "output": "5"},
                                {"instruction": "Broken"}], indent=2))
    with pytest.raises(LoratuneError) as e:
        load(path)
    assert one_line(e).startswith(f"{path}:12: output: record has no \"output\"")
    convs = load(path, "train[:2]")
    assert [c.origin for c in convs] == [f"{path}:2", f"{path}:7"]
    assert convs[1].messages[0].content == "Add\n\n2 and 3"


def test_shared_alpaca_and_gsm8k_files():
    alpaca = load(SHARED / "generic_qa" / "alpaca_en_demo.head800.json")
    assert len(alpaca) == 800 and alpaca[0].messages[0].content == "Describe a process of making crepes."
    gsm = load(SHARED / "generic_qa" / "gsm8k_train.head3000.jsonl", "train[5:10]")
    assert len(gsm) == 5 and gsm[0].answer.rstrip().split("#### ")[-1].strip().isdigit()


def test_openai_messages_and_plain_text_records(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                                             {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
                                             {"role": "assistant", "content": "A2"}]}) + "\n")
    (conv,) = load(path)
    assert [(m.role, m.content) for m in conv.messages] == [("system", "S"), ("user", "U1"), ("assistant", "A1"),
                                                            ("user", "U2"), ("assistant", "A2")]
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "Once upon a time."}\n')
    assert [(m.role, m.content) for m in load(text)[0].messages] == [("assistant", "Once upon a time.")]


def test_field_map_overrides_detection(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"q": "Q", "a": "A", "question": "wrong", "answer": "wrong"}) + "\n")
    assert pairs(load(path, fields=FieldMap(input="q", output="a"))) == [("Q", "A")]


# --- splits and slices ------------------------------------------------------------------------------------------------
def test_slices_absolute_percent_and_negative(qa_file):
    assert len(load(qa_file, "train[5:10]")) == 5
    assert len(load(qa_file, "train[:25%]")) == 8
    assert pairs(load(qa_file, "train[-2:]")) == [(r["question"], r["answer"]) for r in QA_ROWS[-2:]]


def test_slice_out_of_range_is_one_line(qa_file):
    with pytest.raises(LoratuneError) as e:
        load(qa_file, "train[5000:10000]")
    assert one_line(e) == (f"data.split: slice [5000:10000] is beyond the end of {qa_file} (32 records) "
                           "(use a bound between -32 and 32)")


def test_validation_by_fraction_and_by_separate_file(qa_file, tmp_path):
    train, val = load_splits(DataConfig(path=str(qa_file), val_fraction=0.25), seed=0)
    assert len(train) == 24 and len(val) == 8 and not {c.origin for c in train} & {c.origin for c in val}
    train, val = load_splits(DataConfig(path=str(qa_file), validation_path=str(qa_file),
                                        validation_split="train[:3]"), seed=0)
    assert len(train) == 32 and len(val) == 3


# --- hub datasets, tested offline on local files ------------------------------------------------------------------------
def test_hub_source_on_a_local_folder_with_splits_and_slice(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl")
    write_jsonl(folder / "test.jsonl", QA_ROWS[:4])
    convs = load(folder, "train[5:10]", source="hf")
    assert pairs(convs) == [(r["question"], r["answer"]) for r in QA_ROWS[5:10]]
    assert convs[0].origin == f"{folder}[train]:5"
    assert len(load(folder, "test", source="hf")) == 4
    with pytest.raises(LoratuneError) as e:
        load(folder, "validation", source="hf")
    assert one_line(e).startswith(f'data.split: dataset {folder} has no split "validation"')
    with pytest.raises(LoratuneError) as e:
        load(folder, "train[5000:10000]", source="hf")
    assert "beyond the end" in one_line(e)


def test_hub_rows_are_routed_by_schema(tmp_path):
    """A Parquet of OASST1 message rows through `source: hf` becomes OASST1 conversations."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"message_id": "q", "parent_id": None, "role": "prompter", "text": "Q?", "lang": "en", "rank": None,
             "deleted": False, "synthetic": False},
            {"message_id": "a", "parent_id": "q", "role": "assistant", "text": "A", "lang": "en", "rank": 0,
             "deleted": False, "synthetic": False}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "oasst.parquet")
    (conv,) = load(tmp_path / "oasst.parquet", source="hf")
    assert [(m.role, m.content) for m in conv.messages] == [("user", "Q?"), ("assistant", "A")]


def test_unknown_hub_dataset_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoratuneError) as e:
        load("nobody-xyz/no-such-dataset", "train[:10]")  # auto: an owner/name that is not a local path -> hub
    assert one_line(e).startswith("data.path: cannot load dataset nobody-xyz/no-such-dataset")


# --- bad input: one line naming file, line, field and what to do -----------------------------------------------------
def test_malformed_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n{"question": "q2", "answer": }\n')
    with pytest.raises(LoratuneError) as e:
        load(path)
    assert one_line(e) == f"{path}:2: not valid JSON: Expecting value at column 30 (each line must be one JSON object)"


def test_missing_field_names_line_and_field(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n\n{"question": "q3"}\n')
    with pytest.raises(LoratuneError) as e:
        load(path)
    assert one_line(e) == f'{path}:3: answer: record has no "answer" (fill the field or fix data.fields)'


def test_unrecognised_fields_ask_for_a_field_map(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text('{"foo": "q", "bar": "a"}\n')
    with pytest.raises(LoratuneError) as e:
        load(path)
    assert one_line(e).startswith(f"{path}:1: cannot tell which fields hold the prompt and answer (fields: bar, foo)")


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(LoratuneError) as e:
        load_splits(DataConfig(path=str(path)), seed=0)
    assert one_line(e).startswith(f"{path}: data.path: the training set is empty")


def test_unknown_template(tiny_tokenizer):
    with pytest.raises(LoratuneError) as e:
        resolve_template("phi-2", tiny_tokenizer)
    assert one_line(e).startswith('data.template: unknown template "phi-2" (did you mean "phi2"?')


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "a"}\n{"question": "caf\xe9", "answer": "a"}\n')
    with pytest.raises(LoratuneError) as e:
        load(path)
    assert one_line(e) == f"{path}:2: not UTF-8 (byte 17 of the line) (re-save the file as UTF-8)"


def test_ten_megabyte_record_is_refused_before_parsing(tmp_path):
    path = tmp_path / "huge.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n' + json.dumps({"question": "q", "answer": "x" * 10_000_000})
                    + "\n")
    assert 10_000_000 > MAX_RECORD_BYTES
    with pytest.raises(LoratuneError) as e:
        load(path)
    assert one_line(e).startswith(f"{path}:2: record is 9.5 MB, larger than the 4 MB limit")


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(LoratuneError) as e:
        load(tmp_path / "nope.jsonl")
    assert one_line(e) == f"{tmp_path / 'nope.jsonl'}: data.path: data file not found (check the path)"
    other = tmp_path / "data.txt"
    other.write_text("x")
    with pytest.raises(LoratuneError) as e:
        load(other)
    assert 'data.source: cannot tell the format of' in one_line(e)
