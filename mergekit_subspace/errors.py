"""One exception type for bad input, so the CLI can print it and exit non-zero without a traceback."""

from __future__ import annotations

import re
from pathlib import Path

MAX_MESSAGE_CHARS = 2000  # an error is one line a person reads, whatever the input held
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_BREAKS = re.compile(r"\s*[\r\n]+\s*")
# pydantic's names of union branches and validator wrappers in an error's location: not the user's keys
_TYPE_TAG = re.compile(r"^(?:[a-z-]+\[.*\]|number|gradient|filters)$")


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` as one printable line of at most about `limit` characters: line breaks become ' | ', other
    control characters are escaped, and the middle of an over-long message is cut."""
    text = _BREAKS.sub(" | ", str(text).strip())
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    if len(text) > limit:
        cut = len(text) - limit
        text = f"{text[: limit - 200]} ... ({cut} characters left out) ... {text[-150:]}"
    return text


def validation_message(errors: list[dict], shown: int = 5) -> str:
    """pydantic's errors as one short line: where, what, and the offending value when it is small; past
    `shown` errors only a count (a recipe with 100k bad entries gives one readable line)."""
    parts = []
    for error in errors[:shown]:
        loc = [p for p in error.get("loc", ()) if not (isinstance(p, str) and _TYPE_TAG.match(p))]
        where = ".".join(str(p) for p in loc) or "recipe"
        message = (
            "unknown key" if error.get("type") == "extra_forbidden" else str(error.get("msg", "invalid"))
        )
        value = error.get("input")
        if isinstance(value, (int, float, str, type(None))) and error.get("type") != "extra_forbidden":
            shown_value = repr(value)
            if len(shown_value) <= 60 and "missing" not in str(error.get("type")):
                message += f" (got {shown_value})"
        parts.append(f"{where}: {message}")
    if len(errors) > shown:
        parts.append(f"and {len(errors) - shown} more problem(s)")
    return "; ".join(parts)


class SubspaceError(Exception):
    """Bad input or a broken store: the message names the file and the problem, on one line."""

    def __init__(self, problem: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(one_line(f"{self.path}: {problem}" if self.path else problem))
