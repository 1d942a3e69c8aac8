"""A bench recipe is a compress recipe plus evaluation data per task and an optional sweep of budgets."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.recipe import CompressRecipe, Strict, _pydantic_message, load_yaml

EVAL_TYPES = ("sequence_classification", "causal_lm_exact_match", "image_classification")


class EvalSpec(Strict):
    type: Literal["sequence_classification", "causal_lm_exact_match", "image_classification"]
    data: str = Field(description="path template with {task}")
    max_examples: int | None = Field(300, ge=1)
    batch_size: int = Field(64, ge=1)

    @model_validator(mode="after")
    def has_task_placeholder(self) -> EvalSpec:
        if "{task}" not in self.data:
            raise ValueError("eval.data must contain '{task}', e.g. eval/{task}.jsonl")
        return self


class Sweep(Strict):
    k: list[int] = Field(min_length=1)

    @model_validator(mode="after")
    def positive(self) -> Sweep:
        if any(k < 1 for k in self.k):
            raise ValueError("every sweep k must be >= 1")
        self.k = sorted(set(self.k))
        return self


class BenchRecipe(CompressRecipe):
    eval: EvalSpec
    sweep: Sweep | None = None
    leave_one_out: bool = True
    peers: list[Literal["vlora"]] = Field(default_factory=lambda: ["vlora"])

    def budgets(self) -> list[int]:
        if self.sweep is not None:
            return self.sweep.k
        if self.subspace.k is None:
            raise ValueError("bench needs subspace.k or a sweep of k")
        return [self.subspace.k]


def parse_bench_recipe(path: str | Path) -> BenchRecipe:
    try:
        return BenchRecipe.model_validate(load_yaml(path))
    except ValidationError as exc:
        raise SubspaceError(_pydantic_message(exc), path) from exc
