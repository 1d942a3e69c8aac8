"""SubspaceStore: compress a zoo onto per-slot shared bases, add tasks, project, reconstruct, inspect, verify.

Shaped like scikit-learn's PCA: `compress` is fit, `project` is transform, `reconstruct` is inverse_transform
to a PEFT folder, `info()["slots"][m]["captured_energy"]` plays explained_variance_ratio_.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergekit_subspace import parallel
from mergekit_subspace.add_policy import DEFAULT_MAX_REL_ERROR, GROW_MARGIN, check_policy
from mergekit_subspace.basis import SlotBasis
from mergekit_subspace.clusters import is_clustered
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.fit import SlotDeltas, SubspaceBasis, check_device
from mergekit_subspace.grow import SlotGrowth, plan_growth, slot_growth
from mergekit_subspace.io.checkpoint import Checkpoint
from mergekit_subspace.io.codec import (
    ITEM_BYTES,
    EncodedCore,
    SlotLayout,
    StoreDtypes,
    assemble_cores,
    encode_core,
    encode_extra,
    store_dtypes,
)
from mergekit_subspace.io.files import atomic_directory, check_output, sha256_bytes, tensors_to_bytes
from mergekit_subspace.io.peft import label_config, read_labels, write_lora_adapter
from mergekit_subspace.io.store import (
    BASIS,
    FORMAT,
    MANIFEST,
    StoreFiles,
    append_basis_columns,
    basis_file,
    basis_tensors,
    manifest_bytes,
    next_basis_file,
    slot_layouts,
    task_file,
    task_tensors,
)
from mergekit_subspace.lowrank import COMPUTE_DTYPE, LowRankDelta, SlotProjector, core_to_factors
from mergekit_subspace.recipe import (
    CompressRecipe,
    SubspaceSettings,
    check_task_name,
    expand_entries,
    parse_compress_recipe,
    settings_record,
)
from mergekit_subspace.sources import TaskSource, check_unique_names, finetune_task, lora_task

SPECTRUM_KEEP = 64  # leading squared singular values kept per slot for scree plots


@dataclass
class EncodedSlot:
    """One task's slot as the store keeps it: the encoded core and its statistics (errors as read back)."""

    core: EncodedCore
    stats: dict[str, Any]
    err_sq: float
    norm_sq: float


def encode_slot(
    task: TaskSource, module: str, delta: LowRankDelta, bases: SlotProjector, core_dtype: str
) -> EncodedSlot:
    """Project one slot of a task onto the stored bases and encode its core in `core_dtype`; errors as the
    core reads back."""
    projected = bases.project(delta)
    encoded, readback = encode_core(module, bases.best_core(projected).cpu(), delta.rank, core_dtype)
    norm_sq = delta.norm_sq()
    err_sq = bases.error_sq(norm_sq, projected, readback.to(projected.device))
    stats: dict[str, Any] = {
        "rank": delta.rank,
        "rho": encoded.layout.rho,
        "norm": math.sqrt(norm_sq),
        "rel_error": 0.0 if norm_sq == 0 else math.sqrt(err_sq / norm_sq),
    }
    if module in task.alphas:
        stats["alpha"] = task.alphas[module]
    return EncodedSlot(encoded, stats, err_sq, norm_sq)


