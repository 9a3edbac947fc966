"""Templates and masks: exactly the answer tokens (and the end-of-turn token) carry loss."""

from __future__ import annotations

import pytest

from loratune.data.conversation import Conversation, Message
from loratune.data.templates import TEMPLATES, resolve_template
from loratune.data.tokenize import IGNORE, encode
from loratune.errors import LoratuneError

CONV = Conversation([Message("system", "Be brief."), Message("user", "Hi there"), Message("assistant", "Hello!"),
                     Message("user", "2+2?"), Message("assistant", "4")])


def trained_text(ex, tok) -> str:
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


def test_chat_template_mask_is_every_assistant_turn_plus_end_token(tiny_tokenizer):
    t = resolve_template("auto", tiny_tokenizer)
    assert t.name == "chat-template"
    ex = encode(CONV, t, tiny_tokenizer)
    assert trained_text(ex, tiny_tokenizer) == "Hello!<|im_end|>4<|im_end|>"
    # labels equal ids where trained; the trained tokens are contiguous per turn
    assert all(lab in (IGNORE, tid) for tid, lab in zip(ex.input_ids, ex.labels))


def test_eos_is_trained_even_when_pad_equals_eos():
    from tests.conftest import build_tokenizer

    tok = build_tokenizer(pad_is_eos=True)
    assert tok.pad_token_id == tok.eos_token_id
    ex = encode(Conversation([Message("user", "q"), Message("assistant", "a")]), TEMPLATES["phi2"], tok)
    assert ex.labels[-1] == tok.eos_token_id  # the peer bug masks this and the model never stops


@pytest.mark.parametrize("name,expected_text,expected_trained", [
    ("phi2", "Instruct: Hi there\nOutput: Hello!<|im_end|>", "Hello!<|im_end|>"),
    ("human-assistant", "### Human: Hi there### Assistant: Hello!<|im_end|>", "Hello!<|im_end|>"),
    ("llama2", "<|im_start|>[INST] Hi there [/INST] Hello! <|im_end|>", "Hello! <|im_end|>"),
    ("chatml", "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>", "Hello!<|im_end|>"),
])
def test_named_templates_render_and_mask_token_by_token(tiny_tokenizer, name, expected_text, expected_trained):
    conv = Conversation([Message("user", "Hi there"), Message("assistant", "Hello!")])
    t = TEMPLATES[name]
    ex = encode(conv, t, tiny_tokenizer)
    assert tiny_tokenizer.decode(ex.input_ids) == expected_text
    assert trained_text(ex, tiny_tokenizer) == expected_trained
    # Token by token: everything before the answer is masked, everything from the answer on is trained.
    first = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE)
    assert all(lab == IGNORE for lab in ex.labels[:first])
    assert ex.labels[first:] == ex.input_ids[first:]


def test_alpaca_template_has_default_system_and_response_header(tiny_tokenizer):
    conv = Conversation([Message("user", "Name a color."), Message("assistant", "Blue")])
    text = "".join(s.text for s in TEMPLATES["alpaca"].segments(conv, tiny_tokenizer))
    assert text.startswith("Below is an instruction")
    assert "### Instruction:\nName a color.\n\n### Response:\nBlue<|im_end|>" in text


def test_inference_prompt_matches_training_prefix(tiny_tokenizer):
    """The prompt used at inference is exactly the training text up to the answer, for every template."""
    conv = Conversation([Message("user", "Hi there"), Message("assistant", "Hello!")])
    for name in [*TEMPLATES, "chat-template"]:
        t = resolve_template(name, tiny_tokenizer)
        full = "".join(s.text for s in t.segments(conv, tiny_tokenizer))
        prompt = t.prompt(conv.prompt_messages, tiny_tokenizer)
        assert full.startswith(prompt) and full[len(prompt):].startswith("Hello!"), name


def test_unknown_template_lists_valid_names(tiny_tokenizer):
    with pytest.raises(LoratuneError, match='did you mean "chatml".*valid: .*phi2'):
        resolve_template("chatmll", tiny_tokenizer)


def test_template_round_trips_through_dict(tiny_tokenizer):
    from loratune.data.templates import Template

    t = resolve_template("chat-template", tiny_tokenizer)
    assert Template.from_dict(t.to_dict()) == t
    assert t.stop_strings(tiny_tokenizer) == ["<|im_end|>"]


@pytest.mark.parametrize("name", [*TEMPLATES, "chat-template"])
def test_multi_turn_masks_token_by_token_for_every_template(tiny_tokenizer, name):
    """Every token is trained iff its characters lie in an assistant answer or the end-of-turn token after it;
    an assistant turn marked context-only (OASST1 pairs history) is masked like the prompt."""
    t = resolve_template(name, tiny_tokenizer)
    conv = Conversation([Message("user", "Hi there"), Message("assistant", "Hello!", trainable=False),
                         Message("user", "2+2?"), Message("assistant", "4")])
    segments = t.segments(conv, tiny_tokenizer)
    # The byte-level tiny tokenizer maps each special token to one id and every other byte to one id, so the
    # expected label of each token follows from the segment it comes from.
    expected: list[bool] = []
    for s in segments:
        expected.extend([s.trainable] * len(tiny_tokenizer(s.text, add_special_tokens=False)["input_ids"]))
    ex = encode(conv, t, tiny_tokenizer)
    assert [lab != IGNORE for lab in ex.labels] == expected
    assert all(lab in (IGNORE, tid) for tid, lab in zip(ex.input_ids, ex.labels))
    assert trained_text(ex, tiny_tokenizer) == ("4 <|im_end|>" if name == "llama2" else "4<|im_end|>")
    everything = encode(conv, t, tiny_tokenizer, train_on_prompt=True)
    assert all(lab != IGNORE for lab in everything.labels)
