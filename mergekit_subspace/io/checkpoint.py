"""Hugging Face model folders read lazily: shapes from safetensors headers, tensors one at a time.

Adapters name modules as the wrapped model does ('bert.encoder...') while a base checkpoint may be saved from
the bare backbone ('encoder...'), so module paths are resolved by dotted suffix.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.io.files import (
    load_pickle_weights,
    read_json,
    safetensors_shapes,
    sha256_file,
)

SAFE_INDEX = "model.safetensors.index.json"


class Checkpoint:
    """A model folder's tensors, found by name or by module path, read only when asked for."""

    def __init__(self, folder: str | Path, allow_pickle: bool = False) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SubspaceError("model folder not found", self.folder)
        self._files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self.weight_files: list[Path] = self._discover(allow_pickle)
        config = self.folder / "config.json"
        self.config_sha256 = sha256_file(config) if config.is_file() else None
        self.config = read_json(config) if config.is_file() else {}
        self._modules = {key[: -len(".weight")]: key for key in self.shapes if key.endswith(".weight")}

    def _discover(self, allow_pickle: bool) -> list[Path]:
        index = self.folder / SAFE_INDEX
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise SubspaceError("has no 'weight_map'", index)
            files = sorted({self.folder / name for name in weight_map.values()})
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if files:
            for file in files:
                for key, shape in safetensors_shapes(file).items():
                    self._files[key] = file
                    self.shapes[key] = shape
            return files
        pickled = sorted(self.folder.glob("pytorch_model*.bin"))
        if pickled:
            state: dict[str, torch.Tensor] = {}
            for file in pickled:
                state.update(load_pickle_weights(file, allow_pickle))
            self._pickled = state
            self.shapes = {key: tuple(t.shape) for key, t in state.items()}
            return pickled
        raise SubspaceError("holds no *.safetensors weights", self.folder)

    def resolve_module(self, module: str) -> str | None:
        """Checkpoint key of `module`'s weight, matching by the longest common dotted suffix."""
        if module in self._modules:
            return self._modules[module]
        parts = module.split(".")
        for start in range(1, len(parts)):
            suffix = ".".join(parts[start:])
            if suffix in self._modules:
                return self._modules[suffix]
        longer = [key for name, key in self._modules.items() if name.endswith("." + module)]
        return longer[0] if len(longer) == 1 else None

    def resolve_key(self, key: str) -> str | None:
        """Checkpoint key for a full parameter name from another naming of the same model."""
        if key in self.shapes:
            return key
        parts = key.split(".")
        for start in range(1, len(parts)):
            suffix = ".".join(parts[start:])
            if suffix in self.shapes:
                return suffix
        longer = [k for k in self.shapes if k.endswith("." + key)]
        return longer[0] if len(longer) == 1 else None

    def tensor(self, key: str) -> torch.Tensor:
        if self._pickled is not None:
            return self._pickled[key]
        file = self._files[key]
        try:
            with safe_open(str(file), framework="pt") as handle:
                tensor = handle.get_tensor(key)
        except Exception as exc:
            raise SubspaceError(f"could not read tensor '{key}' ({exc})", file) from exc
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SubspaceError(f"tensor '{key}' contains NaN or Inf", file)
        return tensor

    def keys(self) -> list[str]:
        return sorted(self.shapes)

    def identity(self) -> dict[str, object]:
        """What the store records to recognise this base later."""
        return {
            "path": str(self.folder),
            "config_sha256": self.config_sha256,
            "model_type": self.config.get("model_type"),
            "architectures": self.config.get("architectures"),
        }

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)
