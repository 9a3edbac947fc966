"""WebGLM-QA records (numbered references in the prompt, citations kept) and WebGLM's evaluation files."""

from __future__ import annotations

import json

import pytest

from loratune.config import DataConfig
from loratune.data.sources import load_conversations
from loratune.data.templates import TEMPLATES
from loratune.data.tokenize import IGNORE, encode
from loratune.data.webglm import INSTRUCTION, webglm_conversations
from loratune.errors import LoratuneError
from tests.conftest import SHARED, write_jsonl

# Records in the documented WebGLM-QA schema (no real WebGLM-QA file exists locally; see shared/data/webglm).
QA = [
    {"question": "Why is the sky blue?",
     "answer": "Sunlight is scattered by air molecules [1], and blue light scatters the most [2].",
     "references": ["Rayleigh scattering by molecules in the air.", "Shorter wavelengths scatter more strongly."]},
    {"question": "What is the boiling point of water?",
     "answer": "At sea level water boils at 100 degrees Celsius [1][2].",
     "references": ["Water boils at 100 C at 1 atm.", "At sea level the boiling point is 100 C.", "Unused."]},
]



def test_prompt_numbers_references_and_answer_keeps_citations(tmp_path, tiny_tokenizer):
    convs = webglm_conversations(write_jsonl(tmp_path / "qa.jsonl", QA))
    assert len(convs) == 2
    assert convs[0].messages[0].content == (
        f"{INSTRUCTION}\n\nReferences:\n[1] Rayleigh scattering by molecules in the air.\n"
        "[2] Shorter wavelengths scatter more strongly.\n\nQuestion: Why is the sky blue?")
    assert convs[1].messages[0].content.count("\n[") == 3
    assert convs[0].answer == QA[0]["answer"]
    assert convs[0].origin == f"{tmp_path / 'qa.jsonl'}:1"
    ex = encode(convs[0], TEMPLATES["phi2"], tiny_tokenizer)
    trained = tiny_tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])
    assert trained == QA[0]["answer"] + "<|im_end|>"  # citations [1] [2] are trained, the references are not


def test_answer_citing_a_missing_reference_is_dropped_and_reported(tmp_path):
    bad = {**QA[0], "answer": "Scattering [3]."}
    dropped: dict[str, list[str]] = {}
    path = write_jsonl(tmp_path / "qa.jsonl", [QA[1], bad])
    convs = webglm_conversations(path, dropped)
    assert len(convs) == 1
    assert dropped == {"answer cites a reference number the record does not have": [f"{path}:2"]}


@pytest.mark.parametrize("record,field", [
    ({"question": "q", "answer": "a"}, "references"),
    ({"question": "q", "answer": "a", "references": "one string"}, "references"),
    ({"answer": "a", "references": []}, "question"),
    ({"question": "q", "references": ["r"]}, "answer"),
])
def test_bad_record_is_one_line_with_file_line_and_field(tmp_path, record, field):
    path = write_jsonl(tmp_path / "qa.jsonl", [QA[0], record])
    with pytest.raises(LoratuneError) as e:
        webglm_conversations(path)
    assert str(e.value).startswith(f"{path}:2: {field}: ") and "\n" not in str(e.value)


def test_evaluation_files_carry_every_acceptable_answer_as_references():
    for name, first_q, first_answers in [
        ("webglm_repo_eval_nq_open.head300.jsonl", "the era of the great mughals began with the accession of",
         ["Akbar the Great", "Babur"]),
        ("webglm_repo_eval_web_questions.head300.jsonl", None, None),
    ]:
        path = SHARED / "webglm" / name
        convs = webglm_conversations(path)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(convs) == len(rows) == 300
        assert all(c.references == [str(a) for a in r["answer"]] and c.answer == str(r["answer"][0])
                   for c, r in zip(convs, rows))
        if first_q:
            assert convs[0].messages[0].content == first_q and convs[0].references == first_answers


def test_auto_source_routes_webglm_records(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    auto = load_conversations(DataConfig(path=str(path)), str(path), "train[1:]")
    assert len(auto) == 1 and auto[0].messages[0].content.startswith(INSTRUCTION)
    explicit = load_conversations(DataConfig(source="webglm", path=str(path)), str(path), "train")
    assert [c.messages for c in explicit][1:] == [c.messages for c in auto]
