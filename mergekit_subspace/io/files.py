"""Safe reading and atomic writing of tensor files, JSON and whole folders.

Every write goes to a temporary name beside its target, is fsync'ed, then renamed, so a crash leaves either the
old file or the new one. Pickle files are refused unless the caller opts in, and then loaded with
``weights_only=True`` so no code runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from mergekit_subspace.errors import SubspaceError


def check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse NaN or Inf anywhere: one bad tensor would silently poison a shared basis."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SubspaceError(f"tensor '{key}' contains NaN or Inf", path)


def load_safetensors(path: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load (some) tensors of a safetensors file, naming the file when it is truncated or corrupt."""
    if not path.is_file():
        raise SubspaceError("file not found", path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            wanted = list(handle.keys()) if keys is None else keys
            tensors = {key: handle.get_tensor(key) for key in wanted}
    except SubspaceError:
        raise
    except Exception as exc:  # safetensors raises its own error types and OSError for truncation
        raise SubspaceError(f"not a readable safetensors file ({exc})", path) from exc
    check_finite(tensors, path)
    return tensors


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor without reading the data."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:
        raise SubspaceError(f"not a readable safetensors file ({exc})", path) from exc


class TensorFile:
    """A safetensors file read lazily (header now, tensors on request), or an in-memory state dict.

    Shapes and dtypes come from the header, so a zoo can be checked before any tensor is read; every read
    opens the file anew and checks the values, so nothing stays in memory between reads.
    """

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.path = path
        self._tensors = tensors
        if tensors is not None:
            self.shapes = {key: tuple(t.shape) for key, t in tensors.items()}
            self.dtypes = {key: t.dtype for key, t in tensors.items()}
            return
        if not path.is_file():
            raise SubspaceError("file not found", path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                slices = {key: handle.get_slice(key) for key in handle.keys()}
                self.shapes = {key: tuple(s.get_shape()) for key, s in slices.items()}
                self.dtypes = {key: _SAFETENSORS_DTYPES.get(s.get_dtype()) for key, s in slices.items()}
        except Exception as exc:  # safetensors raises its own error types and OSError for truncation
            raise SubspaceError(f"not a readable safetensors file ({exc})", path) from exc

    def keys(self) -> list[str]:
        return sorted(self.shapes)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, checked finite; a damaged file is named in the error."""
        if self._tensors is not None:
            tensors = {key: self._tensors[key] for key in keys}
        else:
            try:
                with safe_open(str(self.path), framework="pt") as handle:
                    tensors = {key: handle.get_tensor(key) for key in keys}
            except Exception as exc:
                raise SubspaceError(f"not a readable safetensors file ({exc})", self.path) from exc
        check_finite(tensors, self.path)
        return tensors


_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def load_pickle_weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Load a legacy .bin state dict only on request, and never with code execution."""
    if not allow_pickle:
        raise SubspaceError(
            "is a pickle file; pickle can run code, so it is refused. Convert it to safetensors, "
            "or pass --allow-pickle to load it with torch.load(weights_only=True)",
            path,
        )
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SubspaceError(f"could not be loaded as a weights-only state dict ({exc})", path) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SubspaceError("does not hold a flat dict of tensors", path)
    check_finite(state, path)
    return dict(state)


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise SubspaceError("file not found", path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SubspaceError(f"is not valid JSON ({exc})", path) from exc


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON: sorted keys and fixed indentation, so equal content gives equal bytes."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialize tensors deterministically (contiguous copies, sorted keys).

    Keep `metadata` to one key: safetensors writes it from a hash map, so several keys come out in random order.
    """
    if metadata is not None and len(metadata) > 1:
        raise ValueError("use at most one metadata key for byte-identical files")
    ordered = {key: tensors[key].detach().contiguous() for key in sorted(tensors)}
    return safetensors_bytes(ordered, metadata=metadata)


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target`, on failure it vanishes.

    An existing target is refused unless `overwrite`, and is only removed after the new folder is complete.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise SubspaceError("already exists; choose another path or pass --overwrite", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=str(target.parent)))
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=str(target.parent)))
            os.replace(target, old / "prev")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def folder_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)
