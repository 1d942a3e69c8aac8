"""The merge's input: per-slot bases and every task's cores, from a store or fitted on adapter folders.

Both sources end up as the same in-memory CoreSet, so the methods never know where the cores came from.
From `adapters:` the basis is fitted on exactly those adapters (by default with k = the slot's total rank,
which holds every adapter exactly), in float64, without writing a store, by the same SubspaceBasis fit
that compress uses (so `budget_bytes`, `energy` and the solver settings mean the same there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_subspace.clusters import orthonormal_union
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.fit import SubspaceBasis
from mergekit_subspace.io.checkpoint import Checkpoint
from mergekit_subspace.lowrank import COMPUTE_DTYPE
from mergekit_subspace.recipe import SubspaceSettings, check_task_name, expand_entries
from mergekit_subspace.sources import TaskSource, check_unique_names, lora_task
from mergekit_subspace.subspace import SubspaceStore

EXACT_K = 1_000_000  # capped per slot at its total rank, i.e. exact


@dataclass
class TaskInputs:
    """What the merge needs of one task besides its cores."""

    name: str
    peft_config: dict[str, Any]
    extras: dict[str, torch.Tensor]
    dtype: str


@dataclass
class CoreSet:
    """Per-slot (U, V), slot shapes (out, in), and per task {module: core} (absent module = zero delta)."""

    bases: dict[str, tuple[torch.Tensor, torch.Tensor]]
    shapes: dict[str, tuple[int, int]]
    cores: dict[str, dict[str, torch.Tensor]]
    tasks: dict[str, TaskInputs]
    base_model: str | None
    source: str
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def slots(self) -> list[str]:
        return sorted(self.bases)

    def core(self, task: str, module: str) -> torch.Tensor:
        found = self.cores[task].get(module)
        if found is not None:
            return found.to(COMPUTE_DTYPE)
        U, V = self.bases[module]
        return torch.zeros(U.shape[1], V.shape[1], dtype=COMPUTE_DTYPE)


def from_store(path: str | Path, names: list[str] | None) -> CoreSet:
    """Cores as stored; only the tasks the recipe names are read."""
    store = SubspaceStore(path)
    known = set(store.tasks)
    wanted = names if names is not None else store.tasks
    missing = [n for n in wanted if n not in known]
    if missing:
        raise SubspaceError(
            f"has no task '{missing[0]}' (known: {', '.join(store.tasks) or 'none'})", store.path
        )
    manifest = store.manifest
    tasks = {}
    cores = {}
    for name in wanted:
        entry = manifest["tasks"][name]
        cores[name], extras = store.files.task(name)  # one read of the task file for both
        tasks[name] = TaskInputs(name, dict(entry["peft_config"]), extras, entry["dtype"])
    used = sorted({m for c in cores.values() for m in c})
    bases = {m: tuple(t.to(COMPUTE_DTYPE) for t in store.basis(m)) for m in used}
    for m in used:
        if manifest["slots"][m].get("clusters"):  # clusters' bases side by side overlap: orthonormalize
            holders = [name for name in wanted if m in cores[name]]
            U, V, moved = orthonormal_union(*bases[m], [cores[name][m] for name in holders])
            bases[m] = (U, V)
            for name, core in zip(holders, moved, strict=True):
                cores[name][m] = core
    shapes = {m: tuple(manifest["slots"][m]["shape"]) for m in used}
    base = manifest.get("base_model") or {}
    return CoreSet(
        bases=bases,  # type: ignore[arg-type]
        shapes=shapes,  # type: ignore[arg-type]
        cores=cores,
        tasks=tasks,
        base_model=base.get("path"),
        source=str(store.path),
    )


def _check_same_base(sources: list[TaskSource], recipe_base: str | None) -> None:
    """Adapters of different base models cannot be merged; the recipe's base_model settles path aliases."""
    if recipe_base:
        return
    bases = {}
    for task in sources:
        name = task.peft_config.get("base_model_name_or_path")
        if name:
            bases.setdefault(str(name), task.source)
    if len(bases) > 1:
        (first, first_src), (second, second_src) = list(bases.items())[:2]
        raise SubspaceError(
            f"adapters of different base models: {first_src} was trained on '{first}', {second_src} on "
            f"'{second}'. If both are the same model at different paths, set `base_model:` in the recipe"
        )


def load_adapters(
    entries: list, recipe_path: str | Path | None, allow_pickle: bool = False
) -> list[TaskSource]:
    sources = []
    for path, name, _ in expand_entries(entries, recipe_path):
        check_task_name(name or path.resolve().name, recipe_path)
        sources.append(lora_task(path, name, allow_pickle=allow_pickle))
    check_unique_names(sources)
    return sources


def from_adapters(
    sources: list[TaskSource],
    settings: SubspaceSettings | None,
    base: Checkpoint | None,
    recipe_base: str | None,
    device: str = "cpu",
) -> CoreSet:
    """Fit a basis on exactly these adapters and project them, slot by slot, without writing a store.

    Under torchrun the slots are shared out over the ranks; the CoreSet is complete on rank 0 only."""
    _check_same_base(sources, recipe_base)
    settings = settings or SubspaceSettings(k=EXACT_K)
    fitted = SubspaceBasis(settings, device=device)
    cores = fitted.fit_transform(sources, base=base)
    bases = {m: (U.to(COMPUTE_DTYPE), V.to(COMPUTE_DTYPE)) for m, (U, V) in fitted.bases_.items()}
    first_base = next((t.peft_config.get("base_model_name_or_path") for t in sources), None)
    return CoreSet(
        bases=bases,
        shapes=fitted.shapes_,
        cores=cores,
        tasks={t.name: TaskInputs(t.name, dict(t.peft_config), t.extras, t.dtype) for t in sources},
        base_model=recipe_base or (str(first_base) if first_base else None),
        source="adapters",
        notes={"basis": settings.model_dump()},
    )
