"""Pydantic models of the YAML recipes: every check that needs no tensor happens here, before heavy I/O."""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergekit_subspace import hub
from mergekit_subspace.errors import SubspaceError, validation_message

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


def _no_bool(value: object) -> object:
    """YAML `true` is not a number: refuse it where pydantic would read it as 1."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


class AdapterEntry(Strict):
    path: str
    name: str | None = None


class FinetuneEntry(Strict):
    path: str
    name: str | None = None
    max_rank: int = Field(64, ge=1)

    no_bools = field_validator("max_rank", mode="before")(classmethod(lambda cls, v: _no_bool(v)))


class TargetSettings(Strict):
    """What a store must reach, instead of a k: a compression ratio against the sources' bytes, a size in
    bytes on disk, or a mean relative error. Exactly one is given; `chosen` is written by compress (the
    dtype, budget and predicted error it picked, and the other dtypes' predictions), never by a recipe."""

    ratio: float | None = Field(None, gt=1.0, allow_inf_nan=False)
    bytes: int | None = Field(None, ge=1)
    max_rel_error: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    chosen: dict[str, Any] | None = None

    no_bools = field_validator("ratio", "bytes", "max_rel_error", mode="before")(
        classmethod(lambda cls, v: _no_bool(v))
    )

    @model_validator(mode="after")
    def exactly_one(self) -> TargetSettings:
        given = [key for key in ("ratio", "bytes", "max_rel_error") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError("subspace.target takes exactly one of ratio, bytes, max_rel_error")
        return self

    @property
    def kind(self) -> str:
        return next(key for key in ("ratio", "bytes", "max_rel_error") if getattr(self, key) is not None)


class CalibrationSettings(Strict):
    """Texts to run the base model on, so byte budgets and targets size each slot by the error its output
    gets on real inputs rather than by the weight energy it keeps (mergekit_subspace.calibration)."""

    data: str  # a JSONL file of {"text": ...} lines (the bench's format) or a plain file of one text per line
    max_rows: int = Field(1024, ge=16, le=65536)  # token rows kept per slot (uniform sample of all tokens)
    max_length: int = Field(128, ge=8, le=8192)  # tokens per text
    batch_size: int = Field(16, ge=1, le=1024)

    no_bools = field_validator("max_rows", "max_length", "batch_size", mode="before")(
        classmethod(lambda cls, v: _no_bool(v))
    )


class SubspaceSettings(Strict):
    """How the per-slot basis is cut: a fixed k or an energy fraction, plus fitting options."""

    k: int | None = Field(None, ge=1)
    k_in: int | None = Field(None, ge=1)  # right (input-side) basis size when it should differ from k
    # bytes of basis and core numbers for the whole store; k per slot is then chosen (k is its upper bound)
    budget_bytes: int | None = Field(None, ge=1)
    energy: float | None = Field(None, gt=0.0, le=1.0)
    normalize: bool = True
    refine: int = Field(0, ge=0, le=50)
    dtype: Literal["float32", "float16", "bfloat16", "int8", "int4"] = "float32"
    # the tasks' cores in another dtype than the bases and heads (say int4 bases, int8 cores); None: `dtype`
    core_dtype: Literal["float32", "float16", "bfloat16", "int8", "int4"] | None = None
    # a ratio, bytes or mean relative error to reach: compress then picks k per slot and the dtype (among
    # float16, int8, int4, with cores as fine or finer; only `dtype` / `core_dtype` when given) and records
    # its choice in `target.chosen`
    target: TargetSettings | None = None
    # how each slot's basis is found: the dense SVD ("exact"), a randomized range finder with power passes
    # and Rayleigh-Ritz ("randomized"), or whichever costs less for the slot ("auto")
    solver: Literal["auto", "exact", "randomized"] = "auto"
    oversample: int = Field(10, ge=0, le=1024)  # extra sketch columns of the randomized solver
    power_iters: int = Field(3, ge=0, le=20)  # extra passes (block Krylov) of the randomized solver
    # several bases for a mixed zoo (Compress-then-Serve): tasks are split into this many clusters, each
    # with its own k per slot; "auto" picks the count at the bytes of one basis (mergekit_subspace.clusters)
    clusters: Annotated[int, Field(ge=1)] | Literal["auto"] | None = None
    # basis transfer (mergekit_subspace.transfer): pull each slot's bases toward another store's, the
    # prior weighing `transfer_weight` times the zoo's energy; "auto" picks it per slot by leave-one-out
    transfer_from: str | None = None
    transfer_weight: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | Literal["auto"] | None = None
    # calibration texts: a budget or target then spends bytes by the output error on the base's activations
    calibration: CalibrationSettings | None = None

    no_bools = field_validator(
        "k",
        "k_in",
        "budget_bytes",
        "energy",
        "refine",
        "oversample",
        "power_iters",
        "clusters",
        "transfer_weight",
        mode="before",
    )(classmethod(lambda cls, v: _no_bool(v)))

    @model_validator(mode="after")
    def one_budget(self) -> SubspaceSettings:
        if self.target is not None and self.target.chosen is None:
            clash = [key for key in ("k", "budget_bytes", "energy") if key in self.model_fields_set]
            if clash:
                raise ValueError(f"give either subspace.target or subspace.{clash[0]}, not both")
            self.k = TARGET_MAX_K
        if self.budget_bytes is not None and self.energy is not None:
            raise ValueError("give either subspace.budget_bytes or subspace.energy, not both")
        if self.k is None and self.energy is None:
            self.k = 128 if self.budget_bytes is not None else 16
        if self.k is not None and self.energy is not None:
            raise ValueError("give either subspace.k or subspace.energy, not both")
        if self.k_in is not None and self.energy is not None:
            raise ValueError("subspace.k_in goes with subspace.k, not with subspace.energy")
        if self.clusters is not None and self.budget_bytes is not None:
            raise ValueError(
                "subspace.clusters goes with k, energy or a target, not with budget_bytes "
                "(for a byte budget give target: {bytes: N})"
            )
        if self.calibration is not None and self.target is None and self.budget_bytes is None:
            raise ValueError(
                "subspace.calibration sizes slots under a target or budget_bytes; give one of them too"
            )
        return self._transfer_fits()

    def _transfer_fits(self) -> SubspaceSettings:
        """transfer_from fits by the exact solver on a fixed k per slot (mergekit_subspace.transfer)."""
        if self.transfer_from is None:
            if self.transfer_weight is not None:
                raise ValueError("subspace.transfer_weight goes with subspace.transfer_from")
            return self
        if self.energy is not None or self.refine or self.solver == "randomized":
            raise ValueError(
                "subspace.transfer_from goes with k, budget_bytes or a target (not energy), the exact solver "
                "and refine: 0"
            )
        if self.transfer_weight is None:
            self.transfer_weight = "auto"
        return self


TARGET_MAX_K = 128  # the widest basis per slot a target may choose
SOLVER_KEYS = ("solver", "oversample", "power_iters")


def settings_record(settings: SubspaceSettings) -> dict:
    """The settings as a manifest records them: solver keys only where they differ from the defaults, so
    a store fit by the exact solver is byte-identical to one written before the solver could be chosen."""
    defaults = SubspaceSettings()
    record = settings.model_dump()
    for key in SOLVER_KEYS:
        if record[key] == getattr(defaults, key):
            del record[key]
    if record["clusters"] is None:
        del record["clusters"]  # as for the target: unclustered stores stay byte-identical
    if record["transfer_from"] is None:
        del record["transfer_from"], record["transfer_weight"]
    if record["calibration"] is None:
        del record["calibration"]
    if record["target"] is None:
        del record["target"]  # stores without a target stay byte-identical to those written before
    else:
        record["target"] = {key: value for key, value in record["target"].items() if value is not None}
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
    """The first few problems on one line (a recipe with 100k bad entries gives one readable line)."""
    return validation_message(exc.errors())


class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key; the constructor below says so
                break
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key '{str(key)[:80]}' appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as 'problem (line L, column C)', not PyYAML's several lines with a caret."""
    problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    if mark is None and getattr(exc, "position", None) is not None:
        return f"{problem} (character {exc.position})"  # type: ignore[attr-defined]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else str(problem)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SubspaceError("recipe not found", path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError:
        raise SubspaceError("is not valid YAML (not UTF-8 text)", path) from None
    except yaml.YAMLError as exc:
        raise SubspaceError(f"is not valid YAML: {_yaml_problem(exc)}", path) from None
    except RecursionError:
        raise SubspaceError("is not valid YAML: nested too deeply", path) from None
    except OSError as exc:
        raise SubspaceError(f"cannot be read ({exc.strerror or exc})", path) from None
    if not isinstance(data, dict):
        raise SubspaceError("must be a YAML mapping of recipe keys", path)
    if not all(isinstance(key, str) for key in data):
        raise SubspaceError("recipe keys must be strings", path)
    return data


def parse_compress_recipe(path: str | Path) -> CompressRecipe:
    try:
        recipe = CompressRecipe.model_validate(load_yaml(path))
    except ValidationError as exc:
        raise SubspaceError(_pydantic_message(exc), path) from exc
    recipe.base_model = hub.resolve_optional(recipe.base_model, path)
    return recipe


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
        else:  # a local folder, or a hub id read from the Hugging Face cache (named after its repository)
            path = hub.resolve(raw, recipe_path)
            expanded.append((path, name or (hub.default_name(raw) if path != Path(raw) else None), extra))
    return expanded


def parse_settings_file(path: str | Path) -> SubspaceSettings:
    """Settings for `refit --settings`: a YAML file holding a `subspace:` mapping (or just its keys)."""
    data = load_yaml(path)
    if isinstance(data, dict) and set(data) == {"subspace"}:
        data = data["subspace"]
    try:
        return SubspaceSettings.model_validate(data)
    except ValidationError as exc:
        raise SubspaceError(_pydantic_message(exc), path) from exc
