"""The terminal chat, driven through its input stream exactly as a person types: streaming, history,
/system, /reset, /exit, and history trimmed to the context window."""

from __future__ import annotations

import io

import pytest
from typer.testing import CliRunner

from loratune.chat import ChatSession, run_chat
from loratune.cli import app
from loratune.data.conversation import Message
from loratune.errors import LoratuneError
from loratune.generate import SamplingSettings, load_for_inference


@pytest.fixture(scope="module")
def tiny_im(tiny_chat_dir):
    return load_for_inference(tiny_chat_dir, device="cpu")


def test_chat_keeps_history_and_obeys_commands(tiny_im, monkeypatch):
    import loratune.chat as chat_module

    sent: list[list[Message]] = []  # what the chat asked the model, call by call
    real_stream = chat_module.stream_answer

    def spy(im, messages, settings):
        sent.append(list(messages))
        yield from real_stream(im, messages, settings)

    monkeypatch.setattr(chat_module, "stream_answer", spy)
    session = ChatSession(tiny_im, SamplingSettings(max_new_tokens=5))
    out = io.StringIO()
    typed = "Hello there\nHow are you?\n/system Be terse.\nAnd now?\n/reset\n/bogus\n/exit\nnever read\n"
    answered = run_chat(session, stdin=io.StringIO(typed), stdout=out)
    text = out.getvalue()
    assert answered == 3 and text.count("bot> ") == 3
    assert "(system prompt set; conversation cleared)" in text and "(conversation cleared)" in text
    assert "(unknown command /bogus;" in text and "never read" not in text
    assert session.turns == [] and session.system == "Be terse."  # /reset kept the system prompt
    # The second question went to the model with the first exchange (and the answer the chat streamed for it);
    # /system cleared the history and put the system prompt first.
    first_answer = sent[1][1]
    assert [m.role for m in sent[0]] == ["user"] and sent[0][0].content == "Hello there"
    assert [(m.role, m.content) for m in sent[1]] == [("user", "Hello there"), ("assistant", first_answer.content),
                                                     ("user", "How are you?")]
    assert first_answer.content and f"bot> {first_answer.content}" in text
    assert [(m.role, m.content) for m in sent[2]] == [("system", "Be terse."), ("user", "And now?")]


@pytest.mark.slow
def test_answers_stream_in_pieces_on_the_real_model(smollm2_dir):
    # TextIteratorStreamer hands out whole words; the random tiny model writes no spaces, the real one does.
    im = load_for_inference(smollm2_dir, device="cpu")
    session = ChatSession(im, SamplingSettings(max_new_tokens=16))
    pieces = list(session.ask("What is the capital of France? Answer in one sentence."))
    assert len(pieces) >= 3  # written as generated, not as one block at the end
    assert "Paris" in "".join(pieces)
    assert session.turns[-1] == Message("assistant", "".join(pieces).strip())


def test_history_is_trimmed_to_the_context_window(tiny_im):
    # context 512 tokens, 100 reserved for the answer: each ~150-token exchange pushes the oldest one out
    session = ChatSession(tiny_im, SamplingSettings(max_new_tokens=100), system="sys")
    for i in range(4):
        session.turns += [Message("user", f"{i}" * 120), Message("assistant", "a" * 20)]
    session.turns.append(Message("user", "newest"))
    dropped = session.fit()
    assert dropped == 2 and session.dropped == 2
    assert session.prompt_tokens() <= 512 - 100
    assert session.turns[0] == Message("user", "2" * 120)  # whole exchanges dropped, oldest first
    assert session.messages()[0] == Message("system", "sys")  # the system prompt always stays
    lonely = ChatSession(tiny_im, SamplingSettings(max_new_tokens=100))
    with pytest.raises(LoratuneError, match="does not fit the context of 512"):
        list(lonely.ask("x" * 500))
    assert lonely.turns == []  # a refused message does not stay in the history


def test_chat_command_reads_stdin(tiny_chat_dir):
    result = CliRunner().invoke(app, ["chat", str(tiny_chat_dir), "--device", "cpu", "--max-new-tokens", "4",
                                      "--system", "You are a bot."], input="hi\n/reset\nagain\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("bot> ") == 2 and "(conversation cleared)" in result.stdout
    assert "chatting with" in result.stdout and "/reset" in result.stdout
