"""Choose lambda (and for merge_method: auto, the method) on validation data, scored through PEFT.

Every method's merged core is linear in lambda, so one written folder per task serves the whole grid: the
folder is written at lambda = 1 and loaded once with PeftModel.from_pretrained, and each grid point sets the
LoRA scale (LoraLayer.set_scale), which is exactly the folder with lambda folded into lora_B.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.eval.data import load_classification_jsonl, load_exact_match_jsonl

if TYPE_CHECKING:
    from tqdm import tqdm


IMAGE = "image_classification"


@dataclass
class ValidationData:
    """One task's validation examples and how they are scored."""

    kind: str  # "classification", "exact_match" or "image_classification"
    examples: Any  # (text, label) / (prompt, answer) rows, or an image set's tensors (eval/image.py)
    path: str

    @property
    def count(self) -> int:
        return int(self.examples["labels"].shape[0]) if self.kind == IMAGE else len(self.examples)


def detect_kind(path: Path) -> str:
    """Classification rows have text/label, generation rows prompt/answer (the `bench` formats); a
    .safetensors file is an image set (pixel_values / labels, as `bench` reads it)."""
    if not path.is_file():
        raise SubspaceError("validation data not found", path)
    if path.suffix == ".safetensors":
        return IMAGE
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SubspaceError(f"line 1 is not valid JSON ({exc.msg})", path) from exc
                if isinstance(row, dict) and "prompt" in row and "answer" in row:
                    return "exact_match"
                return "classification"
    raise SubspaceError("evaluation set is empty", path)


def load_validation(path: str | Path, max_examples: int | None) -> ValidationData:
    path = Path(path)
    kind = detect_kind(path)
    if kind == IMAGE:
        from mergekit_subspace.eval.image import load_image_eval

        return ValidationData(kind, load_image_eval(path, max_examples), str(path))
    if kind == "exact_match":
        return ValidationData(kind, load_exact_match_jsonl(path, max_examples), str(path))
    return ValidationData(kind, load_classification_jsonl(path, max_examples), str(path))


def set_lora_scale(model: torch.nn.Module, factor: float) -> None:
    """Scale every LoRA layer to `factor` x its configured alpha / r (written folders use scale 1)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in list(module.scaling):
                module.set_scale(adapter, factor)


class Scorer:
    """Keeps the base model in memory; each candidate folder is loaded through PEFT on a fresh copy."""

    def __init__(self, base_model: str | Path, batch_size: int = 32) -> None:
        self.base = Path(base_model)
        if not self.base.is_dir():
            raise SubspaceError(
                "validation needs the base model folder (set `base_model:` in the recipe)", self.base
            )
        self.batch_size = batch_size
        self._cache: dict[tuple[str, int | None], torch.nn.Module] = {}
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.base))
        return self._tokenizer

    @torch.no_grad()
    def _classification_accuracy(self, model: torch.nn.Module, examples: list[tuple[str, int]]) -> float:
        """Argmax accuracy; examples run shortest first, so batches carry little padding (order-free)."""
        ordered = sorted(examples, key=lambda e: len(e[0]))
        correct = 0
        for start in range(0, len(ordered), self.batch_size):
            batch = ordered[start : start + self.batch_size]
            encoded = self.tokenizer(
                [text for text, _ in batch],
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
            predicted = model(**encoded).logits.argmax(-1)
            correct += int((predicted == torch.tensor([label for _, label in batch])).sum())
        return correct / len(examples)

    def _base_model(self, kind: str, num_labels: int | None) -> torch.nn.Module:
        from mergekit_subspace.eval.models import load_causal_lm, load_classifier

        key = (kind, num_labels)
        if key not in self._cache:
            if kind == IMAGE:
                from mergekit_subspace.eval.image import load_image_classifier

                self._cache[key] = load_image_classifier(self.base, None, num_labels)
            elif kind == "exact_match":
                self._cache[key] = load_causal_lm(self.base, None)
            else:
                self._cache[key] = load_classifier(self.base, None, num_labels)
        return self._cache[key]

    def grid(
        self, adapter_dir: Path, data: ValidationData, grid: list[float], progress: tqdm | None = None
    ) -> list[float]:
        """Score of the folder at each lambda of the grid; `progress` (a tqdm bar) advances per point."""
        from peft import PeftModel

        from mergekit_subspace.eval.image import image_classification_accuracy
        from mergekit_subspace.eval.metrics import exact_match_accuracy
        from mergekit_subspace.eval.models import head_size

        num_labels = head_size(adapter_dir) if data.kind != "exact_match" else None
        if num_labels is not None:
            if data.kind == IMAGE:
                top = int(data.examples["labels"].max())
            else:
                top = max(label for _, label in data.examples)
            if top >= num_labels:
                raise SubspaceError(
                    f"has label {top} but the task's head has {num_labels} outputs", data.path
                )
        model = PeftModel.from_pretrained(
            copy.deepcopy(self._base_model(data.kind, num_labels)), str(adapter_dir)
        )
        model.eval()
        scores = []
        for value in grid:
            set_lora_scale(model, value)
            if data.kind == "exact_match":
                score = exact_match_accuracy(self.base, None, data.examples, model=model)
            elif data.kind == IMAGE:
                score = image_classification_accuracy(
                    self.base, None, data.examples, num_labels=num_labels, model=model
                )  # num_labels None: the base's head scores, restricted to the task's classes
            else:
                score = self._classification_accuracy(model, data.examples)
            scores.append(score)
            if progress is not None:
                progress.update(1)
        return scores


def choose(grid: list[float], mean_scores: list[float]) -> float:
    """Best mean score; among equals the lambda closest to 1 (the unscaled merge), so choices are stable."""
    best = max(mean_scores)
    candidates = [g for g, s in zip(grid, mean_scores, strict=True) if s >= best - 1e-12]
    return min(candidates, key=lambda g: (abs(math.log(abs(g))) if g != 0 else math.inf, g))


def choose_method(best_scores: dict[str, float]) -> str:
    """The candidate with the best mean score at its own best lambda; among equals the first one listed."""
    best = max(best_scores.values())
    return next(name for name, score in best_scores.items() if score >= best - 1e-12)
