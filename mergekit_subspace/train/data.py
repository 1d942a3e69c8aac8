"""Training and validation data, read with the bench's JSONL readers and checked before any model loads;
then tokenized once and served as padded batches in a seeded order."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.eval.data import load_classification_jsonl, load_exact_match_jsonl
from mergekit_subspace.train.recipe import TrainRecipe

IGNORE_INDEX = -100  # labels the loss skips (prompt tokens, padding)


@dataclass
class TaskData:
    """The examples as read: (text, label) or (prompt, answer) pairs; `num_labels` for classifiers."""

    train: list[tuple[str, Any]]
    validation: list[tuple[str, Any]] | None
    num_labels: int | None


def load_task_data(recipe: TrainRecipe) -> TaskData:
    """Read and check both files. For a classifier the head has len(labels) outputs, or one per label id the
    training data uses; every label must fall inside it and the training data must use every class."""
    if recipe.task == "causal_lm":
        train = load_exact_match_jsonl(recipe.train, what="training")
        validation = (
            None
            if recipe.validation is None
            else load_exact_match_jsonl(recipe.validation, what="validation")
        )
        return TaskData(train, validation, None)
    named = None if recipe.labels is None else len(recipe.labels)
    train = load_classification_jsonl(recipe.train, num_labels=named, what="training")
    used = sorted({label for _, label in train})
    num_labels = named if named is not None else used[-1] + 1
    if used[0] < 0:
        raise SubspaceError(f"label {used[0]} is negative; labels are class ids 0, 1, ...", recipe.train)
    if len(used) < 2:
        raise SubspaceError(f"the training data has one class only (label {used[0]})", recipe.train)
    if len(used) != num_labels:
        missing = sorted(set(range(num_labels)) - set(used))[:8]
        source = f"labels names {num_labels} classes" if named else f"label ids run to {num_labels - 1}"
        raise SubspaceError(
            f"{source} but the training data never uses class(es) {missing}: the label count is inconsistent",
            recipe.train,
        )
    validation = None
    if recipe.validation is not None:
        validation = load_classification_jsonl(recipe.validation, num_labels=num_labels, what="validation")
    return TaskData(train, validation, num_labels)


@dataclass
class Encoded:
    """Token ids per example, and per example either a class id or the per-token labels of its answer."""

    ids: list[list[int]]
    targets: list[Any]


def encode(tokenizer: Any, rows: list[tuple[str, Any]], task: str, max_length: int) -> Encoded:
    """Classifiers: the text, truncated as evaluation truncates it. Causal LMs: the prompt tokenized alone
    (as at generation time) + " " + answer + eos, the loss on the answer tokens only."""
    if task == "sequence_classification":
        ids = tokenizer([text for text, _ in rows], truncation=True, max_length=max_length)["input_ids"]
        return Encoded(ids, [label for _, label in rows])
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    all_ids, targets = [], []
    for prompt, answer in rows:
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + eos
        ids = (prompt_ids + answer_ids)[:max_length]
        all_ids.append(ids)
        targets.append(([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length])
    return Encoded(all_ids, targets)


def collate(encoded: Encoded, rows: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch of the given examples, with `labels` as the model's loss takes them."""
    width = max(len(encoded.ids[i]) for i in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    token_labels = isinstance(encoded.targets[rows[0]], list)
    labels = (
        torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        if token_labels
        else torch.tensor([encoded.targets[i] for i in rows], dtype=torch.long)
    )
    for row, i in enumerate(rows):
        seq = encoded.ids[i]
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
        if token_labels:
            labels[row, : len(seq)] = torch.tensor(encoded.targets[i], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def batch_order(lengths: list[int], batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless shuffled epochs of example indices, `batch_size` at a time, each batch of similar lengths:
    sorting within chunks of 16 batches cuts the padding a random batch carries (about 3x on short texts)."""
    chunk = batch_size * 16
    while True:
        perm = torch.randperm(len(lengths), generator=generator).tolist()
        batches = []
        for start in range(0, len(perm), chunk):
            part = sorted(perm[start : start + chunk], key=lengths.__getitem__)
            batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
        for index in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[index]


def in_batches(n: int, batch_size: int) -> Iterator[list[int]]:
    """Every example once, in order (validation)."""
    for start in range(0, n, batch_size):
        yield list(range(start, min(n, start + batch_size)))
