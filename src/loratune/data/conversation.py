"""The one intermediate type between raw data and tokens: a conversation of role-tagged messages."""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str
    # False for an assistant turn that is context only (OASST1 `pairs` mode: the history before the pair's answer
    # is shown to the model but not trained on again, or a long thread would train its first reply many times).
    trainable: bool = True


@dataclass
class Conversation:
    """Messages in order. `origin` names the file and line (or tree id) the conversation came from, so that
    any later problem with it (no trainable tokens, too long) can point back at its source."""

    messages: list[Message]
    origin: str = ""
    references: list[str] = field(default_factory=list)  # reference answers (evaluation files with several)

    @property
    def prompt_messages(self) -> list[Message]:
        """Everything before the final assistant message (what a model is asked at inference)."""
        if self.messages and self.messages[-1].role == "assistant":
            return self.messages[:-1]
        return list(self.messages)

    @property
    def answer(self) -> str:
        """The final assistant message (the reference answer)."""
        return self.messages[-1].content if self.messages and self.messages[-1].role == "assistant" else ""

    def with_system(self, system: str | None) -> Conversation:
        if not system or (self.messages and self.messages[0].role == "system"):
            return self
        return Conversation([Message("system", system), *self.messages], self.origin, self.references)
