"""The on-disk store: manifest.json, basis.safetensors, tasks/<task>.safetensors.

The manifest is written last and holds the sha256 of every other file, so a store is whatever the manifest
says, and `verify` can tell a damaged one. Canonical JSON and sorted tensor keys make equal inputs give
byte-identical files.

The manifest is small on disk: PEFT configs are kept once and referenced by id, per-slot task statistics are
columns indexed by slot number, floats are rounded, and the JSON has no indentation. `expand_manifest` turns it
back into the plain nested form the rest of the code reads (`tasks[name]["peft_config"]` is a dict,
`tasks[name]["slots"][module]` a dict, `slots[module]["tasks"]` the task names).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.io.codec import PackedCores, SlotLayout, decode, dense_core, encode, unpack_cores
from mergekit_subspace.io.files import (
    atomic_write_bytes,
    json_bytes,
    load_safetensors,
    read_json,
    sha256_bytes,
    sha256_file,
)

FORMAT = "mergekit-subspace/2"
MANIFEST = "manifest.json"
BASIS = "basis.safetensors"
TASKS_DIR = "tasks"
EXTRA_PREFIX = "extra:"
CORES_KEY = "cores"
SCALES_KEY = "core_scales"
SCALE_SUFFIX = ".scale"
SLOT_COLUMNS = ("rank", "rho", "norm", "rel_error", "alpha")
FLOAT_DIGITS = 6


def task_file(name: str) -> str:
    return f"{TASKS_DIR}/{name}.safetensors"


def basis_keys(module: str) -> tuple[str, str]:
    return f"{module}.U", f"{module}.V"


def basis_tensors(
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: str
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """File tensors of the bases (int8 adds one scale pair per slot) and the bases as they will read back."""
    tensors: dict[str, torch.Tensor] = {}
    readback: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, (U, V) in bases.items():
        (u, su), (v, sv) = encode(U, dtype), encode(V, dtype)
        key_u, key_v = basis_keys(module)
        tensors[key_u], tensors[key_v] = u, v
        if su is not None and sv is not None:
            tensors[module + SCALE_SUFFIX] = torch.tensor([su, sv], dtype=torch.float32)
        readback[module] = (decode(u, su), decode(v, sv))
    return tensors, readback


def task_tensors(packed: PackedCores, extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {CORES_KEY: packed.flat}
    if packed.scales is not None:
        tensors[SCALES_KEY] = packed.scales
    tensors.update({f"{EXTRA_PREFIX}{key}": value for key, value in extras.items()})
    return tensors


def _round(value: float) -> float:
    return float(f"{value:.{FLOAT_DIGITS}g}")


def config_id(config: dict[str, Any]) -> str:
    return sha256_bytes(json_bytes(config))[:12]


def compact_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The on-disk form of an expanded manifest (see the module docstring)."""
    slot_index = {module: i for i, module in enumerate(sorted(manifest["slots"]))}
    slots = {
        module: {key: value for key, value in meta.items() if key != "tasks"}
        | {
            "captured_energy": _round(meta["captured_energy"]),
            "spectrum_out": [float(f"{x:.4g}") for x in meta["spectrum_out"]],
        }
        for module, meta in manifest["slots"].items()
    }
    configs: dict[str, Any] = {}
    tasks: dict[str, Any] = {}
    for name, entry in manifest["tasks"].items():
        cid = config_id(entry["peft_config"])
        configs[cid] = entry["peft_config"]
        modules = sorted(entry["slots"])
        table: dict[str, list[Any]] = {"slot": [slot_index[m] for m in modules]}
        for column in SLOT_COLUMNS:
            values = [entry["slots"][m].get(column) for m in modules]
            if all(v is None for v in values):
                continue
            table[column] = [_round(v) if isinstance(v, float) else v for v in values]
        compact = {k: v for k, v in entry.items() if k not in ("slots", "extras", "peft_config")}
        compact |= {"peft_config": cid, "slot_table": table, "rel_error": _round(entry["rel_error"])}
        tasks[name] = compact
    return {
        "format": manifest["format"],
        "base_model": manifest["base_model"],
        "settings": manifest["settings"],
        "slots": slots,
        "peft_configs": configs,
        "tasks": tasks,
        "files": manifest["files"],
    }


