"""The one user-facing exception.

Every mistake a user can make (a bad config key, a malformed data row, a missing model) is raised as a
`LoratuneError` that names where the problem is (file, line, key or field) and what to do about it. The CLI
prints it as one line and exits non-zero; library tracebacks are shown only with `--debug`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from pathlib import Path


class LoratuneError(Exception):
    """A problem the user can fix. `str()` is the one line the CLI prints."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        column: int | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.column = column
        self.key = key
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        where = ""
        if self.file:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
                if self.column is not None:
                    where += f":{self.column}"
            where += ": "
        key = f"{self.key}: " if self.key else ""
        hint = f" ({self.hint})" if self.hint else ""
        # One line, always: a library message folded into ours may carry newlines (pydantic, safetensors, jinja).
        return re.sub(r"\s*\n\s*", " ", f"{where}{key}{self.message}{hint}").strip()


class TrainingInterrupted(LoratuneError):
    """Raised after SIGINT once a resumable checkpoint is on disk."""

    exit_code = 130


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' Did you mean "x"?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f'did you mean "{close[0]}"?' if close else ""


def choose(value: str, choices: Iterable[str], *, what: str, key: str | None = None, file=None) -> str:
    """Return `value` if it is one of `choices`, else raise an error that lists them all."""
    options = sorted(choices)
    if value in options:
        return value
    suggestion = did_you_mean(value, options)
    hint = suggestion + " " if suggestion else ""
    raise LoratuneError(
        f'unknown {what} "{value}"', key=key, file=file, hint=f"{hint}valid: {', '.join(options)}".strip()
    )
