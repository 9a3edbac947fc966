"""OASST1 trees: both layouts, best path and pairs, missing parents, deleted/lang/synthetic filters, cycles."""

from __future__ import annotations

import json

import pytest

from loratune.config import DataConfig, Oasst1Options
from loratune.data.oasst1 import oasst1_conversations
from loratune.data.sources import load_conversations
from loratune.data.templates import TEMPLATES
from loratune.data.tokenize import IGNORE, encode
from loratune.errors import LoratuneError
from tests.conftest import REPO, SHARED, write_jsonl

FLAT = SHARED / "oasst1" / "oasst1_validation_en.shared.jsonl"
NESTED = SHARED / "oasst1" / "oasst_export_trees_en_100.jsonl"
SLICE = REPO / "data" / "oasst1" / "oasst1_validation_en.40trees.jsonl"


def trained_text(ex, tok) -> str:
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


def msg(mid, parent, role, text, rank=None, **extra):
    return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "lang": "en", "rank": rank,
            "deleted": False, "synthetic": False, "message_tree_id": "t", **extra}



def test_flat_best_path_multi_turn_follows_rank_zero_and_drops_unanswered_last_question(tiny_tokenizer):
    dropped: dict[str, list[str]] = {}
    convs = oasst1_conversations(FLAT, Oasst1Options(), dropped)
    assert len(convs) == 172  # 175 trees - 3 whose root is missing from the file
    # Tree 5e521777: rank-0 path is lines 120 (q) 121 (a, rank 0) 122 (q) 123 (a, rank 0) 124 (q, unanswered).
    conv = next(c for c in convs if c.origin == f"{FLAT}:123")
    assert [m.role for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    rows = FLAT.read_text().splitlines()
    assert [m.content for m in conv.messages] == [json.loads(rows[i - 1])["text"] for i in (120, 121, 122, 123)]
    # Multi-turn: loss on both assistant turns (and their end tokens), on nothing else.
    ex = encode(conv, TEMPLATES["chatml"], tiny_tokenizer)
    assert trained_text(ex, tiny_tokenizer) == f"{conv.messages[1].content}<|im_end|>{conv.messages[3].content}<|im_end|>"


def test_flat_missing_parents_skip_the_orphan_subtrees_and_report_them():
    dropped: dict[str, list[str]] = {}
    convs = oasst1_conversations(FLAT, Oasst1Options(), dropped)
    orphans = dropped["parent message not in the data (subtree skipped: its question is missing)"]
    assert orphans == [f"{FLAT}:153", f"{FLAT}:215", f"{FLAT}:1670"]
    rows = FLAT.read_text().splitlines()
    orphan_texts = {json.loads(rows[i - 1])["text"] for i in (153, 215, 1670)}
    assert not any(m.content in orphan_texts for c in convs for m in c.messages)


def test_flat_deleted_messages_are_dropped_with_their_subtrees():
    dropped: dict[str, list[str]] = {}
    convs = oasst1_conversations(FLAT, Oasst1Options(mode="pairs"), dropped)
    rows = [json.loads(line) for line in FLAT.read_text().splitlines()]
    assert sum(r["deleted"] for r in rows) == 39
    deleted_texts = {r["text"] for r in rows if r["deleted"]} - {r["text"] for r in rows if not r["deleted"]}
    assert len(deleted_texts) == 37  # the other two deleted rows repeat a text that is also kept elsewhere
    assert not any(m.content in deleted_texts for c in convs for m in c.messages)
    assert len(dropped["deleted message (with its replies)"]) == 24  # 39 deleted, 15 of them below another deleted


def test_rank_zero_reply_wins_even_when_listed_last_and_deleted_best_falls_back(tmp_path):
    rows = [msg("q", None, "prompter", "Q?"), msg("a1", "q", "assistant", "second", rank=1),
            msg("a0", "q", "assistant", "best", rank=0), msg("q2", "a0", "prompter", "more?"),
            msg("b0", "q2", "assistant", "deleted best", rank=0, deleted=True),
            msg("b1", "q2", "assistant", "next best", rank=1)]
    convs = oasst1_conversations(write_jsonl(tmp_path / "t.jsonl", rows), Oasst1Options())
    assert [m.content for m in convs[0].messages] == ["Q?", "best", "more?", "next best"]
    single = oasst1_conversations(tmp_path / "t.jsonl", Oasst1Options(multi_turn=False))
    assert [m.content for m in single[0].messages] == ["Q?", "best"]


def test_pairs_mode_gives_every_pair_with_history_as_untrained_context(tmp_path, tiny_tokenizer):
    rows = [msg("q", None, "prompter", "Q?"), msg("a0", "q", "assistant", "A0", rank=0),
            msg("a1", "q", "assistant", "A1", rank=1), msg("q2", "a0", "prompter", "Q2?"),
            msg("b0", "q2", "assistant", "B0", rank=0)]
    convs = oasst1_conversations(write_jsonl(tmp_path / "t.jsonl", rows), Oasst1Options(mode="pairs"))
    assert [[m.content for m in c.messages] for c in convs] == [["Q?", "A0"], ["Q?", "A0", "Q2?", "B0"], ["Q?", "A1"]]
    ex = encode(convs[1], TEMPLATES["chatml"], tiny_tokenizer)
    assert trained_text(ex, tiny_tokenizer) == "B0<|im_end|>"  # A0 is context here, trained in its own pair


def test_pairs_count_on_shared_file_equals_prompter_to_assistant_edges():
    rows = [json.loads(line) for line in FLAT.read_text().splitlines()]
    by_id = {r["message_id"]: r for r in rows}

    def alive(r):  # not deleted, and every ancestor present and not deleted
        while r is not None:
            if r["deleted"]:
                return False
            if r["parent_id"] is None:
                return True
            r = by_id.get(r["parent_id"])
        return False

    expected = sum(1 for r in rows if r["role"] == "assistant" and alive(r)
                   and by_id[r["parent_id"]]["role"] == "prompter")
    assert len(oasst1_conversations(FLAT, Oasst1Options(mode="pairs"))) == expected == 1088


def test_nested_export_is_detected_and_synthetic_filter_applies():
    human = oasst1_conversations(NESTED, Oasst1Options(mode="pairs"))
    everything = oasst1_conversations(NESTED, Oasst1Options(mode="pairs", include_synthetic=True))
    synthetic_texts = set()

    def walk(m):
        if m.get("synthetic"):
            synthetic_texts.add(m["text"])
        for r in m.get("replies") or []:
            walk(r)

    for line in NESTED.read_text().splitlines():
        walk(json.loads(line)["prompt"])
    assert len(synthetic_texts) == 22
    assert not any(m.content in synthetic_texts for c in human for m in c.messages)
    assert any(m.content in synthetic_texts for c in everything for m in c.messages)
    assert len(everything) > len(human)
    best = oasst1_conversations(NESTED, Oasst1Options())
    assert len(best) == 95  # 100 trees, 5 with a synthetic root
    assert all(c.origin.startswith(f"{NESTED}:") for c in best)


def test_lang_filter_drops_other_languages_and_none_keeps_all(tmp_path):
    rows = [msg("q", None, "prompter", "Q?"), msg("a", "q", "assistant", "A", rank=0),
            msg("q2", None, "prompter", "Frage?", lang="de"), msg("a2", "q2", "assistant", "Antwort", rank=0, lang="de")]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    assert [c.messages[0].content for c in oasst1_conversations(path, Oasst1Options())] == ["Q?"]
    assert len(oasst1_conversations(path, Oasst1Options(lang=None))) == 2
    assert [c.messages[0].content for c in oasst1_conversations(path, Oasst1Options(lang=["de"]))] == ["Frage?"]


def test_cycle_is_one_line_error_naming_line_and_message(tmp_path):
    rows = [msg("q", None, "prompter", "Q?"), msg("x", "y", "prompter", "x"), msg("y", "x", "assistant", "y")]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(LoratuneError) as e:
        oasst1_conversations(path, Oasst1Options())
    assert str(e.value).startswith(f"{path}:2: parent_id: message x is its own ancestor")
    assert "\n" not in str(e.value)


def test_missing_field_and_duplicate_id_name_the_line(tmp_path):
    rows = [msg("q", None, "prompter", "Q?"), {"message_id": "a", "parent_id": "q", "role": "assistant"}]
    with pytest.raises(LoratuneError, match=r't\.jsonl:2: text: OASST1 message has no "text"'):
        oasst1_conversations(write_jsonl(tmp_path / "t.jsonl", rows), Oasst1Options())
    rows = [msg("q", None, "prompter", "Q?"), msg("q", None, "prompter", "again")]
    with pytest.raises(LoratuneError, match=r"d\.jsonl:2: message_id: message q appears twice"):
        oasst1_conversations(write_jsonl(tmp_path / "d.jsonl", rows), Oasst1Options())


def test_auto_source_routes_oasst1_rows_and_the_in_repo_slice(tmp_path):
    dropped: dict[str, list[str]] = {}
    auto = load_conversations(DataConfig(path=str(SLICE)), str(SLICE), "train", dropped)
    explicit = load_conversations(DataConfig(source="oasst1", path=str(SLICE)), str(SLICE), "train")
    assert len(auto) == len(explicit) == 38  # 40 trees, 2 of them with their root outside the file
    assert len(dropped["parent message not in the data (subtree skipped: its question is missing)"]) == 2
    assert [c.messages for c in auto] == [c.messages for c in explicit]
    assert load_conversations(DataConfig(path=str(NESTED)), str(NESTED), "train[:10]")[0].messages[0].role == "user"
