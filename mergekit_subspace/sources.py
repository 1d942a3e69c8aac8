"""Tasks as the store sees them: LoRA adapters and fine-tunes turned into factored slots, validated up front.

Everything is read and checked (names, formats, finite values, shapes against the base) before anything is
written, so bad input never leaves a partial store.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_subspace import hub
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.io.checkpoint import Checkpoint
from mergekit_subspace.io.finetune import read_finetune
from mergekit_subspace.io.peft import read_lora_adapter
from mergekit_subspace.lowrank import LowRankDelta
from mergekit_subspace.recipe import check_task_name


@dataclass
class TaskSource:
    """One task ready to be projected: factored slots, verbatim extras, and what reconstruction needs.

    `slots` and `extras` may be lazy (a LoRA folder reads one slot's factors per lookup); `shapes` and `ranks`
    come from headers, so a zoo is checked before any tensor is read.
    """

    name: str
    kind: str  # "lora" or "finetune"
    source: str
    slots: Mapping[str, LowRankDelta]
    extras: Mapping[str, torch.Tensor]
    peft_config: dict[str, Any]
    dtype: str
    source_bytes: int
    shapes: dict[str, tuple[int, int]]
    ranks: dict[str, int]
    digest: Callable[[], str]
    alphas: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    notes: dict[str, Any] = field(default_factory=dict)
    _sha256: str | None = None

    @property
    def source_sha256(self) -> str:
        """sha256 of the source files, computed on first use (it reads every byte once)."""
        if self._sha256 is None:
            self._sha256 = self.digest()
        return self._sha256


def lora_task(folder: str | Path, name: str | None = None, allow_pickle: bool = False) -> TaskSource:
    resolved = hub.resolve(folder)  # a hub id is read from the local Hugging Face cache
    if resolved != Path(folder):
        name = name or hub.default_name(str(folder))
    folder = resolved
    adapter = read_lora_adapter(folder, allow_pickle=allow_pickle)
    task_name = check_task_name(name or folder.resolve().name, folder)
    return TaskSource(
        name=task_name,
        kind="lora",
        source=str(folder),
        slots=adapter.slots,
        extras=adapter.extras,
        peft_config=adapter.config,
        dtype=adapter.dtype,
        source_bytes=adapter.source_bytes,
        shapes=adapter.shapes,
        ranks=adapter.ranks,
        digest=lambda: adapter.source_sha256,
        alphas=adapter.alphas,
        fan_in_fan_out=bool(adapter.config.get("fan_in_fan_out", False)),
        notes={f"source_{key}": value for key, value in hub.hub_origin(folder).items()},  # cached hub id
    )


def delta_task(name: str, slots: dict[str, LowRankDelta], source: str = "memory") -> TaskSource:
    """A task from deltas already in memory (Python users, tests, benchmarks): no heads, float32 config."""
    check_task_name(name, source)
    return TaskSource(
        name=name,
        kind="lora",
        source=source,
        slots=slots,
        extras={},
        peft_config={
            "peft_type": "LORA",
            "r": max(d.rank for d in slots.values()),
            "target_modules": sorted(slots),
        },
        dtype="float32",
        source_bytes=sum(
            d.B.numel() * d.B.element_size() + d.A.numel() * d.A.element_size() for d in slots.values()
        ),
        shapes={m: d.shape for m, d in slots.items()},
        ranks={m: d.rank for m, d in slots.items()},
        digest=lambda: "",
    )


def finetune_task(
    folder: str | Path,
    base: Checkpoint,
    max_rank: int,
    name: str | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
) -> TaskSource:
    """A full fine-tune, read module by module against the base; its truncated factors are held (small)."""
    folder = Path(folder)
    task_name = check_task_name(name or folder.resolve().name, folder)
    delta = read_finetune(folder, base, max_rank=max_rank, allow_pickle=allow_pickle, progress=progress)
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": str(base.folder),
        "task_type": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "lora_bias": delta.lora_bias,
        "modules_to_save": delta.modules_to_save or None,
    }
    return TaskSource(
        name=task_name,
        kind="finetune",
        source=str(folder),
        slots=delta.slots,
        extras=delta.extras,
        peft_config=config,
        dtype=delta.dtype,
        source_bytes=delta.source_bytes,
        shapes={m: d.shape for m, d in delta.slots.items()},
        ranks={m: d.rank for m, d in delta.slots.items()},
        digest=lambda: delta.source_sha256,
        notes={
            "max_rank": max_rank,
            "energy_dropped": delta.energy_dropped,
            **{f"source_{key}": value for key, value in hub.hub_origin(folder).items()},
        },
    )


def check_unique_names(tasks: list[TaskSource], taken: set[str] | None = None) -> None:
    seen: dict[str, str] = {}
    for task in tasks:
        if task.name in (taken or set()):
            raise SubspaceError(
                f"task name '{task.name}' is already in the store; pick another with --name", task.source
            )
        if task.name in seen:
            raise SubspaceError(
                f"two tasks are named '{task.name}' ({seen[task.name]} and {task.source}); give one a name",
                task.source,
            )
        seen[task.name] = task.source


def slot_shapes(tasks: list[TaskSource], base: Checkpoint | None) -> dict[str, tuple[int, int]]:
    """The (out, in) shape of every slot, checked against the base model and across tasks."""
    shapes: dict[str, tuple[int, int]] = {}
    owner: dict[str, str] = {}
    for task in tasks:
        for module, shape in task.shapes.items():
            if base is not None:
                key = base.resolve_module(module)
                if key is None:
                    raise SubspaceError(
                        f"module '{module}' does not exist in the base model {base.folder}", task.source
                    )
                base_shape = base.shapes[key]
                expected = tuple(reversed(base_shape)) if task.fan_in_fan_out else tuple(base_shape)
                if expected != shape:
                    raise SubspaceError(
                        f"shapes do not fit the base model: module '{module}' is {shape} (out, in) in the adapter "
                        f"but the base weight '{key}' is {tuple(base_shape)}",
                        task.source,
                    )
            if module in shapes and shapes[module] != shape:
                raise SubspaceError(
                    f"module '{module}' is {shape} here but {shapes[module]} in {owner[module]}", task.source
                )
            shapes[module] = shape
            owner.setdefault(module, task.source)
    return shapes
