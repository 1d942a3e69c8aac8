"""mergekit's YAML (0.1.5) as it is, turned into our merge recipe before validation: the one place that knows it.

A mergekit config that merges LoRAs lists `models:` as `base+path/to/lora` (or the adapter folder alone), with
`parameters: {weight, density}` per model (numbers, gradients or filter lists, which ours reads the same way),
top-level `base_model`, `merge_method`, `parameters` (normalize, rescale, int8_mask, lambda, and defaults of
the per-model ones), `dtype` / `out_dtype` and the tokenizer keys. Each maps onto our method and keys; what has
no equivalent is refused in one line naming the key when it would change the result, and noted on stderr (our
`mergekit_subspace.merge` logger) when it does not. Our own `output:` and `subspace:` keys may sit beside.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.recipe import TASK_NAME

log = logging.getLogger("mergekit_subspace.merge")

MERGEKIT_KEYS = frozenset({"models", "slices", "modules"})  # what only a mergekit config has
_TOP_LEVEL = frozenset(
    {"models", "merge_method", "base_model", "parameters", "dtype", "out_dtype"}
    | {"tokenizer_source", "tokenizer", "chat_template", "output", "subspace"}
)
_TASK_PARAMETERS = ("weight", "density")
_DTYPES = ("float32", "float16", "bfloat16")


class _Method:
    """How one mergekit task-arithmetic method maps: our method, and its normalize / rescale defaults."""

    def __init__(self, ours: str, normalize: bool, rescale: bool, sparse: bool) -> None:
        self.ours, self.normalize, self.rescale, self.sparse = ours, normalize, rescale, sparse


# mergekit 0.1.5's registry (merge_methods/registry.py): (normalize, rescale) defaults as it sets them.
_METHODS = {
    "linear": _Method("linear", normalize=True, rescale=False, sparse=False),
    "task_arithmetic": _Method("task_arithmetic", normalize=False, rescale=False, sparse=False),
    "ties": _Method("ties", normalize=True, rescale=False, sparse=True),
    "dare_ties": _Method("dare_ties", normalize=False, rescale=True, sparse=True),
    "dare_linear": _Method("dare_linear", normalize=False, rescale=True, sparse=True),
}
# mergekit methods with no equivalent on shared-basis cores, and what to use instead.
_NO_EQUIVALENT = {
    "breadcrumbs": "ties (drops the smallest entries, not the largest outliers as well)",
    "breadcrumbs_ties": "ties",
    "della": "dare_ties (uniform drop probability, not magnitude-ranked)",
    "della_linear": "dare_linear",
    "sce": "ties",
    "slerp": "linear",
    "nuslerp": "linear",
    "multislerp": "linear",
    "karcher": "linear",
    "model_stock": "linear",
    "nearswap": "linear",
    "arcee_fusion": "ties",
    "ram": "task_arithmetic",
    "ramplus_tl": "task_arithmetic",
    "passthrough": "nothing: a passthrough stacks layers, it merges no deltas",
}


def is_mergekit(data: dict[str, Any]) -> bool:
    """A mergekit config names its inputs under models/slices/modules; our recipe never does."""
    return bool(MERGEKIT_KEYS & set(data))


def _refuse(problem: str, where: str | Path | None) -> SubspaceError:
    return SubspaceError(f"mergekit recipe: {problem}", where)


def _model_path(value: Any, key: str, where: str | Path | None) -> str:
    """mergekit's ModelPath: 'path', 'path@revision' or {path, revision}, as one spelling our resolver reads."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and isinstance(value.get("path"), str) and set(value) <= {"path", "revision"}:
        return value["path"] + (f"@{value['revision']}" if value.get("revision") else "")
    raise _refuse(f"{key} must be a model path or hub id (got {str(value)[:80]!r})", where)


def _reference(value: Any, key: str, where: str | Path | None) -> tuple[str, str | None]:
    """mergekit's ModelReference, 'model' or 'model+lora' or {model, lora}: (model, lora or None)."""
    if isinstance(value, str):
        parts = value.split("+")
        if len(parts) > 2 or not all(parts):
            raise _refuse(f"{key} '{value}' is not 'model' or 'base+lora'", where)
        return parts[0], parts[1] if len(parts) == 2 else None
    if isinstance(value, dict) and "model" in value:
        if value.get("override_architecture") is not None:
            raise _refuse(
                f"{key}.override_architecture has no equivalent: adapters load on the base as it is", where
            )
        unknown = set(value) - {"model", "lora", "override_architecture"}
        if unknown:
            raise _refuse(f"{key}.{sorted(unknown)[0]}: unknown key", where)
        lora = value.get("lora")
        return _model_path(value["model"], f"{key}.model", where), (
            None if lora is None else _model_path(lora, f"{key}.lora", where)
        )
    raise _refuse(
        f"{key} must be a model reference such as 'base+path/to/lora' (got {str(value)[:80]!r})", where
    )


