"""Evaluation data from JSONL, checked line by line before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

from mergekit_subspace.errors import SubspaceError


def _read_jsonl(
    path: Path, fields: dict[str, type], max_examples: int | None, what: str = "evaluation"
) -> list[dict]:
    if not path.is_file():
        raise SubspaceError(f"{what} data not found", path)
    rows: list[dict] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SubspaceError(f"line {number} is not valid JSON ({exc.msg})", path) from exc
            if not isinstance(row, dict):
                raise SubspaceError(f"line {number} is not a JSON object", path)
            for name, kind in fields.items():
                if name not in row:
                    raise SubspaceError(f"line {number} has no '{name}' field", path)
                if kind is int and (isinstance(row[name], bool) or not isinstance(row[name], int)):
                    raise SubspaceError(f"line {number}: '{name}' must be an integer", path)
                if kind is str and not isinstance(row[name], str):
                    raise SubspaceError(f"line {number}: '{name}' must be a string", path)
            rows.append(row)
            if max_examples is not None and len(rows) >= max_examples:
                break
    if not rows:
        raise SubspaceError(f"{what} set is empty", path)
    return rows


def load_classification_jsonl(
    path: str | Path,
    max_examples: int | None = None,
    num_labels: int | None = None,
    what: str = "evaluation",
) -> list[tuple[str, int]]:
    """`{"text": str, "label": int}` per line; labels must index the task's head. `what` names the set in
    errors (evaluation, training, validation)."""
    path = Path(path)
    rows = _read_jsonl(path, {"text": str, "label": int}, max_examples, what)
    if num_labels is not None:
        for number, row in enumerate(rows, start=1):
            if not 0 <= row["label"] < num_labels:
                raise SubspaceError(
                    f"example {number}: label {row['label']} is outside the head's range 0..{num_labels - 1}",
                    path,
                )
    return [(row["text"], row["label"]) for row in rows]


def load_exact_match_jsonl(
    path: str | Path, max_examples: int | None = None, what: str = "evaluation"
) -> list[tuple[str, str]]:
    """`{"prompt": str, "answer": str}` per line."""
    rows = _read_jsonl(Path(path), {"prompt": str, "answer": str}, max_examples, what)
    return [(row["prompt"], row["answer"]) for row in rows]
