"""SubspaceStore: compress a zoo onto per-slot shared bases, add tasks, project, reconstruct, inspect, verify.

Shaped like scikit-learn's PCA: `compress` is fit, `project` is transform, `reconstruct` is inverse_transform
to a PEFT folder, `info()["slots"][m]["captured_energy"]` plays explained_variance_ratio_.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergekit_subspace.basis import captured_energy, fit_slot_basis
from mergekit_subspace.budget import allocate
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.io.checkpoint import Checkpoint
from mergekit_subspace.io.codec import ITEM_BYTES, extras_dtype, pack_cores
from mergekit_subspace.io.files import atomic_directory, sha256_bytes, tensors_to_bytes
from mergekit_subspace.io.peft import write_lora_adapter
from mergekit_subspace.io.store import (
    BASIS,
    FORMAT,
    MANIFEST,
    StoreFiles,
    basis_tensors,
    manifest_bytes,
    slot_layouts,
    task_file,
    task_tensors,
)
from mergekit_subspace.lowrank import COMPUTE_DTYPE, core_to_factors, stored_error_sq
from mergekit_subspace.recipe import (
    CompressRecipe,
    SubspaceSettings,
    check_task_name,
    expand_entries,
    parse_compress_recipe,
)
from mergekit_subspace.sources import (
    TaskSource,
    check_unique_names,
    finetune_task,
    lora_task,
    slot_shapes,
)

SPECTRUM_KEEP = 64  # leading squared singular values kept per slot for scree plots


def _encode_task(
    task: TaskSource,
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]],
    dtype: str,
    added: bool,
) -> tuple[bytes, dict[str, Any]]:
    """One task's file bytes and manifest entry; its errors are computed from the values as they will read back."""
    projected = {module: delta.project(*bases[module]) for module, delta in task.slots.items()}
    packed, readback = pack_cores(projected, {m: d.rank for m, d in task.slots.items()}, dtype)
    rho = {layout.module: layout.rho for layout in packed.layouts}
    slot_stats: dict[str, Any] = {}
    total_err = total_norm = 0.0
    for module, delta in sorted(task.slots.items()):
        U, V = bases[module]
        err_sq, norm_sq = stored_error_sq(delta, U, readback[module], V), delta.norm_sq()
        total_err += err_sq
        total_norm += norm_sq
        stats: dict[str, Any] = {
            "rank": delta.rank,
            "rho": rho[module],
            "norm": math.sqrt(norm_sq),
            "rel_error": 0.0 if norm_sq == 0 else math.sqrt(err_sq / norm_sq),
        }
        if module in task.alphas:
            stats["alpha"] = task.alphas[module]
        slot_stats[module] = stats
    keep_as = extras_dtype(dtype)
    extras = {
        key: value.to(keep_as) if keep_as is not None and value.is_floating_point() else value
        for key, value in task.extras.items()
    }
    data = tensors_to_bytes(task_tensors(packed, extras), metadata={"format": FORMAT})
    entry = {
        "kind": task.kind,
        "source": task.source,
        "source_sha256": task.source_sha256,
        "source_bytes": task.source_bytes,
        "file": task_file(task.name),
        "peft_config": task.peft_config,
        "dtype": task.dtype,
        "slots": slot_stats,
        "rel_error": 0.0 if total_norm == 0 else math.sqrt(total_err / total_norm),
        "extras": sorted(task.extras),
        "extra_dtypes": {key: str(value.dtype).removeprefix("torch.") for key, value in task.extras.items()},
        "added_after_fit": added,
        **task.notes,
    }
    return data, entry