@dataclass
class SlotCores:
    """One slot's encoded cores for every task that touches it, packed into a few tensors.

    A zoo of thousands would otherwise hold one small Python object per task and slot until the store is
    written (measured: about 2.4 KB each, 77 MB for 1,000 tasks x 32 slots); packed it is the numbers alone.
    """

    module: str
    k_out: int
    k_in: int
    index: dict[str, int]
    flat: torch.Tensor  # every task's stored numbers, in task order
    scales: torch.Tensor  # every task's int8 scales (empty for float stores)
    starts: torch.Tensor  # per task: first number, first scale
    ranks: torch.Tensor  # per task: rank, rho
    stats: torch.Tensor  # per task: err_sq, norm_sq, norm, rel_error, alpha (NaN: none)

    @classmethod
    def pack(cls, module: str, slots: list[tuple[str, EncodedSlot]]) -> SlotCores:
        layout = slots[0][1].core.layout
        pieces = [piece for _, slot in slots for piece in slot.core.pieces]
        numbers = torch.tensor([sum(p.numel() for p in slot.core.pieces) for _, slot in slots])
        scale_counts = torch.tensor([len(slot.core.scales) for _, slot in slots])
        zero = torch.zeros(1, dtype=torch.int64)
        return cls(
            module=module,
            k_out=layout.k_out,
            k_in=layout.k_in,
            index={name: i for i, (name, _) in enumerate(slots)},
            flat=torch.cat(pieces),
            scales=torch.tensor([x for _, slot in slots for x in slot.core.scales], dtype=torch.float32),
            starts=torch.stack(
                [torch.cat([zero, numbers.cumsum(0)]), torch.cat([zero, scale_counts.cumsum(0)])]
            ),
            ranks=torch.tensor([[slot.stats["rank"], slot.stats["rho"]] for _, slot in slots]),
            stats=torch.tensor(
                [
                    [slot.err_sq, slot.norm_sq, slot.stats["norm"], slot.stats["rel_error"]]
                    + [slot.stats.get("alpha", math.nan)]
                    for _, slot in slots
                ],
                dtype=torch.float64,
            ),
        )

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def get(self, name: str) -> EncodedSlot:
        i = self.index[name]
        rank, rho = (int(x) for x in self.ranks[i])
        layout = SlotLayout(self.module, self.k_out, self.k_in, rho)
        begin, scale_begin = int(self.starts[0, i]), int(self.starts[1, i])
        pieces = []
        for rows, cols in layout.shapes():
            pieces.append(self.flat[begin : begin + rows * cols])
            begin += rows * cols
        scales = [float(x) for x in self.scales[scale_begin : int(self.starts[1, i + 1])]]
        err_sq, norm_sq, norm, rel_error, alpha = (float(x) for x in self.stats[i])
        stats: dict[str, Any] = {"rank": rank, "rho": rho, "norm": norm, "rel_error": rel_error}
        if not math.isnan(alpha):
            stats["alpha"] = alpha
        return EncodedSlot(EncodedCore(pieces, scales, layout), stats, err_sq, norm_sq)


def _task_file_and_entry(
    task: TaskSource, slots: dict[str, EncodedSlot], dtypes: StoreDtypes, added: bool
) -> tuple[bytes, dict[str, Any]]:
    """One task's file bytes and manifest entry, from its encoded slots (cores in `dtypes.cores`, heads as
    `dtypes.basis` keeps them); its heads are read here, once."""
    packed = assemble_cores([slots[m].core for m in sorted(slots)], dtypes.cores)
    total_err = total_norm = 0.0
    for module in sorted(slots):
        total_err += slots[module].err_sq
        total_norm += slots[module].norm_sq
    raw = dict(task.extras.items())
    encoded = {key: encode_extra(value, dtypes.basis) for key, value in raw.items()}
    extras = {key: stored for key, (stored, _) in encoded.items()}
    row_scales = {key: scales for key, (_, scales) in encoded.items() if scales is not None}
    data = tensors_to_bytes(task_tensors(packed, extras, row_scales), metadata={"format": FORMAT})
    entry = {
        "kind": task.kind,
        "source": task.source,
        "source_sha256": task.source_sha256,
        "source_bytes": task.source_bytes,
        "file": task_file(task.name),
        "peft_config": task.peft_config,
        "dtype": task.dtype,
        "slots": {m: slots[m].stats for m in sorted(slots)},
        "rel_error": 0.0 if total_norm == 0 else math.sqrt(total_err / total_norm),
        "extras": sorted(raw),
        "extra_dtypes": {key: str(value.dtype).removeprefix("torch.") for key, value in raw.items()},
        "added_after_fit": added,
        **task.notes,
    }
    labels = read_labels(task.source) if Path(task.source).is_dir() else None  # id2label of a classifier
    if labels is not None:
        entry["labels"] = labels
    return data, entry


def _hash_sources(tasks: list[TaskSource], ranks: parallel.Ranks, progress: bool) -> None:
    """Every task's source sha256, the hashing shared out over the ranks (it reads every byte once)."""
    by_name = {t.name: t for t in tasks}
    digests = parallel.map_shared(
        ranks,
        list(by_name),
        {t.name: float(t.source_bytes) for t in tasks},
        lambda name: by_name[name].source_sha256,
        "hash sources",
        progress,
    )
    for name, digest in digests.items():
        by_name[name]._sha256 = digest


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


