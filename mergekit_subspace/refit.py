"""Refit a store without its sources: every stored task's delta is U C V^T, so its factors can be read back
from the basis and its cores, fitted again together with new adapters, and the store replaced atomically.

A store that grew through many `add`s (wider bases, one task at a time) becomes compact again: the new bases
are fitted on the whole zoo with the store's settings (or new ones). What a task lost when it was first
stored stays lost (the refit sees the task as stored, not its source); the manifest keeps each task's source,
source sha256 and source bytes, so ratios and provenance still describe the original adapters.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.lowrank import LowRankDelta
from mergekit_subspace.recipe import SubspaceSettings
from mergekit_subspace.sources import TaskSource, check_unique_names, lora_task

if TYPE_CHECKING:
    from mergekit_subspace.subspace import SubspaceStore


class StoredSlots(Mapping[str, LowRankDelta]):
    """A stored task's slots as factored deltas, made one slot at a time from the basis and its cores (the
    task file is read once; the factors of a slot exist only while the fit reads it)."""

    def __init__(self, store: SubspaceStore, name: str) -> None:
        self.store, self.name = store, name
        self.entry = store.manifest["tasks"][name]
        self._stored: dict[str, list[torch.Tensor]] | None = None

    def _matrices(self) -> dict[str, list[torch.Tensor]]:
        if self._stored is None:
            self._stored = self.store.files.task_stored(self.name)[0]
        return self._stored

    def __getitem__(self, module: str) -> LowRankDelta:
        B, A = self.store.slot_factors(self.entry, module, self._matrices()[module])
        return LowRankDelta(B=B, A=A, scale=1.0)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.entry["slots"]))

    def __len__(self) -> int:
        return len(self.entry["slots"])


class StoredExtras(Mapping[str, torch.Tensor]):
    """A stored task's heads and biases, read from its file when the new store writes it and not kept
    (a zoo's heads are never all in memory at once)."""

    def __init__(self, store: SubspaceStore, name: str) -> None:
        self.store, self.name = store, name
        self.keys_ = sorted(store.manifest["tasks"][name]["extras"])

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.store.extras(self.name)[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)

    def items(self) -> Any:  # one read of the task file for all its extras
        return self.store.extras(self.name).items()


def stored_task(store: SubspaceStore, name: str) -> TaskSource:
    """One stored task as a source for a new fit, carrying its original provenance."""
    entry = store.manifest["tasks"][name]
    slots_meta = store.manifest["slots"]
    stats = entry["slots"]
    ranks = {m: store.stored_rank(entry, m) for m in stats}
    notes = {key: entry[key] for key in ("energy_dropped",) if entry.get(key) is not None}
    return TaskSource(
        name=name,
        kind=entry["kind"],
        source=entry["source"],
        slots=StoredSlots(store, name),
        extras=StoredExtras(store, name),
        peft_config=entry["peft_config"],
        dtype=entry["dtype"],
        source_bytes=int(entry["source_bytes"]),
        shapes={m: tuple(slots_meta[m]["shape"]) for m in stats},  # type: ignore[misc]
        ranks=ranks,
        digest=lambda: str(entry["source_sha256"]),
        alphas={m: float(s["alpha"]) for m, s in stats.items() if s.get("alpha") is not None},
        fan_in_fan_out=bool(entry["peft_config"].get("fan_in_fan_out", False)),
        notes=notes,
    )


def refit_store(
    store: SubspaceStore,
    add: list[str | Path],
    settings: SubspaceSettings | None,
    allow_pickle: bool,
    progress: bool,
    device: str,
) -> SubspaceStore:
    """Fit the stored tasks plus `add` with `settings` (default: the store's) and swap the new store in.

    Every input is read and checked before the fit; the new store is written beside the old one and
    exchanged with it in one rename, so a failure or a kill leaves the store as it was.
    """
    from mergekit_subspace.subspace import SubspaceStore

    if settings is None:
        settings = SubspaceSettings.model_validate(store.manifest["settings"])
    tasks = [stored_task(store, name) for name in store.tasks]
    new = [lora_task(path, allow_pickle=allow_pickle) for path in add]
    check_unique_names(new, taken={t.name for t in tasks})
    fitted = store.fitted()
    for task in new:
        fitted.check_task(task)
    if not tasks and not new:
        raise SubspaceError("holds no task to refit", store.path)
    return SubspaceStore.from_tasks(
        tasks + new,
        settings,
        store.path,
        overwrite=True,
        progress=progress,
        device=device,
        base_identity=store.manifest.get("base_model"),
    )