def load_recipe_tasks(
    recipe: CompressRecipe,
    recipe_path: str | Path | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
) -> tuple[list[TaskSource], Checkpoint | None]:
    """Read and validate every task a recipe names; raises before anything is written."""
    base = Checkpoint(recipe.base_model, allow_pickle=allow_pickle) if recipe.base_model else None
    adapter_entries = expand_entries(recipe.adapters, recipe_path)
    finetune_entries = expand_entries(recipe.finetunes, recipe_path)
    if not adapter_entries and not finetune_entries:
        raise SubspaceError("the zoo is empty: list adapters and/or finetunes", recipe_path)
    for path, name, _ in adapter_entries + finetune_entries:
        check_task_name(name or path.resolve().name, recipe_path)
    tasks: list[TaskSource] = []
    for path, name, _ in tqdm(adapter_entries, desc="read adapters", disable=None if progress else True):
        tasks.append(lora_task(path, name, allow_pickle=allow_pickle))
    for path, name, extra in finetune_entries:
        assert base is not None  # the recipe model guarantees it
        tasks.append(finetune_task(path, base, extra["max_rank"], name, allow_pickle, progress))
    check_unique_names(tasks)
    return tasks, base


class SubspaceStore:
    """A compressed zoo on disk. Open one with SubspaceStore(path); make one with SubspaceStore.compress."""

    def __init__(self, path: str | Path) -> None:
        self.files = StoreFiles(path)
        self.path = self.files.root

    # ---- building -------------------------------------------------------------------------------------
    @classmethod
    def compress(
        cls,
        recipe: CompressRecipe | str | Path,
        out: str | Path | None = None,
        overwrite: bool = False,
        allow_pickle: bool = False,
        progress: bool = True,
    ) -> SubspaceStore:
        """Fit per-slot bases on every task of the recipe and write a new store atomically."""
        recipe_path = None
        if not isinstance(recipe, CompressRecipe):
            recipe_path = Path(recipe)
            recipe = parse_compress_recipe(recipe_path)
        target = out if out is not None else recipe.output
        if target is None:
            raise SubspaceError("no output store: set `output:` in the recipe or pass --out", recipe_path)
        target = Path(target)
        if target.exists() and not overwrite:
            raise SubspaceError("already exists; choose another path or pass --overwrite", target)
        tasks, base = load_recipe_tasks(recipe, recipe_path, allow_pickle, progress)
        return cls.from_tasks(
            tasks, recipe.subspace, target, base=base, overwrite=overwrite, progress=progress
        )

    @classmethod
    def from_tasks(
        cls,
        tasks: list[TaskSource],
        settings: SubspaceSettings,
        out: str | Path,
        base: Checkpoint | None = None,
        overwrite: bool = False,
        progress: bool = True,
    ) -> SubspaceStore:
        """Fit bases on already-loaded tasks (the Python entry point behind `compress`)."""
        if not tasks:
            raise SubspaceError("the zoo is empty: nothing to compress")
        check_unique_names(tasks)
        shapes = slot_shapes(tasks, base)
        slot_meta: dict[str, Any] = {}
        fitted: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        sizes = {}
        if settings.budget_bytes is not None:
            assert settings.k is not None
            by_slot = {m: [t.slots[m] for t in tasks if m in t.slots] for m in shapes}
            numbers = settings.budget_bytes // ITEM_BYTES[settings.dtype]
            try:
                sizes = allocate(by_slot, numbers, settings.k, settings.k_in, settings.normalize)
            except ValueError as exc:
                raise SubspaceError(
                    f"subspace.budget_bytes = {settings.budget_bytes:,} is too small: {exc}"
                ) from None
        for module in tqdm(sorted(shapes), desc="fit bases", disable=None if progress else True):
            members = [t for t in tasks if module in t.slots]
            deltas = [t.slots[module] for t in members]
            k_out, k_in = sizes.get(module, (settings.k, settings.k_in))
            basis = fit_slot_basis(
                deltas,
                k=k_out,
                energy=settings.energy,
                normalize=settings.normalize,
                refine=settings.refine,
                k_in=k_in,
            )
            fitted[module] = (basis.U, basis.V)
            total_out = float(basis.spectrum_out.sum()) or 1.0
            slot_meta[module] = {
                "shape": list(shapes[module]),
                "k_out": basis.k_out,
                "k_in": basis.k_in,
                "k_capped": basis.capped,
                "tasks": [t.name for t in members],
                "total_rank": sum(d.rank for d in deltas),
                "captured_energy": captured_energy(deltas, basis, settings.normalize),
                "spectrum_out": [float(x) / total_out for x in basis.spectrum_out[:SPECTRUM_KEEP]],
            }
        basis_file, stored_bases = basis_tensors(fitted, settings.dtype)
        basis_data = tensors_to_bytes(basis_file, metadata={"format": FORMAT})
        task_files: dict[str, bytes] = {}
        entries: dict[str, Any] = {}
        for task in tqdm(tasks, desc="project tasks", disable=None if progress else True):
            task_files[task.name], entries[task.name] = _encode_task(
                task, stored_bases, settings.dtype, added=False
            )
        manifest = {
            "format": FORMAT,
            "base_model": base.identity() if base is not None else None,
            "settings": settings.model_dump(),
            "slots": slot_meta,
            "tasks": entries,
            "files": {BASIS: sha256_bytes(basis_data)}
            | {task_file(name): sha256_bytes(data) for name, data in task_files.items()},
        }
        with atomic_directory(Path(out), overwrite=overwrite) as tmp:
            (tmp / BASIS).write_bytes(basis_data)
            (tmp / "tasks").mkdir()
            for name, data in task_files.items():
                (tmp / task_file(name)).write_bytes(data)
            (tmp / MANIFEST).write_bytes(manifest_bytes(manifest))
        return cls(out)

    # ---- reading --------------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        return self.files.manifest

    @property
    def tasks(self) -> list[str]:
        return sorted(self.manifest["tasks"])

    @property
    def slots(self) -> list[str]:
        return sorted(self.manifest["slots"])

    def basis(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) of one slot as stored."""
        return self.files.basis(module)

    def cores(self, name: str) -> dict[str, torch.Tensor]:
        """The per-slot cores C (k_out x k_in, float32) of a task, from the numbers as stored."""
        return self.files.task(name)[0]

    def stored_numbers(self) -> int:
        """How many numbers the bases and the cores hold on disk (heads and scales excluded): the payload
        that baselines are given at equal bytes."""
        total = sum(U.numel() + V.numel() for U, V in (self.basis(m) for m in self.slots))
        for entry in self.manifest["tasks"].values():
            total += sum(layout.numbers() for layout in slot_layouts(entry, self.manifest["slots"]))
        return total

    def extras(self, name: str) -> dict[str, torch.Tensor]:
        """The task's verbatim tensors (heads from modules_to_save, lora biases), under their PEFT keys."""
        return self.files.task(name)[1]

    def project(self, task: TaskSource | str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
        """Cores of an adapter on this store's bases, without writing anything."""
        source = task if isinstance(task, TaskSource) else lora_task(task, allow_pickle=allow_pickle)
        bases = self._bases_for(source)
        return {module: delta.project(*bases[module]) for module, delta in source.slots.items()}

    def _bases_for(self, source: TaskSource) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        missing = sorted(set(source.slots) - set(self.manifest["slots"]))
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise SubspaceError(
                f"targets {len(missing)} module(s) the store has no basis for ({shown}); recompress with this "
                "adapter in the recipe",
                source.source,
            )
        for module, delta in source.slots.items():
            expected = tuple(self.manifest["slots"][module]["shape"])
            if delta.shape != expected:
                raise SubspaceError(
                    f"shapes do not fit the store: module '{module}' is {delta.shape}, the store's slot is {expected}",
                    source.source,
                )
        return {module: self.basis(module) for module in source.slots}

    # ---- changing -------------------------------------------------------------------------------------
    def add(
        self, adapter: str | Path | TaskSource, name: str | None = None, allow_pickle: bool = False
    ) -> dict:
        """Project one more adapter onto the existing bases; writes its small task file, then the manifest.

        Returns the task's manifest entry with its name (rel_error tells how much the basis could not hold).
        """
        source = (
            adapter
            if isinstance(adapter, TaskSource)
            else lora_task(adapter, name, allow_pickle=allow_pickle)
        )
        check_unique_names([source], taken=set(self.manifest["tasks"]))
        bases = self._bases_for(source)
        data, entry = _encode_task(source, bases, self.manifest["settings"]["dtype"], added=True)
        manifest = copy.deepcopy(self.manifest)
        manifest["tasks"][source.name] = entry
        manifest["files"][task_file(source.name)] = sha256_bytes(data)
        self.files.write_task_and_manifest(source.name, data, manifest)
        return {"name": source.name, **entry}

    # ---- reconstructing -------------------------------------------------------------------------------
    def task_factors(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-slot PEFT factors (B, A) of a task, scale folded in, float64; rank = min(source rank, k)."""
        entry = self._entry(name)
        stored, _ = self.files.task_stored(name)
        factors = {}
        for module, matrices in sorted(stored.items()):
            U, V = (t.to(COMPUTE_DTYPE) for t in self.basis(module))
            if len(matrices) == 2:
                P, Q = (t.to(COMPUTE_DTYPE) for t in matrices)
                factors[module] = (U @ P, Q @ V.T)
                continue
            core = matrices[0]
            rank = min(int(entry["slots"][module]["rank"]), core.shape[0], core.shape[1])
            factors[module] = core_to_factors(U, core, V, rank)
        return factors

    def reconstruct(self, name: str, out: str | Path, overwrite: bool = False) -> Path:
        """Write task `name` as a standard PEFT LoRA folder that PeftModel.from_pretrained loads."""
        entry = self._entry(name)
        dtype = getattr(torch, entry["dtype"])
        factors = {m: (B.to(dtype), A.to(dtype)) for m, (B, A) in self.task_factors(name).items()}
        return write_lora_adapter(out, factors, self.extras(name), entry["peft_config"], overwrite=overwrite)

    def _entry(self, name: str) -> dict[str, Any]:
        entry = self.manifest["tasks"].get(name)
        if entry is None:
            known = ", ".join(self.tasks) or "none"
            raise SubspaceError(f"has no task '{name}' (known: {known})", self.path)
        return entry

    # ---- inspecting -----------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Tasks, slots, k per slot, bytes and errors, as plain JSON-able data."""
        store_bytes = self.files.bytes_on_disk()
        source_bytes = sum(int(e["source_bytes"]) for e in self.manifest["tasks"].values())
        basis_bytes = (self.path / BASIS).stat().st_size
        per_task = {}
        for name, entry in sorted(self.manifest["tasks"].items()):
            per_task[name] = {
                "rel_error": entry["rel_error"],
                "kind": entry["kind"],
                "slots": len(entry["slots"]),
                "bytes": (self.path / entry["file"]).stat().st_size,
                "source_bytes": entry["source_bytes"],
                "added_after_fit": entry["added_after_fit"],
            }
            if "energy_dropped" in entry:
                per_task[name]["energy_dropped"] = entry["energy_dropped"]
        slots = {
            module: {
                key: meta[key]
                for key in ("shape", "k_out", "k_in", "k_capped", "total_rank", "captured_energy")
            }
            | {"tasks": len(meta["tasks"])}
            for module, meta in sorted(self.manifest["slots"].items())
        }
        return {
            "store": str(self.path),
            "format": self.manifest["format"],
            "settings": self.manifest["settings"],
            "base_model": self.manifest["base_model"],
            "tasks": self.tasks,
            "slots": slots,
            "bytes": {"store": store_bytes, "sources": source_bytes, "basis": basis_bytes},
            "ratio": source_bytes / store_bytes if store_bytes else math.inf,
            "per_task": per_task,
        }

    def verify(self) -> list[str]:
        """Problems found by re-hashing every file; an empty list means the store is intact."""
        return self.files.verify()


__all__ = ["SubspaceStore", "load_recipe_tasks"]
