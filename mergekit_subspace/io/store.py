"""The on-disk store: manifest.json, basis.safetensors, tasks/<task>.safetensors.

The manifest is written last and holds the sha256 of every other file, so a store is whatever the manifest
says, and `verify` can tell a damaged one. Canonical JSON and sorted tensor keys make equal inputs give
byte-identical files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.io.files import (
    atomic_write_bytes,
    json_bytes,
    load_safetensors,
    read_json,
    sha256_file,
)

FORMAT = "mergekit-subspace/1"
MANIFEST = "manifest.json"
BASIS = "basis.safetensors"
TASKS_DIR = "tasks"
EXTRA_PREFIX = "extra:"
CORE_SUFFIX = ".core"


def task_file(name: str) -> str:
    return f"{TASKS_DIR}/{name}.safetensors"


def basis_keys(module: str) -> tuple[str, str]:
    return f"{module}.U", f"{module}.V"


def task_tensors(cores: dict[str, torch.Tensor], extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {f"{module}{CORE_SUFFIX}": core for module, core in cores.items()}
    tensors.update({f"{EXTRA_PREFIX}{key}": value for key, value in extras.items()})
    return tensors


def split_task_tensors(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    cores: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.startswith(EXTRA_PREFIX):
            extras[key[len(EXTRA_PREFIX) :]] = value
        elif key.endswith(CORE_SUFFIX):
            cores[key[: -len(CORE_SUFFIX)]] = value
    return cores, extras


class StoreFiles:
    """Reads a store folder; loads tensors lazily and checks the format version."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SubspaceError("store folder not found", self.root)
        manifest_path = self.root / MANIFEST
        self.manifest: dict[str, Any] = read_json(manifest_path)
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise SubspaceError(f"is not a {FORMAT} manifest", manifest_path)
        self._basis: dict[str, torch.Tensor] | None = None

    def basis_tensors(self) -> dict[str, torch.Tensor]:
        if self._basis is None:
            self._basis = load_safetensors(self.root / BASIS)
        return self._basis

    def basis(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        key_u, key_v = basis_keys(module)
        tensors = self.basis_tensors()
        if key_u not in tensors or key_v not in tensors:
            raise SubspaceError(f"has no basis for slot '{module}'", self.root / BASIS)
        return tensors[key_u], tensors[key_v]

    def task(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        entry = self.manifest["tasks"].get(name)
        if entry is None:
            known = ", ".join(sorted(self.manifest["tasks"])) or "none"
            raise SubspaceError(f"has no task '{name}' (known: {known})", self.root)
        return split_task_tensors(load_safetensors(self.root / entry["file"]))

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
        atomic_write_bytes(self.root / MANIFEST, json_bytes(manifest))
        self.manifest = manifest
