"""Pydantic models of the YAML recipes: every check that needs no tensor happens here, before heavy I/O."""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergekit_subspace.errors import SubspaceError

TASK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


def check_task_name(name: str, where: str | Path | None = None) -> str:
    """Task names become file names in the store: plain names only, no path tricks."""
    if not TASK_NAME.match(name) or name in {".", ".."} or len(name) > 200:
        raise SubspaceError(
            f"task name '{name}' is not a plain file name (letters, digits, '.', '_', '-'; no '/' or '..')",
            where,
        )
    return name


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterEntry(Strict):
    path: str
    name: str | None = None


class FinetuneEntry(Strict):
    path: str
    name: str | None = None
    max_rank: int = Field(64, ge=1)


class SubspaceSettings(Strict):
    """How the per-slot basis is cut: a fixed k or an energy fraction, plus fitting options."""

    k: int | None = Field(None, ge=1)
    k_in: int | None = Field(None, ge=1)  # right (input-side) basis size when it should differ from k
    # bytes of basis and core numbers for the whole store; k per slot is then chosen (k is its upper bound)
    budget_bytes: int | None = Field(None, ge=1)
    energy: float | None = Field(None, gt=0.0, le=1.0)
    normalize: bool = True
    refine: int = Field(0, ge=0, le=50)
    dtype: Literal["float32", "float16", "bfloat16", "int8"] = "float32"
    # how each slot's basis is found: the dense SVD ("exact"), a randomized range finder with power passes
    # and Rayleigh-Ritz ("randomized"), or whichever costs less for the slot ("auto")
    solver: Literal["auto", "exact", "randomized"] = "auto"
    oversample: int = Field(10, ge=0, le=1024)  # extra sketch columns of the randomized solver
    power_iters: int = Field(3, ge=0, le=20)  # extra passes (block Krylov) of the randomized solver

    @model_validator(mode="after")
    def one_budget(self) -> SubspaceSettings:
        if self.budget_bytes is not None and self.energy is not None:
            raise ValueError("give either subspace.budget_bytes or subspace.energy, not both")
        if self.k is None and self.energy is None:
            self.k = 128 if self.budget_bytes is not None else 16
        if self.k is not None and self.energy is not None:
            raise ValueError("give either subspace.k or subspace.energy, not both")
        if self.k_in is not None and self.energy is not None:
            raise ValueError("subspace.k_in goes with subspace.k, not with subspace.energy")
        return self


SOLVER_KEYS = ("solver", "oversample", "power_iters")


def settings_record(settings: SubspaceSettings) -> dict:
    """The settings as a manifest records them: solver keys only where they differ from the defaults, so
    a store fit by the exact solver is byte-identical to one written before the solver could be chosen."""
    defaults = SubspaceSettings()
    record = settings.model_dump()
    for key in SOLVER_KEYS:
        if record[key] == getattr(defaults, key):
            del record[key]
    return record


class CompressRecipe(Strict):
    base_model: str | None = None
    adapters: list[str | AdapterEntry] = Field(default_factory=list)
    finetunes: list[str | FinetuneEntry] = Field(default_factory=list)
    subspace: SubspaceSettings = Field(default_factory=SubspaceSettings)
    output: str | None = None

    @field_validator("adapters", "finetunes", mode="before")
    @classmethod
    def none_is_empty(cls, value: object) -> object:
        return [] if value is None else value

    @model_validator(mode="after")
    def finetunes_need_base(self) -> CompressRecipe:
        if self.finetunes and not self.base_model:
            raise ValueError("finetunes need base_model: a fine-tune is stored as its difference to the base")
        return self


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "recipe"
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SubspaceError("recipe not found", path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SubspaceError(f"is not valid YAML ({exc})", path) from exc
    if not isinstance(data, dict):
        raise SubspaceError("must be a YAML mapping of recipe keys", path)
    return data


def parse_compress_recipe(path: str | Path) -> CompressRecipe:
    try:
        return CompressRecipe.model_validate(load_yaml(path))
    except ValidationError as exc:
        raise SubspaceError(_pydantic_message(exc), path) from exc


def expand_entries(entries: list, recipe_path: str | Path | None) -> list[tuple[Path, str | None, dict]]:
    """Expand globs (sorted, so task order is deterministic) into (path, explicit name, extra fields)."""
    expanded: list[tuple[Path, str | None, dict]] = []
    for entry in entries:
        if isinstance(entry, str):
            raw, name, extra = entry, None, {}
        else:
            raw, name = entry.path, entry.name
            extra = entry.model_dump(exclude={"path", "name"})
        if glob.has_magic(raw):
            if name is not None:
                raise SubspaceError(
                    f"'{raw}' is a glob; a name can only be given to a single path", recipe_path
                )
            matches = sorted(p for p in glob.glob(raw) if Path(p).is_dir())
            if not matches:
                raise SubspaceError(f"pattern '{raw}' matched no folder", recipe_path)
            expanded.extend((Path(p), None, extra) for p in matches)
        else:
            expanded.append((Path(raw), name, extra))
    return expanded
