"""The interactive terminal chat: tokens stream to the terminal as the model writes them, the history is kept
within the context window, and three commands steer it: `/reset`, `/system TEXT`, `/exit`.

`ChatSession` holds the conversation and decides what fits; `run_chat` is the loop over any input/output
streams, so tests drive it with a StringIO exactly as a person drives it with a keyboard.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from loratune.data.conversation import Message
from loratune.errors import LoratuneError
from loratune.generate import InferenceModel, SamplingSettings, stream_answer

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit"


@dataclass
class ChatSession:
    """A conversation that always fits: before each answer, the oldest user/assistant exchanges are dropped until
    the rendered prompt plus `max_new_tokens` fits in the model's context (the system prompt is always kept)."""

    im: InferenceModel
    settings: SamplingSettings
    system: str | None = None
    turns: list[Message] = field(default_factory=list)  # user/assistant messages, oldest first
    dropped: int = 0  # exchanges dropped to fit, over the whole session

    def messages(self) -> list[Message]:
        return ([Message("system", self.system)] if self.system else []) + self.turns

    def prompt_tokens(self) -> int:
        return self.im.count_tokens(self.im.template.prompt(self.messages(), self.im.tokenizer))

    def fit(self) -> int:
        """Drop the oldest exchanges until the prompt + answer budget fits; returns how many were dropped now."""
        budget = self.im.context_length - self.settings.max_new_tokens
        dropped = 0
        while self.prompt_tokens() > budget:
            if len(self.turns) <= 1:  # only the new question is left and it alone is too long
                raise LoratuneError(f"the message is {self.prompt_tokens()} tokens; with max_new_tokens "
                                    f"{self.settings.max_new_tokens} it does not fit the context of "
                                    f"{self.im.context_length}", key="message", hint="send a shorter message")
            # Drop a whole exchange (user + its answer) so the history never starts with an orphan answer.
            cut = 2 if len(self.turns) > 2 and self.turns[1].role == "assistant" else 1
            del self.turns[:cut]
            dropped += 1
        self.dropped += dropped
        return dropped

    def ask(self, text: str) -> Iterator[str]:
        """Add a user message and stream the answer; the answer joins the history once complete."""
        self.turns.append(Message("user", text))
        try:
            self.fit()
        except LoratuneError:
            self.turns.pop()
            raise
        pieces: list[str] = []
        for piece in stream_answer(self.im, self.messages(), self.settings):
            pieces.append(piece)
            yield piece
        self.turns.append(Message("assistant", "".join(pieces).strip()))

    def reset(self) -> None:
        self.turns.clear()


def run_chat(session: ChatSession, *, stdin: IO[str] | None = None, stdout: IO[str] | None = None,
             prompt: str = "you> ") -> int:
    """The read-answer loop until `/exit` or end of input. Returns the number of questions answered."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    answered = 0

    def say(text: str = "", end: str = "\n") -> None:
        stdout.write(text + end)
        stdout.flush()

    say(f"chatting with {session.im.name} ({session.im.template.name} template, context "
        f"{session.im.context_length} tokens). {HELP}")
    while True:
        if stdin is sys.stdin and stdin.isatty():
            try:
                line = input(prompt)  # line editing and history through readline
            except EOFError:
                say()
                break
        else:
            say(prompt, end="")
            line = stdin.readline()
            if not line:  # end of input (Ctrl-D or a closed pipe)
                say()
                break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            say("(conversation cleared)")
            continue
        if text == "/system" or text.startswith("/system "):
            session.system = text[len("/system"):].strip() or None
            session.reset()
            say(f"(system prompt {'set' if session.system else 'removed'}; conversation cleared)")
            continue
        if text.startswith("/"):
            say(f"(unknown command {text.split()[0]}; {HELP})")
            continue
        before = session.dropped
        say("bot> ", end="")
        try:
            for piece in session.ask(text):
                stdout.write(piece)
                stdout.flush()
        except LoratuneError as e:
            say(f"(error: {e})")
            continue
        say()
        if session.dropped > before:
            say(f"(dropped the oldest {session.dropped - before} exchange(s) to stay within the context)")
        answered += 1
    return answered
