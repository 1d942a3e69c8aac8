"""The `train` recipe: which store, which data, how long. Checked before the base model is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.recipe import Strict, _no_bool, _pydantic_message, check_task_name, load_yaml

TASK_TYPES = ("sequence_classification", "causal_lm")


class TrainRecipe(Strict):
    """A new task trained as coefficients of a store's bases (its cores), plus its head for classifiers."""

    store: str = Field(description="the store whose bases are used (frozen) and that receives the task")
    name: str = Field(description="the new task's name in the store")
    task: Literal["sequence_classification", "causal_lm"]
    train: str = Field(description='JSONL: {"text", "label"} per line, or {"prompt", "answer"} for causal_lm')
    validation: str | None = None
    base_model: str | None = Field(None, description="default: the base model path the store records")
    steps: int = Field(100, ge=1)
    lr: float = Field(5e-3, gt=0, allow_inf_nan=False)
    batch_size: int = Field(32, ge=1)
    seed: int = 0
    eval_every: int = Field(25, ge=1, description="steps between validation passes")
    patience: int | None = Field(
        None, ge=1, description="stop after this many validation passes without a lower validation loss"
    )
    max_length: int = Field(128, ge=1)
    cores: Literal["full", "diagonal"] = "full"
    slots: list[str] | None = Field(None, min_length=1, description="default: every slot of the store")
    labels: list[str] | None = Field(None, min_length=2, description="class names, index = label id")

    no_bools = field_validator(
        "steps", "lr", "batch_size", "seed", "eval_every", "patience", "max_length", mode="before"
    )(classmethod(lambda cls, v: _no_bool(v)))

    @field_validator("name")
    @classmethod
    def plain_name(cls, value: str) -> str:
        try:
            return check_task_name(value)
        except SubspaceError as exc:
            raise ValueError(exc.problem) from None

    @model_validator(mode="after")
    def consistent(self) -> TrainRecipe:
        if self.patience is not None and self.validation is None:
            raise ValueError("patience needs validation data to watch")
        if self.labels is not None:
            if self.task != "sequence_classification":
                raise ValueError("labels name the classes of a sequence_classification task")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("labels must be distinct names")
        if self.slots is not None and len(set(self.slots)) != len(self.slots):
            raise ValueError("slots lists a slot twice")
        return self


def parse_train_recipe(path: str | Path) -> TrainRecipe:
    try:
        return TrainRecipe.model_validate(load_yaml(path))
    except ValidationError as exc:
        raise SubspaceError(_pydantic_message(exc), path) from exc
