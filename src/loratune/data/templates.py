"""Prompt templates: one object renders a conversation for training, evaluation and inference alike.

A template turns a Conversation into segments of text, each marked trainable (assistant answers and the
end-of-turn token that follows them) or not (system, user turns, role headers). Training tokenizes the joined
text once and takes the mask from the segments' character spans, so there is no boundary drift between how
the prompt is tokenized alone and inside the whole example. Inference renders the same prompt segments plus the
assistant header, so training and generation can never disagree on the format (a silent bug in several peers).

The template travels with the run: `to_dict()` is saved as `template.json` and `Template.from_dict()` restores it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from loratune.data.conversation import Conversation, Message
from loratune.errors import LoratuneError, choose


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool


@dataclass(frozen=True)
class Template:
    """A named format. `{eos}` and `{bos}` in any part are replaced with the tokenizer's tokens.

    `chat_template` (Jinja) is set only for `chat-template`; then rendering goes through the tokenizer's
    `apply_chat_template`, and the other string parts are unused.
    """

    name: str
    system: str = "{content}\n\n"  # how a system message is written
    user: str = "{content}\n"  # how a user turn is written
    assistant_header: str = ""  # written before each answer (not trained)
    assistant_end: str = "{eos}"  # written after each answer (trained: the model must learn to stop)
    turn_separator: str = ""  # between an answer's end and the next user turn (not trained)
    conversation_start: str = ""  # once, at the very start (not trained)
    default_system: str | None = None
    chat_template: str | None = None

    # -- rendering ---------------------------------------------------------------------------------------------
    def segments(self, conversation: Conversation, tokenizer: Any, *, add_generation_prompt: bool = False) -> list[Segment]:
        """The conversation as (text, trainable) pieces. With `add_generation_prompt`, the conversation is a
        prompt (no final answer) and the assistant header is appended, ready for generation."""
        if self.chat_template is not None:
            return _chat_template_segments(self, conversation.messages, tokenizer, add_generation_prompt)
        fill = _filler(tokenizer)
        messages = list(conversation.messages)
        if self.default_system and not any(m.role == "system" for m in messages):
            messages.insert(0, Message("system", self.default_system))
        out: list[Segment] = [Segment(fill(self.conversation_start), False)] if self.conversation_start else []
        previous = None
        for message in messages:
            if message.role == "system":
                out.append(Segment(fill(self.system).replace("{content}", message.content), False))
            elif message.role == "user":
                if previous == "assistant" and self.turn_separator:
                    out.append(Segment(fill(self.turn_separator), False))
                out.append(Segment(fill(self.user).replace("{content}", message.content), False))
            else:
                if self.assistant_header:
                    out.append(Segment(fill(self.assistant_header), False))
                out.append(Segment(message.content + fill(self.assistant_end), message.trainable))
            previous = message.role
        if add_generation_prompt and self.assistant_header:
            out.append(Segment(fill(self.assistant_header), False))
        return [s for s in out if s.text]

    def prompt(self, messages: list[Message], tokenizer: Any) -> str:
        """The text a model is given to write the next assistant turn."""
        return "".join(s.text for s in self.segments(Conversation(messages), tokenizer, add_generation_prompt=True))

    def stop_strings(self, tokenizer: Any) -> list[str]:
        """Text that ends an answer: the rendered `assistant_end` (without trailing whitespace)."""
        if self.chat_template is not None:
            end = _chat_turn_end(self, tokenizer)
            return [end] if end else [tokenizer.eos_token]
        end = _filler(tokenizer)(self.assistant_end).strip()
        return [end] if end else [tokenizer.eos_token]

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Token ids that end generation: EOS plus the template's end-of-turn token when it is one token."""
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for text in self.stop_strings(tokenizer):
            encoded = tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(encoded[0])
        return ids

    # -- persistence -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Template:
        return cls(**data)


def _filler(tokenizer: Any):
    eos = tokenizer.eos_token or ""
    bos = tokenizer.bos_token or ""

    def fill(text: str) -> str:
        return text.replace("{eos}", eos).replace("{bos}", bos)

    return fill


