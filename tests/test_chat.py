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
from loratune.generate import SamplingSettings, generate_batch, load_for_inference


@pytest.fixture(scope="module")
def tiny_im(tiny_chat_dir):
    return load_for_inference(tiny_chat_dir, device="cpu")


def test_chat_keeps_history_and_obeys_commands(tiny_im):
    session = ChatSession(tiny_im, SamplingSettings(max_new_tokens=5))
    out = io.StringIO()
    typed = "Hello there\nHow are you?\n/system Be terse.\nAnd now?\n/reset\n/bogus\n/exit\nnever read\n"
    answered = run_chat(session, stdin=io.StringIO(typed), stdout=out)
    text = out.getvalue()
    assert answered == 3
    assert "(system prompt set; conversation cleared)" in text and "(conversation cleared)" in text
    assert "(unknown command /bogus;" in text
    assert session.turns == [] and session.system == "Be terse."  # /reset kept the system prompt
    # The second answer was generated with the first exchange in the prompt: the same answer comes back from
    # generate_batch given that history, so the chat really sent it.
    first = generate_batch(tiny_im, [[Message("user", "Hello there")]], SamplingSettings(max_new_tokens=5))[0]
    second = generate_batch(tiny_im, [[Message("user", "Hello there"), Message("assistant", first),
                                       Message("user", "How are you?")]], SamplingSettings(max_new_tokens=5))[0]
    third = generate_batch(tiny_im, [[Message("system", "Be terse."), Message("user", "And now?")]],
                           SamplingSettings(max_new_tokens=5))[0]
    assert all(answer for answer in (first, second, third))
    positions = [text.index(f"bot> {answer}") for answer in (first, second, third)]
    assert positions == sorted(positions) and text.count("bot> ") == 3


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
