"""The merge recipe (YAML shaped like mergekit's): every check that needs no tensor happens here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergekit_subspace import hub
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.merge import mergekit_format
from mergekit_subspace.merge.methods import METHODS, get_method
from mergekit_subspace.merge.params import ParamValue, Scalar, gradients_of, to_jsonable, values_of
from mergekit_subspace.recipe import (
    AdapterEntry,
    SubspaceSettings,
    _no_bool,
    _pydantic_message,
    expand_entries,
    load_yaml,
)

HEADS_CHOICES = ("per_task", "none")
DEFAULT_LAMBDA_GRID = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
_SIZE = re.compile(r"^\s*(\d{1,15}(?:\.\d{1,15})?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
# Weights and lambda scale a delta: beyond this a merge only overflows (float16 holds up to 65504).
MAX_SCALE = 1000.0
MAX_SEED = 2**53  # seeds are read as float; above this they are no longer exact integers
AUTO = "auto"  # merge_method: auto tries candidate methods on the validation data (merge/run.py)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskEntry(Strict):
    """One task of the merge: a name in the store (or an adapter folder's name), its parameters, its data."""

    name: str
    weight: ParamValue | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    validation: str | None = None  # JSONL or image .safetensors (the `bench` formats) to choose lambda on

    def parameter(self, key: str) -> ParamValue | None:
        if key == "weight" and self.weight is not None:
            return self.weight
        return self.parameters.get(key)

    @model_validator(mode="after")
    def one_weight(self) -> TaskEntry:
        if self.weight is not None and "weight" in self.parameters:
            raise ValueError(f"task '{self.name}': give `weight` or `parameters.weight`, not both")
        return self


class ValidationSettings(Strict):
    """How lambda is chosen when tasks name validation data."""

    lambda_grid: list[Scalar] = Field(
        default_factory=lambda: list(DEFAULT_LAMBDA_GRID), min_length=1, max_length=1000
    )
    max_examples: int | None = Field(256, ge=1, le=10**9)
    batch_size: int = Field(32, ge=1, le=65536)
    # after the method and lambda: each task's weight times one of these, chosen task by task (None: off)
    task_weight_grid: list[Scalar] | None = Field(None, min_length=1, max_length=100)
    task_weight_sweeps: int = Field(1, ge=1, le=10)

    no_bools = field_validator("max_examples", "batch_size", "task_weight_sweeps", mode="before")(
        classmethod(lambda cls, v: _no_bool(v))
    )

    @field_validator("task_weight_grid")
    @classmethod
    def scales_in_range(cls, value: list[float] | None) -> list[float] | None:
        for scale in value or []:
            if not 0 <= scale <= MAX_SCALE:  # NaN fails this too
                raise ValueError(f"task weight scales lie in [0, {MAX_SCALE:g}], not {scale}")
        return value

    @field_validator("lambda_grid")
    @classmethod
    def grid_in_range(cls, grid: list[float]) -> list[float]:
        for value in grid:
            if abs(value) > MAX_SCALE:
                raise ValueError(f"lambda {value:g} is outside [-{MAX_SCALE:g}, {MAX_SCALE:g}]")
        return grid


def parse_size(value: int | str) -> int:
    """'2GB' / '500MB' / 1000000 -> bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(f"max_shard_size '{value}' is not a size like '2GB' or '500MB'")
    factor = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[match.group(2).upper()]
    return int(float(match.group(1)) * factor)


class OutputSettings(Strict):
    path: str | None = None
    format: Literal["peft", "full"] = "peft"
    rank: int | None = Field(None, ge=1)  # None: the merged core's numerical rank (exact)
    heads: str = "per_task"  # per_task | none | <task name>
    max_shard_size: int | str = "2GB"
    dtype: Literal["float32", "float16", "bfloat16"] | None = None  # peft output; None: the tasks' dtype

    no_bools = field_validator("rank", "max_shard_size", mode="before")(
        classmethod(lambda cls, v: _no_bool(v))
    )

    @field_validator("max_shard_size")
    @classmethod
    def size_parses(cls, value: int | str) -> int | str:
        if parse_size(value) <= 0:
            raise ValueError("max_shard_size must be positive")
        return value


class MergeRecipe(Strict):
    merge_method: str
    store: str | None = None
    adapters: list[str | AdapterEntry] = Field(default_factory=list)
    base_model: str | None = None
    subspace: SubspaceSettings | None = None  # basis for `adapters:` (default: exact, k = total rank)
    tasks: list[TaskEntry] | None = None  # default: every task, weight 1
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    validation: ValidationSettings = Field(default_factory=ValidationSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    auto_methods: list[str] | None = None  # candidates of merge_method: auto (default: every method)

    @field_validator("merge_method")
    @classmethod
    def known_method(cls, value: str) -> str:
        if value == AUTO:
            return value
        try:
            get_method(value)
        except KeyError as exc:
            raise ValueError(str(exc.args[0])) from exc
        return value

    @field_validator("auto_methods")
    @classmethod
    def known_candidates(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("the list is empty; name at least one method or leave it out to try all")
        for name in value or []:
            try:
                get_method(name)
            except KeyError as exc:
                raise ValueError(str(exc.args[0])) from exc
        if value is not None and len(set(value)) < len(value):
            raise ValueError("lists a method twice")
        return value

    @field_validator("adapters", mode="before")
    @classmethod
    def none_is_empty(cls, value: object) -> object:
        return [] if value is None else value

    @model_validator(mode="after")
    def consistent(self) -> MergeRecipe:
        if bool(self.store) == bool(self.adapters):
            raise ValueError("give exactly one source: `store:` or `adapters:`")
        if self.subspace is not None and self.store:
            raise ValueError("`subspace:` only applies to `adapters:` (a store already has its basis)")
        if self.auto_methods is not None and self.merge_method != AUTO:
            raise ValueError("`auto_methods:` only applies to merge_method: auto")
        if self.merge_method == AUTO and not self.uses_validation:
            raise ValueError("merge_method: auto needs validation data: give `validation:` for a task")
        if self.validation.task_weight_grid is not None and not self.uses_validation:
            raise ValueError(
                "validation.task_weight_grid needs validation data: give `validation:` for a task"
            )
        methods = [METHODS[name] for name in self.candidates]
        accepted = tuple(dict.fromkeys(p for m in methods for p in m.parameters))
        shared = {"lambda", *(p for m in methods for p in m.shared_parameters)}
        for key, value in self.parameters.items():
            _check_known(self.merge_method, key, accepted)
            if key in shared and not isinstance(value, (int, float)):
                raise ValueError(f"parameters.{key} is one number for the whole merge")
            _check_value(key, value, f"parameters.{key}")
        names: set[str] = set()
        for task in self.tasks or []:
            if task.name in names:
                raise ValueError(f"task '{task.name}' is listed twice")
            names.add(task.name)
            for key in ("weight", *task.parameters):
                value = task.parameter(key)
                if value is None:
                    continue
                _check_known(self.merge_method, key, accepted)
                if key in shared:
                    raise ValueError(
                        f"task '{task.name}': {key} is global; set it under top-level `parameters`"
                    )
                _check_value(key, value, f"task '{task.name}' {key}")
        if self.tasks is not None and not self.tasks:
            raise ValueError("`tasks:` is empty; list at least one task or leave it out to merge all")
        if self.uses_validation and "lambda" in self.parameters:
            raise ValueError(
                "lambda is chosen on the validation data; remove parameters.lambda or list candidates in "
                "validation.lambda_grid"
            )
        return self

    def input_paths(self, recipe_path: str | Path | None = None) -> list[str | Path]:
        """Every file or folder the merge reads (store, adapters, base model, validation data), so an output
        that is, lies in or holds one of them can be refused before any work."""
        paths: list[str | Path] = [p for p in (self.store, self.base_model) if p]
        paths += [path for path, _, _ in expand_entries(self.adapters, recipe_path)]
        paths += [t.validation for t in self.tasks or [] if t.validation]
        return paths

    @property
    def candidates(self) -> list[str]:
        """The methods to run: merge_method, or for auto the `auto_methods` (default: every registered one)."""
        if self.merge_method != AUTO:
            return [self.merge_method]
        return list(self.auto_methods or METHODS)

    @property
    def uses_validation(self) -> bool:
        return any(task.validation for task in self.tasks or [])

    def global_parameters(self) -> dict[str, object]:
        return {key: to_jsonable(value) for key, value in self.parameters.items()}


def _check_known(method: str, key: str, accepted: tuple[str, ...]) -> None:
    if key not in accepted:
        raise ValueError(f"method '{method}' takes no parameter '{key}' (it takes: {', '.join(accepted)})")


def _check_value(key: str, value: ParamValue, where: str) -> None:
    if any(len(g) == 0 for g in gradients_of(value)):
        raise ValueError(f"{where}: a gradient needs at least one value")
    if key in ("weight", "lambda"):
        bad = [v for v in values_of(value) if abs(v) > MAX_SCALE]
        if bad:
            raise ValueError(f"{where}: {key} must lie in [-{MAX_SCALE:g}, {MAX_SCALE:g}], got {bad[0]:g}")
    if key == "seed" and not (float(value).is_integer() and 0 <= float(value) <= MAX_SEED):  # type: ignore[arg-type]
        raise ValueError(f"{where}: seed must be a whole number in [0, 2**53], got {value}")
    if key == "density":
        bad = [v for v in values_of(value) if not 0.0 < v <= 1.0]
        if bad:
            raise ValueError(f"{where}: density must lie in (0, 1], got {bad[0]}")
    if key == "common_fraction" and not 0.0 <= float(value) <= 1.0:  # type: ignore[arg-type]
        raise ValueError(f"{where}: common_fraction must lie in [0, 1]")


def parse_merge_recipe(path: str | Path) -> MergeRecipe:
    """Read and validate a merge recipe; errors name the file and the key."""
    return merge_recipe_from_dict(load_yaml(path), path)


def merge_recipe_from_dict(data: dict, where: str | Path | None = None) -> MergeRecipe:
    data = mergekit_format.convert(data, where)  # a mergekit config as it is -> our recipe; ours unchanged
    try:
        recipe = MergeRecipe.model_validate(data)
    except ValidationError as exc:
        raise SubspaceError(_pydantic_message(exc), where) from exc
    recipe.base_model = hub.resolve_optional(recipe.base_model, where)
    return recipe
