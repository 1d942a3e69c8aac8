"""Parameter values as mergekit writes them: a number, a gradient over layers, or a list of name filters.

weight: 0.5                              # everywhere
weight: [1.0, 0.5]                       # a gradient: interpolated over the layers, first to last
density:                                 # by module name, first match wins; no filter = default
  - {filter: value, value: [0.2, 0.6]}
  - {value: 0.3}
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Union

from pydantic import AllowInfNan, BaseModel, ConfigDict, Discriminator, Strict, Tag

# A number as YAML writes it: finite (no .nan / .inf), and not a string or true/false read as one.
Scalar = Annotated[float, Strict(), AllowInfNan(False)]
Gradient = list[Scalar]


def _shape(value: Any) -> str:
    """Which form a raw parameter value has, so a bad one is reported against that form only."""
    if isinstance(value, list):
        if value and all(isinstance(item, (dict, FilterEntry)) for item in value):
            return "filters"
        return "gradient"
    return "number"


NumberOrGradient = Annotated[
    Union[Annotated[Scalar, Tag("number")], Annotated[Gradient, Tag("gradient")]],  # noqa: UP007
    Discriminator(_shape),
]


class FilterEntry(BaseModel):
    """One mergekit-style conditional value: applies to modules whose path contains `filter`."""

    model_config = ConfigDict(extra="forbid")

    filter: str | None = None
    value: NumberOrGradient


ParamValue = Annotated[
    Union[  # noqa: UP007
        Annotated[Scalar, Tag("number")],
        Annotated[Gradient, Tag("gradient")],
        Annotated[list[FilterEntry], Tag("filters")],
    ],
    Discriminator(_shape),
]

_LAYER = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_index(module: str) -> int | None:
    """Transformer block index from a module path ('...layers.3.self_attn.q_proj' -> 3)."""
    match = _LAYER.search(f".{module}.")
    return int(match.group(1)) if match else None


def count_layers(modules: list[str]) -> int:
    indices = [i for i in (layer_index(m) for m in modules) if i is not None]
    return max(indices) + 1 if indices else 0


def values_of(value: ParamValue) -> list[float]:
    """Every number a parameter value can produce (for range checks)."""
    if isinstance(value, (int, float)):
        return [float(value)]
    out: list[float] = []
    for item in value:
        if isinstance(item, FilterEntry):
            out.extend(values_of(item.value))
        else:
            out.append(float(item))
    return out


def gradients_of(value: ParamValue) -> list[list[float]]:
    """The gradients (lists of numbers) inside a value, for length checks."""
    if isinstance(value, (int, float)):
        return []
    if value and all(isinstance(item, FilterEntry) for item in value):
        return [list(item.value) for item in value if isinstance(item.value, list)]
    return [list(value)]  # type: ignore[arg-type]


def interpolate(gradient: list[float], layer: int, num_layers: int) -> float:
    """Piecewise-linear value at `layer`, the points spread evenly from the first layer to the last."""
    if len(gradient) == 1 or num_layers <= 1:
        return float(gradient[0])
    position = layer / (num_layers - 1) * (len(gradient) - 1)
    low = min(int(position), len(gradient) - 2)
    frac = position - low
    return float(gradient[low] * (1 - frac) + gradient[low + 1] * frac)


def resolve(value: ParamValue | None, module: str, num_layers: int, default: float) -> float:
    """The number a parameter takes at `module` (gradients as mergekit: t = layer / (num_layers - 1))."""
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return float(value)
    if value and all(isinstance(item, FilterEntry) for item in value):
        for item in value:
            if item.filter in (None, "*") or item.filter in module:
                return resolve(item.value, module, num_layers, default)
        return default
    layer = layer_index(module)
    gradient = [float(v) for v in value]  # type: ignore[union-attr]
    # Like mergekit, a module outside the numbered blocks sits at position 0 of a gradient.
    return interpolate(gradient, 0 if layer is None else layer, num_layers)


def to_jsonable(value: ParamValue | None) -> object:
    if value is None or isinstance(value, (int, float)):
        return value
    return [item.model_dump() if isinstance(item, FilterEntry) else item for item in value]


class _Holder(BaseModel):
    """Validates a raw value into ParamValue (used by the recipe and by tests)."""

    value: ParamValue
