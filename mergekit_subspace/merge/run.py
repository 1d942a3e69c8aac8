"""The merge pipeline: recipe -> cores -> one merged core per slot -> PEFT folder(s) or a full model.

Usable from Python (`merge("recipe.yaml", out=...)`); the `merge` command only calls this. All checks run
before anything is written, and the output folder appears atomically (complete, or not at all).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergekit_subspace import parallel
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.fit import check_device
from mergekit_subspace.io.checkpoint import Checkpoint
from mergekit_subspace.io.files import atomic_directory, check_output, json_bytes
from mergekit_subspace.io.peft import write_lora_adapter
from mergekit_subspace.lowrank import core_to_factors
from mergekit_subspace.merge import inputs as merge_inputs
from mergekit_subspace.merge.full import write_full_model, write_model_card
from mergekit_subspace.merge.methods import METHODS, MergeMethod, SlotInputs, numerical_rank
from mergekit_subspace.merge.params import count_layers, gradients_of, resolve, to_jsonable
from mergekit_subspace.merge.recipe import (
    AUTO,
    MergeRecipe,
    merge_recipe_from_dict,
    parse_merge_recipe,
    parse_size,
)
from mergekit_subspace.merge.select import Scorer, ValidationData, choose, choose_method, load_validation

REPORT = "merge_report.json"
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class MergeResult:
    """Where the merge went: the output folder, the written model folders by task (or 'merged'), the report."""

    out: Path
    folders: dict[str, Path]
    report: dict[str, Any]


@dataclass
class MergedSlots:
    """Merged cores (before lambda) and their PEFT factors at lambda = 1."""

    cores: dict[str, torch.Tensor]
    factors: Factors
    stats: dict[str, dict[str, float]] = field(default_factory=dict)


def _config_layers(base: str | None) -> int | None:
    if not base or not (Path(base) / "config.json").is_file():
        return None
    config = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


def _task_order(recipe: MergeRecipe, available: list[str], where: str) -> list[str]:
    if recipe.tasks is None:
        return sorted(available)
    known = set(available)
    for task in recipe.tasks:
        if task.name not in known:
            raise SubspaceError(
                f"task '{task.name}' is not among the inputs (known: {', '.join(sorted(known))})", where
            )
    return [t.name for t in recipe.tasks]


def _parameter(recipe: MergeRecipe, task: str, key: str) -> Any:
    """A task's own value for `key`, else the global one (mergekit's override order)."""
    for entry in recipe.tasks or []:
        if entry.name == task and entry.parameter(key) is not None:
            return entry.parameter(key)
    return recipe.parameters.get(key)


def _check_gradients(recipe: MergeRecipe, names: list[str], num_layers: int, where: str) -> None:
    """A gradient spreads its points over the layers: more points than layers cannot be placed."""
    keys = dict.fromkeys(key for m in recipe.candidates for key in METHODS[m].task_parameters)
    for task in names:
        for key in keys:
            value = _parameter(recipe, task, key)
            for gradient in gradients_of(value) if value is not None else []:
                if len(gradient) > 1 and len(gradient) > max(num_layers, 1):
                    raise SubspaceError(
                        f"task '{task}' {key}: a gradient of {len(gradient)} values, but the merged modules "
                        f"span {num_layers} layer(s); give at most {max(num_layers, 1)} values",
                        where,
                    )


def _slot_seed(seed: int, module: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(module.encode())) % (2**63)


def merge_slots(
    recipe: MergeRecipe,
    cores: merge_inputs.CoreSet,
    names: list[str],
    num_layers: int,
    method_name: str | None = None,
    task_scales: dict[str, float] | None = None,
) -> MergedSlots:
    """One merged core per slot, then its PEFT factors at the output rank (lambda not yet applied).

    `method_name` is one of the recipe's candidates (default: its merge_method); `task_scales` multiply the
    tasks' weights (validation's task-weight search).
    """
    scales = task_scales or {}
    method = METHODS[method_name or recipe.merge_method]
    options = {
        key: float(recipe.parameters.get(key, default)) for key, default in method.shared_parameters.items()
    }
    seed = int(options.get("seed", 0))
    merged: dict[str, torch.Tensor] = {}
    factors: Factors = {}
    stats: dict[str, dict[str, float]] = {}
    for module in cores.slots:
        if not any(module in cores.cores[name] for name in names):
            continue
        generator = torch.Generator().manual_seed(_slot_seed(seed, module)) if "seed" in options else None
        slot = SlotInputs(
            cores=[cores.core(name, module) for name in names],
            weights=[
                scales.get(n, 1.0) * resolve(_parameter(recipe, n, "weight"), module, num_layers, 1.0)
                for n in names
            ],
            density=[
                resolve(
                    _parameter(recipe, n, "density"), module, num_layers, method.defaults.get("density", 1.0)
                )
                for n in names
            ],
            rank=recipe.output.rank,
            options=options,
            generator=generator,
            shape=cores.shapes.get(module),
        )
        core = method.fn(slot)
        U, V = cores.bases[module]
        singular = torch.linalg.svdvals(core)
        exact_rank = max(1, numerical_rank(singular))
        rank = exact_rank if recipe.output.rank is None else min(recipe.output.rank, exact_rank)
        energy = float((singular**2).sum())
        kept = float((singular[:rank] ** 2).sum())
        merged[module] = core
        factors[module] = core_to_factors(U, core, V, rank)
        stats[module] = {"rank": rank, "kept_energy": 1.0 if energy == 0 else kept / energy}
    return MergedSlots(merged, factors, stats)


def _head_task(recipe: MergeRecipe, names: list[str], where: str) -> str | None:
    heads = recipe.output.heads
    if heads in ("per_task", "none"):
        return None
    if heads not in names:
        raise SubspaceError(
            f"output.heads '{heads}' is not per_task, none, or a merged task ({', '.join(names)})", where
        )
    return heads


def _adapter_config(cores: merge_inputs.CoreSet, task: str | None, names: list[str]) -> dict[str, Any]:
    config = dict(cores.tasks[task or names[0]].peft_config)
    if task is None:
        config["modules_to_save"] = None
    return config


def _scaled(factors: Factors, value: float, dtype: torch.dtype) -> Factors:
    return {m: ((B * value).to(dtype), A.to(dtype)) for m, (B, A) in factors.items()}


def _outputs(recipe: MergeRecipe, names: list[str], where: str) -> list[tuple[str, str | None]]:
    """(folder label, head task) pairs: one per task for per_task, else a single folder."""
    if recipe.output.heads == "per_task":
        return [(name, name) for name in names]
    return [("merged", _head_task(recipe, names, where))]


def _scorer(recipe: MergeRecipe, base_model: str | None, where: str) -> Scorer:
    if base_model is None:
        raise SubspaceError("validation needs the base model folder: set `base_model:` in the recipe", where)
    return Scorer(base_model, batch_size=recipe.validation.batch_size)


def _validate_lambda(
    recipe: MergeRecipe,
    cores: merge_inputs.CoreSet,
    names: list[str],
    merged: MergedSlots,
    data: dict[str, ValidationData],
    scorer: Scorer,
    where: str,
    progress: tqdm,
    grid: list[float] | None = None,
) -> tuple[float, dict[str, Any]]:
    """Score every task with validation data over the lambda grid (the recipe's, or `grid`); the best mean
    wins."""
    grid = list(recipe.validation.lambda_grid) if grid is None else grid
    head_task = None if recipe.output.heads == "per_task" else _head_task(recipe, names, where)
    per_task: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="merge-validate-") as tmp:
        for name, examples in data.items():
            head = name if recipe.output.heads == "per_task" else head_task
            extras = cores.tasks[head].extras if head else {}
            folder = write_lora_adapter(
                Path(tmp) / name,
                _scaled(merged.factors, 1.0, torch.float32),
                extras,
                _adapter_config(cores, head, names),
            )
            per_task[name] = scorer.grid(folder, examples, grid, progress)
    means = [sum(scores[i] for scores in per_task.values()) / len(per_task) for i in range(len(grid))]
    chosen = choose(grid, means)
    return chosen, {
        "lambda_grid": grid,
        "mean_scores": means,
        "task_scores": per_task,
        "chosen_lambda": chosen,
        "data": {name: {"path": d.path, "examples": d.count, "kind": d.kind} for name, d in data.items()},
    }


@dataclass
class Pick:
    """The merge to write: its method, merged slots, lambda, validation record, and auto's whole table."""

    method: str
    merged: MergedSlots
    lambda_: float
    validation: dict[str, Any] | None = None
    auto: dict[str, Any] | None = None


def _merge_and_choose(
    recipe: MergeRecipe,
    cores: merge_inputs.CoreSet,
    names: list[str],
    num_layers: int,
    data: dict[str, ValidationData],
    base_model: str | None,
    where: str,
    progress: bool,
    seconds: dict[str, float],
) -> Pick:
    """Merge with each candidate method (one unless merge_method is auto), score each over the lambda grid
    and keep the best; only the best merge so far is held, so auto costs no more memory than one merge."""
    if not data:
        clock = time.perf_counter()
        merged = merge_slots(recipe, cores, names, num_layers)
        seconds["merge"] = time.perf_counter() - clock
        return Pick(recipe.merge_method, merged, float(recipe.parameters.get("lambda", 1.0)))  # type: ignore[arg-type]
    scorer = _scorer(recipe, base_model, where)
    grid = list(recipe.validation.lambda_grid)
    best: dict[str, float] = {}
    table: list[dict[str, Any]] = []
    timings: dict[str, dict[str, float]] = {}
    pick: Pick | None = None
    for name in recipe.candidates:
        clock = time.perf_counter()
        merged = merge_slots(recipe, cores, names, num_layers, name)
        timings[name] = {"merge": time.perf_counter() - clock}
        clock = time.perf_counter()
        bar = tqdm(total=len(data) * len(grid), desc=f"validate {name}", disable=None if progress else True)
        with bar:
            chosen, validation = _validate_lambda(recipe, cores, names, merged, data, scorer, where, bar)
        timings[name]["validation"] = time.perf_counter() - clock
        best[name] = max(validation["mean_scores"])
        table += [
            {
                "method": name,
                "lambda": value,
                "score": validation["mean_scores"][i],
                "task_scores": {task: scores[i] for task, scores in validation["task_scores"].items()},
            }
            for i, value in enumerate(grid)
        ]
        if choose_method(best) == name:
            pick = Pick(name, merged, chosen, validation)
    assert pick is not None
    seconds["merge"] = sum(t["merge"] for t in timings.values())
    seconds["validation"] = sum(t["validation"] for t in timings.values())
    if recipe.validation.task_weight_grid is not None:
        clock = time.perf_counter()
        _tune_task_weights(recipe, cores, names, num_layers, data, scorer, where, progress, pick)
        seconds["validation"] += time.perf_counter() - clock
    if recipe.merge_method == AUTO:
        pick.auto = {
            "candidates": list(recipe.candidates),
            "chosen": {"method": pick.method, "lambda": pick.lambda_, "score": best[pick.method]},
            "best_scores": best,
            "table": table,
            "seconds": timings,
        }
    return pick


def _tune_task_weights(
    recipe: MergeRecipe,
    cores: merge_inputs.CoreSet,
    names: list[str],
    num_layers: int,
    data: dict[str, ValidationData],
    scorer: Scorer,
    where: str,
    progress: bool,
    pick: Pick,
) -> None:
    """Coordinate ascent on the tasks' weights at the chosen method and lambda: task by task, each scale of
    `task_weight_grid` is tried with the others held, and a scale is kept only if it raises the mean
    validation score. Tasks conflict in a merge (at T = 8 the best lambda can be near 0), and a task whose
    delta hurts the others can be turned down without turning all of them down. `pick` gets the merge with
    the scales found, and its validation record their table."""
    settings = recipe.validation
    assert settings.task_weight_grid is not None and pick.validation is not None  # validation data exists
    grid = [float(g) for g in settings.task_weight_grid]
    scales = dict.fromkeys(names, 1.0)
    best = start = max(pick.validation["mean_scores"])
    steps, task_scores = [], None
    total = settings.task_weight_sweeps * len(names) * len(grid)
    bar = tqdm(total=total * len(data), desc="task weights", disable=None if progress else True)
    with bar:
        for sweep in range(settings.task_weight_sweeps):
            changed = False
            for task in names:
                held = scales[task]  # the scale this task's turn starts from is already scored
                for scale in grid:
                    trial = scales | {task: scale}
                    if scale == held or not any(trial.values()):
                        bar.update(len(data))
                        continue
                    merged = merge_slots(recipe, cores, names, num_layers, pick.method, trial)
                    _, validation = _validate_lambda(
                        recipe, cores, names, merged, data, scorer, where, bar, [pick.lambda_]
                    )
                    score = validation["mean_scores"][0]
                    steps.append({"sweep": sweep, "task": task, "scale": scale, "score": score})
                    if score > best + 1e-12:
                        best, scales, changed, pick.merged = score, trial, True, merged
                        task_scores = {t: s[0] for t, s in validation["task_scores"].items()}
            if not changed:
                break
    record = {"grid": grid, "sweeps": settings.task_weight_sweeps, "scales": scales}
    record |= {"start_score": start, "score": best, "task_scores": task_scores, "steps": steps}
    pick.validation["task_weights"] = record


def _report(
    recipe: MergeRecipe,
    method: MergeMethod,
    recipe_path: Path | None,
    cores: merge_inputs.CoreSet,
    names: list[str],
    chosen_lambda: float,
    validation: dict[str, Any] | None,
    merged: MergedSlots,
    seconds: dict[str, float],
    folders: dict[str, str],
    num_layers: int,
) -> dict[str, Any]:
    shared = {key: recipe.parameters.get(key, default) for key, default in method.shared_parameters.items()}
    return {
        "method": method.name,
        "reference": method.reference,
        "recipe": str(recipe_path) if recipe_path else None,
        "source": cores.source,
        "base_model": cores.base_model,
        "tasks": names,
        "parameters": recipe.global_parameters()
        | {k: v for k, v in shared.items() if k not in recipe.parameters},
        "task_parameters": {
            name: {
                key: to_jsonable(_parameter(recipe, name, key))
                if _parameter(recipe, name, key) is not None
                else (1.0 if key == "weight" else method.defaults.get(key))
                for key in method.task_parameters
            }
            for name in names
        },
        "num_layers": num_layers,
        "lambda": chosen_lambda,
        "lambda_source": "validation"
        if validation
        else ("recipe" if "lambda" in recipe.parameters else "default"),
        "validation": validation,
        "output": recipe.output.model_dump() | {"folders": folders},
        "slots": merged.stats,
        "seconds": seconds,
        **({"basis": cores.notes["basis"]} if "basis" in cores.notes else {}),
    }


def merge(
    recipe: MergeRecipe | dict | str | Path,
    out: str | Path | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    device: str = "cpu",
) -> MergeResult | None:
    """Run a merge recipe (a YAML path, a dict of the same keys, or a MergeRecipe).

    Returns the output folder, the written model folders and the merge report. Under torchrun a merge from
    `adapters:` fits its basis on all ranks; rank 0 merges and writes, and the other ranks return None.
    """
    started = time.perf_counter()
    recipe_path = None
    if isinstance(recipe, dict):
        recipe = merge_recipe_from_dict(recipe)
    elif not isinstance(recipe, MergeRecipe):
        recipe_path = Path(recipe)
        recipe = parse_merge_recipe(recipe_path)
    where = str(recipe_path) if recipe_path else "recipe"
    target_raw = out if out is not None else recipe.output.path
    if target_raw is None:
        raise SubspaceError("no output folder: set `output.path` in the recipe or pass --out", recipe_path)
    target = Path(target_raw)
    check_output(target, overwrite, inputs=recipe.input_paths(recipe_path))
    data = {
        t.name: load_validation(t.validation, recipe.validation.max_examples)
        for t in recipe.tasks or []
        if t.validation
    }

    # ---- inputs (read and checked; nothing written yet) ----
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    base_ckpt = Checkpoint(recipe.base_model, allow_pickle=allow_pickle) if recipe.base_model else None
    ranks = parallel.current(check_device(device))
    if recipe.store:
        if not ranks.main:
            return None  # nothing to share out: rank 0 merges the stored cores alone
        wanted = [t.name for t in recipe.tasks] if recipe.tasks is not None else None
        cores = merge_inputs.from_store(recipe.store, wanted)
    else:
        sources = merge_inputs.load_adapters(recipe.adapters, recipe_path, allow_pickle)
        seconds["read"] = time.perf_counter() - clock
        clock = time.perf_counter()
        cores = merge_inputs.from_adapters(sources, recipe.subspace, base_ckpt, recipe.base_model, device)
        if not ranks.main:
            return None
        seconds["basis"] = time.perf_counter() - clock
        clock = time.perf_counter()
    names = _task_order(recipe, list(cores.tasks), where)
    outputs = _outputs(recipe, names, where)
    base_model = recipe.base_model or cores.base_model
    if recipe.output.format == "full":
        if base_model is None or not Path(base_model).is_dir():
            raise SubspaceError(
                "`full` output needs the base model folder: set `base_model:` in the recipe"
                + (f" ('{base_model}' is not a folder here)" if base_model else ""),
                where,
            )
        base_ckpt = base_ckpt or Checkpoint(base_model, allow_pickle=allow_pickle)
    fan_in_fan_out = {bool(cores.tasks[n].peft_config.get("fan_in_fan_out", False)) for n in names}
    if len(fan_in_fan_out) > 1:
        raise SubspaceError(
            "the tasks disagree on fan_in_fan_out; they cannot come from one base model", where
        )
    num_layers = _config_layers(base_model) or count_layers(cores.slots)
    _check_gradients(recipe, names, num_layers, where)
    seconds["load" if recipe.store else "project"] = time.perf_counter() - clock

    # ---- merge, and choose lambda (and for auto the method) on the validation data ----
    pick = _merge_and_choose(recipe, cores, names, num_layers, data, base_model, where, progress, seconds)
    merged, chosen = pick.merged, pick.lambda_

    # ---- write ----
    clock = time.perf_counter()
    dtype_name = recipe.output.dtype or cores.tasks[names[0]].dtype
    dtype = getattr(torch, dtype_name)
    folders: dict[str, str] = {}
    full_details: dict[str, Any] = {}
    with atomic_directory(target, overwrite=overwrite) as tmp:
        for label, head in tqdm(outputs, desc="write", disable=None if progress else True):
            single = label == "merged"
            folder = tmp if single else tmp / label
            extras = cores.tasks[head].extras if head else {}
            if recipe.output.format == "full":
                assert base_ckpt is not None
                full_details[label] = write_full_model(
                    folder,
                    base_ckpt,
                    _scaled(merged.factors, chosen, torch.float64),
                    extras,
                    next(iter(fan_in_fan_out), False),
                    parse_size(recipe.output.max_shard_size),
                )
            else:
                staging = tmp / f".{label}.adapter"
                write_lora_adapter(
                    staging,
                    _scaled(merged.factors, chosen, dtype),
                    extras,
                    _adapter_config(cores, head, names),
                )
                folder.mkdir(parents=True, exist_ok=True)
                for item in staging.iterdir():
                    shutil.move(str(item), str(folder / item.name))
                staging.rmdir()
            folders[label] = str(target if single else target / label)
        seconds["write"] = time.perf_counter() - clock
        seconds["total"] = time.perf_counter() - started
        report = _report(
            recipe,
            METHODS[pick.method],
            recipe_path,
            cores,
            names,
            chosen,
            pick.validation,
            merged,
            seconds,
            folders,
            num_layers,
        )
        if pick.auto is not None:
            report["auto"] = pick.auto
        if full_details:
            report["full"] = full_details
            for label in full_details:
                write_model_card(tmp if label == "merged" else tmp / label, report, label)
        (tmp / REPORT).write_bytes(json_bytes(_finite(report)))
    return MergeResult(out=target, folders={k: Path(v) for k, v in folders.items()}, report=report)


def _finite(obj: Any) -> Any:
    """JSON has no NaN/Inf; write them as strings so the report stays valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