def _task_name(adapter: str, taken: set[str]) -> str:
    """The adapter's folder (or hub repository) name, made a plain file name and unique in the merge."""
    stem = adapter.split("@")[0].rstrip("/").split("/")[-1]
    name = re.sub(r"[^A-Za-z0-9._-]", "-", stem).lstrip(".-") or "adapter"
    if not TASK_NAME.match(name):
        name = f"adapter-{name}"
    unique, n = name, 2
    while unique in taken:
        unique, n = f"{name}-{n}", n + 1
    taken.add(unique)
    return unique


def _same(a: str, b: str) -> bool:
    """The same model, however the path is spelled ('./base' and 'base')."""
    return os.path.normpath(a) == os.path.normpath(b)


def _check_adapter(path: str, key: str, where: str | Path | None) -> None:
    """A model given without '+lora' must be an adapter folder: a full model is mergekit's, not ours."""
    folder = Path(path)
    if (
        folder.is_dir()
        and not (folder / "adapter_config.json").is_file()
        and (folder / "config.json").is_file()
    ):
        raise _refuse(
            f"{key} '{path}' is a full model, not a LoRA adapter: mergekit-subspace merges adapters "
            "(`base+path/to/lora` or the adapter folder)",
            where,
        )


def _drop_ignored(method: str, parameters: dict[str, Any], key: str) -> dict[str, Any]:
    """mergekit's task_arithmetic takes a density and ignores it (it sparsifies nothing): so do we, aloud."""
    if method == "task_arithmetic" and "density" in parameters:
        log.warning(f"note: {key}: density is ignored by task_arithmetic (as in mergekit)")
        return {k: v for k, v in parameters.items() if k != "density"}
    return parameters


def _flag(parameters: dict[str, Any], key: str, default: bool, where: str | Path | None) -> bool:
    value = parameters.pop(key, default)
    if not isinstance(value, bool):
        raise _refuse(f"parameters.{key} must be true or false (got {value!r})", where)
    return value


def _shared(method: str, parameters: dict[str, Any], where: str | Path | None) -> dict[str, Any]:
    """Top-level mergekit parameters -> ours: normalize / rescale pick or refuse the method, int8_mask is a
    note, lambda and the per-model defaults (weight, density) pass through."""
    spec = _METHODS[method]
    parameters = _drop_ignored(method, dict(parameters), "parameters")
    normalize = _flag(parameters, "normalize", spec.normalize, where)
    rescale = _flag(parameters, "rescale", spec.rescale, where)
    if parameters.pop("int8_mask", False) is not False:
        log.warning("note: int8_mask only saves memory in mergekit; the sign mask here is exact either way")
    ours = spec.ours
    if method == "task_arithmetic" and normalize:
        ours = "linear"  # mergekit divides the weighted sum by the sum of the weights: our weighted average
    elif normalize != spec.normalize:
        fix = (
            "remove the key" if method != "linear" else "use merge_method: task_arithmetic for a weighted sum"
        )
        raise _refuse(
            f"parameters.normalize: {str(normalize).lower()} with {method} has no equivalent "
            f"(mergekit-subspace's {spec.ours} always {'divides' if spec.normalize else 'sums'}); {fix}",
            where,
        )
    if rescale != spec.rescale:
        raise _refuse(
            f"parameters.rescale: {str(rescale).lower()} with {method} has no equivalent "
            f"({'DARE here always rescales survivors by 1 / density' if spec.rescale else 'only DARE rescales'});"
            " remove the key",
            where,
        )
    allowed = {"lambda", *_TASK_PARAMETERS} if method != "linear" else {"weight"}
    for key in parameters:
        if key not in allowed:
            raise _refuse(
                f"parameters.{key} has no equivalent for {method} (it takes: {', '.join(sorted(allowed))})",
                where,
            )
    if spec.sparse and "density" not in parameters:
        parameters["density"] = 1.0  # mergekit's default; ours would trim or drop by default
    return {"merge_method": ours, "parameters": parameters}


def _dtype(data: dict[str, Any], where: str | Path | None) -> str | None:
    """mergekit writes out_dtype, else dtype: our output.dtype (the merge itself runs in float64 here)."""
    key = "out_dtype" if data.get("out_dtype") else "dtype"
    value = data.get(key)
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise _refuse(
            f"{key} '{value}' has no equivalent (an adapter is written as {', '.join(_DTYPES)})", where
        )
    return name