def expand_manifest(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """The nested in-memory form of an on-disk manifest; raises SubspaceError when it does not add up."""
    try:
        modules = sorted(raw["slots"])
        slots = {m: dict(meta, tasks=[]) for m, meta in raw["slots"].items()}
        tasks = {}
        for name, compact in sorted(raw["tasks"].items()):
            table = compact["slot_table"]
            entry_slots: dict[str, dict[str, Any]] = {}
            for row, index in enumerate(table["slot"]):
                module = modules[index]
                entry_slots[module] = {c: table[c][row] for c in SLOT_COLUMNS if c in table}
                slots[module]["tasks"].append(name)
            entry = {k: v for k, v in compact.items() if k != "slot_table"}
            entry["peft_config"] = raw["peft_configs"][compact["peft_config"]]
            entry["slots"] = entry_slots
            entry["extras"] = sorted(compact["extra_dtypes"])
            tasks[name] = entry
    except (KeyError, IndexError, TypeError) as exc:
        raise SubspaceError(f"manifest is damaged ({type(exc).__name__}: {exc})", path) from None
    return {k: v for k, v in raw.items() if k != "peft_configs"} | {"slots": slots, "tasks": tasks}


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """Canonical compact JSON of the on-disk manifest."""
    text = json.dumps(compact_manifest(manifest), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return (text + "\n").encode("utf-8")


def slot_layouts(entry: dict[str, Any], slots: dict[str, Any]) -> list[SlotLayout]:
    return [
        SlotLayout(m, slots[m]["k_out"], slots[m]["k_in"], int(entry["slots"][m].get("rho", 0)))
        for m in sorted(entry["slots"])
    ]


class StoreFiles:
    """Reads a store folder; loads tensors lazily and checks the format version."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SubspaceError("store folder not found", self.root)
        manifest_path = self.root / MANIFEST
        raw = read_json(manifest_path)
        found = raw.get("format") if isinstance(raw, dict) else None
        if found != FORMAT:
            hint = "; recompress it with this version" if str(found).startswith("mergekit-subspace/") else ""
            raise SubspaceError(f"is not a {FORMAT} manifest (format: {found}){hint}", manifest_path)
        self.manifest: dict[str, Any] = expand_manifest(raw, manifest_path)
        self._basis: dict[str, torch.Tensor] | None = None

    def basis_tensors(self) -> dict[str, torch.Tensor]:
        if self._basis is None:
            self._basis = load_safetensors(self.root / BASIS)
        return self._basis

    def basis(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) of one slot: as stored for float stores, dequantized to float32 for int8."""
        key_u, key_v = basis_keys(module)
        tensors = self.basis_tensors()
        if key_u not in tensors or key_v not in tensors:
            raise SubspaceError(f"has no basis for slot '{module}'", self.root / BASIS)
        scales = tensors.get(module + SCALE_SUFFIX)
        if scales is None:
            return tensors[key_u], tensors[key_v]
        return decode(tensors[key_u], float(scales[0])), decode(tensors[key_v], float(scales[1]))

    def task_stored(self, name: str) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor]]:
        """Per slot the stored core matrices, decoded ([C] dense or [P, Q] factors), and the task's extras
        in their original dtypes."""
        entry = self.manifest["tasks"].get(name)
        if entry is None:
            known = ", ".join(sorted(self.manifest["tasks"])) or "none"
            raise SubspaceError(f"has no task '{name}' (known: {known})", self.root)
        path = self.root / entry["file"]
        tensors = load_safetensors(path)
        if CORES_KEY not in tensors:
            raise SubspaceError(f"has no '{CORES_KEY}' tensor", path)
        packed = PackedCores(
            tensors[CORES_KEY], tensors.get(SCALES_KEY), slot_layouts(entry, self.manifest["slots"])
        )
        try:
            matrices = unpack_cores(packed)
        except (ValueError, IndexError, RuntimeError) as exc:
            raise SubspaceError(f"does not match the manifest: {exc}", path) from None
        dtypes = entry["extra_dtypes"]
        extras = {
            key[len(EXTRA_PREFIX) :]: value.to(getattr(torch, dtypes[key[len(EXTRA_PREFIX) :]]))
            for key, value in tensors.items()
            if key.startswith(EXTRA_PREFIX)
        }
        return matrices, extras

    def task(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Dense float32 cores (k_out x k_in) per slot and the extras of one task."""
        matrices, extras = self.task_stored(name)
        return {module: dense_core(stored) for module, stored in matrices.items()}, extras

    def file_paths(self) -> list[Path]:
        return [self.root / MANIFEST] + [self.root / rel for rel in sorted(self.manifest["files"])]

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.file_paths() if p.is_file())

    def verify(self) -> list[str]:
        """Problems found by re-hashing every file the manifest lists (empty when the store is intact)."""
        problems = []
        for rel, digest in sorted(self.manifest["files"].items()):
            path = self.root / rel
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif sha256_file(path) != digest:
                problems.append(f"{path}: altered (sha256 differs from the manifest)")
        for entry_name, entry in sorted(self.manifest["tasks"].items()):
            if entry["file"] not in self.manifest["files"]:
                problems.append(f"{self.root / MANIFEST}: task '{entry_name}' file is not hashed")
        return problems

    def write_task_and_manifest(self, name: str, data: bytes, manifest: dict[str, Any]) -> None:
        """Add one task: its file first, then the manifest that makes it part of the store."""
        atomic_write_bytes(self.root / task_file(name), data)
        data = manifest_bytes(manifest)
        atomic_write_bytes(self.root / MANIFEST, data)
        self.manifest = expand_manifest(json.loads(data), self.root / MANIFEST)  # exactly what a reopen sees
