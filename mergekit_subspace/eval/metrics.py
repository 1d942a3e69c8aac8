"""Accuracy of a PEFT folder (or the base alone) on classification or exact-match data."""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import torch

from mergekit_subspace.eval.models import load_causal_lm, load_classifier


@lru_cache(maxsize=4)
def _tokenizer(base: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


@torch.no_grad()
def classification_accuracy(
    base: str | Path,
    adapter_dir: str | Path | None,
    examples: list[tuple[str, int]],
    num_labels: int | None = None,
    batch_size: int = 64,
    max_length: int = 128,
    model: torch.nn.Module | None = None,
) -> float:
    """Fraction of examples whose argmax logit is the label."""
    tokenizer = _tokenizer(str(base))
    model = model if model is not None else load_classifier(base, adapter_dir, num_labels)
    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        encoded = tokenizer(
            [text for text, _ in batch],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        predicted = model(**encoded).logits.argmax(-1)
        correct += int((predicted == torch.tensor([label for _, label in batch])).sum())
    return correct / len(examples)


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().lower().split()).rstrip(".")


@torch.no_grad()
def exact_match_accuracy(
    base: str | Path,
    adapter_dir: str | Path | None,
    examples: list[tuple[str, str]],
    max_new_tokens: int = 12,
    batch_size: int = 16,
    model: torch.nn.Module | None = None,
) -> float:
    """Greedy generation; an example counts when the first line of the output equals the answer (normalized)."""
    tokenizer = copy.copy(_tokenizer(str(base)))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model if model is not None else load_causal_lm(base, adapter_dir)
    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        encoded = tokenizer([prompt for prompt, _ in batch], return_tensors="pt", padding=True)
        output = model.generate(
            **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        for text, (_, answer) in zip(texts, batch, strict=True):
            first_line = text.strip().split("\n")[0] if text.strip() else ""
            correct += int(normalize_answer(first_line) == normalize_answer(answer))
    return correct / len(examples)
