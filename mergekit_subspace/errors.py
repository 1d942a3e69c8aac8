"""One exception type for bad input, so the CLI can print it and exit non-zero without a traceback."""

from __future__ import annotations

from pathlib import Path


class SubspaceError(Exception):
    """Bad input or a broken store: the message names the file and the problem."""

    def __init__(self, problem: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