def _tokenizer(data: dict[str, Any], base: str | None, where: str | Path | None) -> None:
    """The adapter uses the base's tokenizer: a tokenizer source that is the base is a note, any other an error."""
    source = data.get("tokenizer_source")
    key = "tokenizer_source"
    if isinstance(data.get("tokenizer"), dict):
        tokenizer = data["tokenizer"]
        if set(tokenizer) - {"source"}:
            raise _refuse(
                "tokenizer.tokens / pad_to_multiple_of have no equivalent: the base's vocabulary is kept",
                where,
            )
        source, key = tokenizer.get("source", "union"), "tokenizer.source"
    elif data.get("tokenizer") is not None:
        raise _refuse("tokenizer must be a mapping", where)
    if source is not None:
        if source == "base" or source == base:
            log.warning(f"note: {key}: base is what a LoRA merge gives anyway; no tokenizer is written")
        else:
            raise _refuse(
                f"{key}: {source!r} has no equivalent: the merged adapter keeps the base's vocabulary; "
                "remove the key or set it to base",
                where,
            )
    if data.get("chat_template") is not None:
        log.warning("note: chat_template is not written: the merged adapter loads with the base's tokenizer")


def convert(data: dict[str, Any], where: str | Path | None = None) -> dict[str, Any]:
    """Our merge recipe dict for a mergekit config (checked here for what only mergekit has; the result is
    then validated like any recipe). A dict that is not a mergekit config comes back as it is."""
    if not is_mergekit(data):
        return data
    for key in ("slices", "modules"):
        if key in data:
            raise _refuse(
                f"`{key}:` (layer ranges per model) has no equivalent; list whole adapters under `models:`",
                where,
            )
    unknown = sorted(set(data) - _TOP_LEVEL)
    if unknown:
        raise _refuse(f"{unknown[0]}: unknown key", where)
    method = data.get("merge_method")
    if method in _NO_EQUIVALENT:
        raise _refuse(
            f"merge_method '{method}' has no equivalent on shared-basis cores; closest: {_NO_EQUIVALENT[method]}",
            where,
        )
    if method not in _METHODS:
        raise _refuse(
            f"merge_method {method!r} is not a mergekit method (known here: {', '.join(_METHODS)})", where
        )
    base = None if data.get("base_model") is None else _reference(data["base_model"], "base_model", where)
    if base is not None and base[1] is not None:
        raise _refuse("base_model carries a LoRA ('+'); give the plain base model", where)
    base_model = base[0] if base else None
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise _refuse("`models:` must list the adapters to merge", where)
    adapters: list[dict[str, str]] = []
    tasks: list[dict[str, Any]] = []
    taken: set[str] = set()
    for i, entry in enumerate(models):
        key = f"models[{i}]"
        if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise _refuse(f"{key} must be a mapping with `model:` (and `parameters:`)", where)
        model, lora = _reference(entry["model"], f"{key}.model", where)
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise _refuse(f"{key}.parameters must be a mapping", where)
        if lora is None and base_model is not None and _same(model, base_model):
            if method == "linear":
                raise _refuse(
                    f"{key} is the base model itself: in a linear merge it only shrinks the others' weights; "
                    "remove it and lower their weights instead",
                    where,
                )
            continue  # the base adds no task vector (as in mergekit)
        if lora is not None:
            if base_model is None:
                base_model = model
            elif not _same(model, base_model):
                raise _refuse(f"{key}: LoRA on '{model}', but base_model is '{base_model}'", where)
        adapter = lora or model
        if lora is None:
            _check_adapter(adapter, key, where)
        parameters = _drop_ignored(method, parameters, key)
        for name in parameters:
            if name not in _TASK_PARAMETERS or (method == "linear" and name != "weight"):
                raise _refuse(f"{key}.parameters.{name} has no equivalent for {method}", where)
        name = _task_name(adapter, taken)
        adapters.append({"path": adapter, "name": name})
        tasks.append({"name": name, "parameters": dict(parameters)})
    if not adapters:
        raise _refuse("`models:` lists no adapter besides the base model", where)
    global_parameters = data.get("parameters") or {}
    if not isinstance(global_parameters, dict):
        raise _refuse("parameters must be a mapping", where)
    missing = [
        t["name"] for t in tasks if "weight" not in t["parameters"] and "weight" not in global_parameters
    ]
    if missing:
        raise _refuse(f"adapter '{missing[0]}' has no weight ({method} requires one, as in mergekit)", where)
    _tokenizer(data, base_model, where)
    output = {"format": "peft", "heads": "none"}  # mergekit writes one merged model: here one adapter
    dtype = _dtype(data, where)
    if dtype is not None:
        output["dtype"] = dtype
    if data.get("output") is not None:
        if not isinstance(data["output"], dict):
            raise _refuse("output must be a mapping", where)
        output.update(data["output"])
    recipe: dict[str, Any] = {
        **_shared(method, global_parameters, where),
        "adapters": adapters,
        "tasks": tasks,
    }
    recipe["output"] = output
    if base_model is not None:
        recipe["base_model"] = base_model
    if data.get("subspace") is not None:
        recipe["subspace"] = data["subspace"]
    return recipe


__all__ = ["convert", "is_mergekit"]