# -- the tokenizer's own Jinja chat template -----------------------------------------------------------------------------
def _apply(template: Template, tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            chat_template=template.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as e:  # jinja raises TemplateError / exceptions raised by the template itself
        raise LoratuneError(f"the chat template refused this conversation: {e}", key="data.template",
                            hint="use a named template (phi2, chatml, ...) or fix the roles") from None


def _chat_template_segments(template: Template, messages: list[Message], tokenizer: Any, gen: bool) -> list[Segment]:
    """Render prefix by prefix and diff the strings: the text added by an assistant message, after its header
    (what `add_generation_prompt` adds), is the trainable answer plus its end-of-turn marker."""
    segments: list[Segment] = []
    rendered = ""
    for i, message in enumerate(messages):
        full = _apply(template, tokenizer, messages[: i + 1], False)
        if not full.startswith(rendered):
            raise LoratuneError("the chat template renders a prefix differently from the whole conversation, so "
                                "answer masks cannot be derived from it", key="data.template",
                                hint="use a named template such as chatml")
        if message.role == "assistant":
            with_header = _apply(template, tokenizer, messages[:i], True) if i else ""
            if with_header.startswith(rendered) and full.startswith(with_header):
                segments.append(Segment(with_header[len(rendered):], False))
                answer_and_end = full[len(with_header):]
            else:
                answer_and_end = full[len(rendered):]
            # Trailing newlines after the end-of-turn token are formatting, not something the model must produce.
            stripped = answer_and_end.rstrip("\n")
            segments.append(Segment(stripped, message.trainable))
            if len(stripped) < len(answer_and_end):
                segments.append(Segment(answer_and_end[len(stripped):], False))
        else:
            segments.append(Segment(full[len(rendered):], False))
        rendered = full
    if gen:
        with_header = _apply(template, tokenizer, messages, True)
        segments.append(Segment(with_header[len(rendered):], False))
    return [s for s in segments if s.text]


def _chat_turn_end(template: Template, tokenizer: Any) -> str:
    """What the chat template writes right after an answer (e.g. `<|im_end|>`)."""
    probe = "\u2063probe\u2063"
    msgs = [Message("user", "hi"), Message("assistant", probe)]
    text = _apply(template, tokenizer, msgs, False)
    tail = text[text.rfind(probe) + len(probe):].strip()
    return tail


# -- the named templates ------------------------------------------------------------------------------------------------
TEMPLATES: dict[str, Template] = {
    # Phi-2's documented QA format.
    "phi2": Template("phi2", system="{content}\n", user="Instruct: {content}\n", assistant_header="Output: ",
                     assistant_end="{eos}", turn_separator="\n"),
    # Guanaco / openassistant-guanaco format.
    "human-assistant": Template("human-assistant", system="{content}\n", user="### Human: {content}",
                                assistant_header="### Assistant: ", assistant_end="{eos}"),
    # Llama 2 chat: <s>[INST] <<SYS>>...<</SYS>> user [/INST] answer </s>
    "llama2": Template("llama2", system="<<SYS>>\n{content}\n<</SYS>>\n\n", user="{content} [/INST] ",
                       conversation_start="{bos}[INST] ", assistant_end=" {eos}", turn_separator="{bos}[INST] "),
    "chatml": Template("chatml", system="<|im_start|>system\n{content}<|im_end|>\n",
                       user="<|im_start|>user\n{content}<|im_end|>\n", assistant_header="<|im_start|>assistant\n",
                       assistant_end="<|im_end|>", turn_separator="\n"),
    "alpaca": Template("alpaca", system="{content}\n\n", user="### Instruction:\n{content}\n\n",
                       assistant_header="### Response:\n", assistant_end="{eos}", turn_separator="\n\n",
                       default_system="Below is an instruction that describes a task. Write a response that "
                                      "appropriately completes the request."),
}
TEMPLATE_NAMES = (*TEMPLATES, "chat-template", "auto")

# Which named template a model without a chat template gets under `auto` (by config.model_type).
_ARCH_DEFAULTS = {"phi": "phi2", "llama": "llama2", "mistral": "llama2"}


def resolve_template(name: str, tokenizer: Any, model_type: str | None = None, *, log=None) -> Template:
    """`auto` = the tokenizer's chat template if it has one, else a named default for the architecture."""
    choose(name, TEMPLATE_NAMES, what="template", key="data.template")
    if name == "auto":
        if getattr(tokenizer, "chat_template", None):
            if log:
                log("template: using the tokenizer's own chat template (data.template: auto)")
            name = "chat-template"
        else:
            name = _ARCH_DEFAULTS.get(model_type or "", "alpaca")
            if log:
                log(f"template: the tokenizer has no chat template; using '{name}' for {model_type or 'this model'}")
    if name == "chat-template":
        jinja = getattr(tokenizer, "chat_template", None)
        if not jinja:
            raise LoratuneError("this tokenizer has no chat template", key="data.template",
                                hint=f"choose one of: {', '.join(TEMPLATES)}")
        return Template("chat-template", chat_template=jinja)
    return TEMPLATES[name]
