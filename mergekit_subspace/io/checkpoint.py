"""Hugging Face model folders read lazily: shapes from safetensors headers, tensors one at a time.

Adapters name modules as the wrapped model does ('bert.encoder...') while a base checkpoint may be saved from
the bare backbone ('encoder...'), so module paths are resolved by dotted suffix. Transformers 5 also renames
modules of some architectures when it loads an older checkpoint (ViT's 'attention.attention.query' is
'attention.q_proj' in memory, and adapters trained on it use that name); such names are matched through the
library's own renaming rules for the checkpoint's architecture.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from mergekit_subspace import hub
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
        self.folder = hub.resolve(folder)  # a hub id reads its snapshot from the local Hugging Face cache
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
        self._renamed: dict[str, str] | None = None

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
        """Checkpoint key of `module`'s weight, matching by the longest common dotted suffix, then by the
        names transformers gives the checkpoint's modules when it loads them."""
        found = _match_suffix(module, self._modules)
        if found is None and self._modules:
            found = _match_suffix(module, self._loaded_names())
        return found

    def _loaded_names(self) -> dict[str, str]:
        """In-memory module name -> checkpoint weight key, where transformers renames on load (else empty)."""
        if self._renamed is None:
            self._renamed = loaded_module_names(self.folder, self.config, list(self._modules.values()))
        return self._renamed

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
            **hub.hub_origin(self.folder),  # hub_id and commit of an HF cache snapshot, beside its path
        }

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)


def _match_suffix(module: str, names: dict[str, str]) -> str | None:
    """names[name] for the name that equals `module` or its longest dotted suffix, or the one name ending in it."""
    if module in names:
        return names[module]
    parts = module.split(".")
    for start in range(1, len(parts)):
        suffix = ".".join(parts[start:])
        if suffix in names:
            return names[suffix]
    longer = [key for name, key in names.items() if name.endswith("." + module)]
    return longer[0] if len(longer) == 1 else None


def loaded_module_names(folder: Path, config: dict, weight_keys: list[str]) -> dict[str, str]:
    """Apply transformers' key renamings for this architecture to the checkpoint's weight keys.

    Builds the architecture on the meta device (no weights, no remote code: only classes transformers ships)
    to ask for its conversion mapping. Returns {} when transformers has no renaming for it or cannot say.
    """
    architectures = config.get("architectures") or []
    if not architectures:
        return {}
    try:
        import transformers
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        model_class = getattr(transformers, architectures[0], None)
        if model_class is None:
            return {}
        model_config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        with torch.device("meta"):
            model = model_class(model_config)
        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
        if not renamings:
            return {}
        names = {}
        for key in weight_keys:
            renamed = rename_source_key(key, renamings, [])[0]
            if renamed != key and renamed.endswith(".weight"):
                names[renamed[: -len(".weight")]] = key
        return names
    except Exception:  # an optional aid: any failure leaves the plain suffix match in charge
        return {}