def calibration_inputs(
    tasks: list[TaskSource], settings: SubspaceSettings, base: Checkpoint | None, device: str, progress: bool
) -> dict[str, torch.Tensor]:
    """The calibration rows of every slot the zoo adapts, from the base model run over the recipe's texts."""
    from mergekit_subspace import calibration

    assert settings.calibration is not None
    folder = calibration.base_folder(tasks, str(base.folder) if base is not None else None)
    modules = {m for t in tasks for m in t.shapes}
    return calibration.capture_inputs(
        settings.calibration, folder, calibration.model_kind(tasks), modules, device, progress
    )


def _total_rel_error(slots: dict[str, EncodedSlot]) -> float:
    """A task's relative error over all its slots, from the slots' errors as stored."""
    err = sum(slot.err_sq for slot in slots.values())
    norm = sum(slot.norm_sq for slot in slots.values())
    return 0.0 if norm == 0 else math.sqrt(err / norm)


def _record_growth(
    manifest: dict[str, Any], grown: dict[str, tuple[int, int]], basis: tuple[str, bytes] | None
) -> None:
    """Widen the grown slots in the manifest; the tasks already there keep the width they were encoded on."""
    for module, (a, b) in grown.items():
        meta = manifest["slots"][module]
        for name in meta["tasks"]:
            stats = manifest["tasks"][name]["slots"][module]
            stats.setdefault("k_out", meta["k_out"])
            stats.setdefault("k_in", meta["k_in"])
        meta["k_out"] += a
        meta["k_in"] += b
        meta["grown"] = [meta.get("grown", [0, 0])[0] + a, meta.get("grown", [0, 0])[1] + b]
    if basis is not None:
        old = basis_file(manifest)
        manifest["files"].pop(old)
        manifest["basis_file"] = basis[0]
        manifest["files"][basis[0]] = sha256_bytes(basis[1])


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
        device: str = "cpu",
    ) -> SubspaceStore:
        """Fit per-slot bases on every task of the recipe and write a new store atomically."""
        recipe_path = None
        if not isinstance(recipe, CompressRecipe):
            recipe_path = Path(recipe)
            recipe = parse_compress_recipe(recipe_path)
        target = out if out is not None else recipe.output
        if target is None:
            raise SubspaceError("no output store: set `output:` in the recipe or pass --out", recipe_path)
        target = check_output(target, overwrite)
        tasks, base = load_recipe_tasks(recipe, recipe_path, allow_pickle, progress)
        check_output(target, overwrite, inputs=[recipe.base_model, *(t.source for t in tasks)])
        from mergekit_subspace.target import check_target, naming

        with naming(recipe_path):  # a target that cannot be met names the recipe
            check_target(tasks, recipe.subspace, base)
            settings = recipe.subspace
            return cls.from_tasks(
                tasks, settings, target, base=base, overwrite=overwrite, progress=progress, device=device
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
        device: str = "cpu",
        base_identity: dict[str, Any] | None = None,
        sizes: dict[str, tuple[int, int]] | None = None,
        inputs: dict[str, torch.Tensor] | None = None,
    ) -> SubspaceStore:
        """Fit bases on already-loaded tasks (the Python entry point behind `compress`), slot by slot; under
        torchrun every rank fits its share of the slots and rank 0 writes the store. `sizes` fixes (k_out,
        k_in) per slot; a `settings.target` without them is resolved first (mergekit_subspace.target).
        `inputs` are the calibration rows per slot (captured here when the settings ask and none are given)."""
        if not tasks:
            raise SubspaceError("the zoo is empty: nothing to compress")
        out = Path(out)
        if out.exists() and not overwrite:
            raise SubspaceError("already exists; choose another path or pass --overwrite", out)
        if settings.calibration is not None and inputs is None and sizes is None:
            inputs = calibration_inputs(tasks, settings, base, device, progress)
        if settings.target is not None and sizes is None:
            from mergekit_subspace.target import compress_to_target

            return compress_to_target(
                cls,
                tasks,
                settings,
                out,
                base,
                overwrite,
                progress,
                device,
                base_identity=base_identity,
                inputs=inputs,
            )
        if settings.clusters is not None:
            from mergekit_subspace.clusters import check_clusters, compress_clustered

            if isinstance(settings.clusters, int):
                check_clusters(settings.clusters, tasks)
            return compress_clustered(
                cls, tasks, settings, out, base, overwrite, progress, device, base_identity
            )
        dtypes = store_dtypes(settings)
        fitted = SubspaceBasis(settings, sizes=sizes, device=device, progress=progress, inputs=inputs)

        def encode(module: str, basis: SlotBasis, slot: SlotDeltas) -> tuple[dict, SlotCores]:
            file_tensors, readback = basis_tensors({module: (basis.U.cpu(), basis.V.cpu())}, dtypes.basis)
            bases = SlotProjector(*(t.to(slot.device) for t in readback[module]))
            encoded = [
                (t.name, encode_slot(t, module, delta, bases, dtypes.cores)) for t, delta in slot.with_tasks()
            ]
            return file_tensors, SlotCores.pack(module, encoded)

        per_slot = fitted.fit_slots(tasks, visit=encode, base=base)
        ranks = fitted.ranks_
        _hash_sources(tasks, ranks, progress)
        if ranks.main:
            identity = base.identity() if base is not None else base_identity
            cls._write(Path(out), tasks, fitted, per_slot, settings, identity, overwrite, progress)
        ranks.barrier()
        return cls(out)

    @staticmethod
    def _write(
        out: Path,
        tasks: list[TaskSource],
        fitted: SubspaceBasis,
        per_slot: dict[str, tuple[dict, SlotCores]],
        settings: SubspaceSettings,
        base_identity: dict[str, Any] | None,
        overwrite: bool,
        progress: bool,
        slot_notes: dict[str, dict[str, Any]] | None = None,
        task_notes: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Write basis, task files (one at a time, heads read as each is written) and the manifest last.
        `slot_notes` and `task_notes` add fields to slots' and tasks' manifest entries (a clustered store's
        column ranges and each task's cluster)."""
        slot_meta: dict[str, Any] = {}
        basis_file: dict[str, torch.Tensor] = {}
        for module, (file_tensors, _) in per_slot.items():
            basis_file.update(file_tensors)
            total_out = fitted.spectrum_total_[module] or 1.0
            k_out, k_in = fitted.k_[module]
            slot_meta[module] = {
                "shape": list(fitted.shapes_[module]),
                "k_out": k_out,
                "k_in": k_in,
                "k_capped": fitted.capped_[module],
                "tasks": fitted.members_[module],
                "total_rank": sum(t.ranks[module] for t in tasks if module in t.shapes),
                "captured_energy": fitted.captured_energy_[module],
                "spectrum_out": [float(x) / total_out for x in fitted.spectrum_[module][:SPECTRUM_KEEP]],
            }
            if fitted.solver_[module] != "exact":
                slot_meta[module]["solver"] = fitted.solver_[module]
            if module in getattr(fitted, "transfer_weights_", {}):  # pulled toward transfer_from's basis
                slot_meta[module]["transfer_weight"] = fitted.transfer_weights_[module]
            slot_meta[module].update((slot_notes or {}).get(module, {}))
        basis_data = tensors_to_bytes(basis_file, metadata={"format": FORMAT})
        entries: dict[str, Any] = {}
        hashes = {BASIS: sha256_bytes(basis_data)}
        with atomic_directory(out, overwrite=overwrite) as tmp:
            (tmp / BASIS).write_bytes(basis_data)
            (tmp / "tasks").mkdir()
            for task in tqdm(tasks, desc="write tasks", disable=None if progress else True, leave=False):
                slots = {m: cores.get(task.name) for m, (_, cores) in per_slot.items() if task.name in cores}
                data, entries[task.name] = _task_file_and_entry(
                    task, slots, store_dtypes(settings), added=False
                )
                entries[task.name].update((task_notes or {}).get(task.name, {}))
                (tmp / task_file(task.name)).write_bytes(data)
                hashes[task_file(task.name)] = sha256_bytes(data)
            manifest = {
                "format": FORMAT,
                "base_model": base_identity,
                "settings": settings_record(settings),
                "slots": slot_meta,
                "tasks": entries,
                "files": hashes,
            }
            (tmp / MANIFEST).write_bytes(manifest_bytes(manifest))

    @staticmethod
    def added_tasks(path: str | Path) -> list[str]:
        """Tasks added after the fit of the store at `path` ([] when there is no readable store there): what
        a `compress --overwrite` of it drops unless its recipe names them."""
        try:
            manifest = StoreFiles(path).manifest
        except SubspaceError:
            return []
        return sorted(name for name, entry in manifest["tasks"].items() if entry.get("added_after_fit"))

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
        return sum(self._numbers())

    def payload_bytes(self) -> int:
        """Bytes of those numbers, bases and cores each at its dtype's width (int4 counting group scales)."""
        dtypes = store_dtypes(self.manifest["settings"])
        basis, cores = self._numbers()
        return math.ceil(basis * ITEM_BYTES[dtypes.basis] + cores * ITEM_BYTES[dtypes.cores])

    def _numbers(self) -> tuple[int, int]:
        """(basis, core) numbers on disk."""
        basis = sum(U.numel() + V.numel() for U, V in (self.basis(m) for m in self.slots))
        cores = sum(
            layout.numbers()
            for entry in self.manifest["tasks"].values()
            for layout in slot_layouts(entry, self.manifest["slots"])
        )
        return basis, cores

    def extras(self, name: str) -> dict[str, torch.Tensor]:
        """The task's verbatim tensors (heads from modules_to_save, lora biases), under their PEFT keys."""
        return self.files.task(name)[1]

    def fitted(self) -> SubspaceBasis:
        """The store's bases as a fitted SubspaceBasis (values as stored), for transform and score."""
        shapes = {m: tuple(meta["shape"]) for m, meta in self.manifest["slots"].items()}
        bases = {m: self.basis(m) for m in self.slots}
        return SubspaceBasis.from_bases(bases, shapes)  # type: ignore[arg-type]

    def project(self, task: TaskSource | str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
        """Cores of an adapter on this store's bases, without writing anything."""
        source = task if isinstance(task, TaskSource) else lora_task(task, allow_pickle=allow_pickle)
        return self.fitted().transform(source)

    # ---- changing -------------------------------------------------------------------------------------
    def add(
        self,
        adapter: str | Path | TaskSource,
        name: str | None = None,
        allow_pickle: bool = False,
        device: str = "cpu",
        policy: str = "auto",
        max_rel_error: float = DEFAULT_MAX_REL_ERROR,
    ) -> dict:
        """Add one more adapter; writes its small task file (and a grown basis), then the manifest.

        `policy`: "project" stores the task's coefficients on the bases as they are; "grow" appends the
        directions the bases miss (at most the task's rank per slot, chosen by captured energy per byte) until
        its relative error is at most half of `max_rel_error`; "auto" projects when the projection's error is
        at most `max_rel_error` and grows otherwise. A task that would be stored with an error above
        `max_rel_error` is refused, and nothing is written. Older tasks' cores stay valid: they read as zero
        on the added directions.

        Returns the task's manifest entry with its name, `action` ("projected" or "grew"),
        `projected_rel_error` and `grown` (new directions per slot). Under torchrun the slots are shared out
        over the ranks and rank 0 writes.
        """
        check_policy(policy, max_rel_error)
        source = (
            adapter
            if isinstance(adapter, TaskSource)
            else lora_task(adapter, name, allow_pickle=allow_pickle)
        )
        check_unique_names([source], taken=set(self.manifest["tasks"]))
        device = check_device(device)
        self._check_fits(source)
        dtypes = store_dtypes(self.manifest["settings"])
        ranks = parallel.current(device)
        modules = sorted(source.shapes)
        costs = {m: float(sum(source.shapes[m]) * source.ranks[m]) for m in modules}

        def on_device(module: str) -> LowRankDelta:
            delta = source.slots[module]
            if device != "cpu":
                delta = LowRankDelta(B=delta.B.to(device), A=delta.A.to(device), scale=delta.scale)
            return delta

        def encode(module: str) -> EncodedSlot:
            bases = SlotProjector(*(t.to(device) for t in self.basis(module)))
            return encode_slot(source, module, on_device(module), bases, dtypes.cores)

        if is_clustered(self.manifest):  # clustered adds, alone or in a batch, take add-many's one path
            if ranks.world > 1:
                raise SubspaceError(
                    "a clustered store takes new tasks in one process; run add without torchrun"
                )
            from mergekit_subspace.manage import add_many

            (entry,) = add_many(
                self, [source], device=device, progress=False, max_rel_error=max_rel_error, policy=policy
            )
            return entry
        slots = parallel.map_shared(ranks, modules, costs, encode, "project", progress=False, everywhere=True)
        projected_error = _total_rel_error(slots)
        grown: dict[str, tuple[int, int]] = {}
        basis_data = None
        wants_growth = policy == "grow" or (policy == "auto" and projected_error > max_rel_error)
        if wants_growth:
            grown, grown_slots, basis_data = self._grow(source, ranks, costs, max_rel_error, on_device)
            slots.update(grown_slots)
        stored_error = _total_rel_error(slots)
        if stored_error > max_rel_error:
            how = "even with its basis grown" if grown else "projected on the bases as they are"
            hint = "" if grown or policy == "grow" else "; use --policy auto or grow"
            raise SubspaceError(
                f"would be stored with relative error {stored_error:.3f} ({how}), above max_rel_error "
                f"{max_rel_error:g}{hint}, or raise --max-rel-error; nothing was written",
                source.source,
            )
        if ranks.main:
            data, entry = _task_file_and_entry(source, slots, dtypes, added=True)
            manifest = copy.deepcopy(self.manifest)
            if grown:
                entry["grown_from_rel_error"] = projected_error
                _record_growth(manifest, grown, basis_data)
            manifest["tasks"][source.name] = entry
            manifest["files"][task_file(source.name)] = sha256_bytes(data)
            self.files.write_task_and_manifest(
                source.name, data, manifest, basis=None if basis_data is None else basis_data[1]
            )
        ranks.barrier()
        if not ranks.main:
            self.files = StoreFiles(self.path)
        action = "grew" if grown else "projected"
        return {
            "name": source.name,
            **self.manifest["tasks"][source.name],
            "action": action,
            "projected_rel_error": projected_error,
            "grown": grown,
        }

    def _grow(
        self,
        source: TaskSource,
        ranks: parallel.Ranks,
        costs: dict[str, float],
        max_rel_error: float,
        on_device: Any,
    ) -> tuple[dict[str, tuple[int, int]], dict[str, EncodedSlot], tuple[str, bytes]]:
        """Directions to append per slot for `source`, its slots encoded on the grown bases, and the new
        basis file (its name and bytes)."""
        dtypes = store_dtypes(self.manifest["settings"])
        modules = sorted(source.shapes)

        def candidates(module: str) -> SlotGrowth:
            U, V = (t.to(on_device(module).B.device) for t in self.basis(module))
            growth = slot_growth(module, U, V, on_device(module))
            growth.X, growth.Y, growth.energy = growth.X.cpu(), growth.Y.cpu(), growth.energy.cpu()
            return growth

        growths = parallel.map_shared(
            ranks, modules, costs, candidates, "grow", progress=False, everywhere=True
        )
        plan = plan_growth(growths, GROW_MARGIN * max_rel_error, ITEM_BYTES.get(dtypes.basis, 4))
        grown = {m: ab for m, ab in plan.items() if ab != (0, 0)}
        stored = dict(self.files.basis_tensors())
        new_bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for module, (a, b) in sorted(grown.items()):
            X, Y = growths[module].X[:, :a], growths[module].Y[:, :b]
            stored, readback = append_basis_columns(stored, module, X, Y, dtypes.basis, self.files.root)
            new_bases[module] = readback

        def encode(module: str) -> EncodedSlot:
            bases = SlotProjector(*(t.to(on_device(module).B.device) for t in new_bases[module]))
            return encode_slot(source, module, on_device(module), bases, dtypes.cores)

        encoded = parallel.map_shared(
            ranks, sorted(grown), costs, encode, "encode", progress=False, everywhere=True
        )
        data = tensors_to_bytes(stored, metadata={"format": FORMAT})
        return grown, encoded, (next_basis_file(self.manifest), data)

    def _check_fits(self, source: TaskSource) -> None:
        shapes = {m: tuple(meta["shape"]) for m, meta in self.manifest["slots"].items()}
        SubspaceBasis.from_bases({}, shapes).check_task(source)

    # ---- reconstructing -------------------------------------------------------------------------------
    def task_factors(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-slot PEFT factors (B, A) of a task, scale folded in, float64; rank = min(source rank, k)."""
        entry = self._entry(name)
        stored, _ = self.files.task_stored(name)
        return {m: self.slot_factors(entry, m, matrices) for m, matrices in sorted(stored.items())}

    def slot_factors(
        self, entry: dict[str, Any], module: str, matrices: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One slot's (B, A) from its stored core matrices ([C] or [P, Q]) and the slot's bases."""
        U, V = (t.to(COMPUTE_DTYPE) for t in self.basis(module))
        if len(matrices) == 2:
            P, Q = (t.to(COMPUTE_DTYPE) for t in matrices)
            return U @ P, Q @ V.T
        return core_to_factors(U, matrices[0], V, self.stored_rank(entry, module))

    def stored_rank(self, entry: dict[str, Any], module: str) -> int:
        """The rank of a task's slot as stored: min(source rank, the basis width it was encoded on)."""
        stats, meta = entry["slots"][module], self.manifest["slots"][module]
        if stats.get("rho"):
            return int(stats["rho"])
        width = min(stats.get("k_out") or meta["k_out"], stats.get("k_in") or meta["k_in"])
        return max(1, min(int(stats["rank"]), width))

    def refit(
        self,
        add: list[str | Path] | None = None,
        settings: SubspaceSettings | None = None,
        allow_pickle: bool = False,
        progress: bool = True,
        device: str = "cpu",
    ) -> SubspaceStore:
        """Fit new bases on the stored tasks (read back as basis x cores) plus new adapters, and replace the
        store atomically (see mergekit_subspace.refit)."""
        from mergekit_subspace.refit import refit_store

        return refit_store(self, add or [], settings, allow_pickle, progress, device)

    def reconstruct(self, name: str, out: str | Path, overwrite: bool = False) -> Path:
        """Write task `name` as a standard PEFT LoRA folder that PeftModel.from_pretrained loads."""
        check_output(out, overwrite, inputs=[self.path])
        entry = self._entry(name)
        dtype = getattr(torch, entry["dtype"])
        factors = {m: (B.to(dtype), A.to(dtype)) for m, (B, A) in self.task_factors(name).items()}
        labels = label_config(entry.get("labels"), (self.manifest.get("base_model") or {}).get("model_type"))
        return write_lora_adapter(
            out, factors, self.extras(name), entry["peft_config"], overwrite=overwrite, model_config=labels
        )

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
        basis_bytes = (self.path / basis_file(self.manifest)).stat().st_size
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
            if entry.get("cluster") is not None:
                per_task[name]["cluster"] = entry["cluster"]
        slots = {
            module: {
                key: meta[key]
                for key in ("shape", "k_out", "k_in", "k_capped", "total_rank", "captured_energy")
            }
            | {"tasks": len(meta["tasks"]), "solver": meta.get("solver", "exact")}
            | ({"transfer_weight": meta["transfer_weight"]} if "transfer_weight" in meta else {})
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

    # ---- managing (mergekit_subspace.manage) ----------------------------------------------------------
    def remove(self, *names: str) -> list[str]:
        """Remove tasks in one atomic manifest write (then their files); the basis is unchanged."""
        from mergekit_subspace.manage import remove_tasks

        return remove_tasks(self, names)

    def rename(self, old: str, new: str) -> None:
        """Rename a task: new file, manifest swapped atomically, old file removed."""
        from mergekit_subspace.manage import rename_task

        rename_task(self, old, new)

    def add_many(
        self,
        adapters: list[str | Path | TaskSource],
        allow_pickle: bool = False,
        device: str = "cpu",
        progress: bool = True,
        max_rel_error: float = DEFAULT_MAX_REL_ERROR,
        policy: str = "auto",
    ) -> list[dict]:
        """Add several adapters with one manifest write, or none of them (none also when one would be stored
        with a relative error above `max_rel_error`); `policy` "auto" or "grow" grows the bases as `add` does,
        task by task in order."""
        from mergekit_subspace.manage import add_many

        return add_many(
            self,
            adapters,
            allow_pickle=allow_pickle,
            device=device,
            progress=progress,
            max_rel_error=max_rel_error,
            policy=policy,
        )

    def export(
        self,
        name: str,
        out: str | Path,
        overwrite: bool = False,
        command: str | None = None,
        base_model_id: str | None = None,
    ) -> Path:
        """Task `name` as a PEFT folder with a README.md model card (hub front matter, source, error, store)."""
        from mergekit_subspace.manage import export_task

        return export_task(self, name, out, overwrite=overwrite, command=command, base_model_id=base_model_id)


__all__ = ["SubspaceStore", "load_recipe_tasks"]
