"""Safe reading and atomic writing of tensor files, JSON and whole folders.

Every write goes to a temporary name beside its target, is fsync'ed, then renamed, so a crash leaves either the
old file or the new one; a folder replaces an existing one in a single atomic exchange on Linux. Leftovers of
a killed run are removed by the next run that writes the same target. Pickle files are refused unless the
caller opts in, and then loaded with ``weights_only=True`` so no code runs. JSON with repeated keys or absurd
nesting, and safetensors headers that name a tensor twice, are refused with one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

from mergekit_subspace.errors import SubspaceError

MAX_JSON_DEPTH = 64  # real configs and manifests nest a handful of levels
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header
TEMP_NAME_CHARS = 80  # of the target's name in its temporary siblings, so any valid name has room for them
LEFTOVER_SUFFIXES = (".partial", ".old", ".tmp")


def check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse NaN or Inf anywhere: one bad tensor would silently poison a shared basis."""
    for key, tensor in tensors.items():
        # NaN and Inf both survive abs().amax(), which is ~8x faster than isfinite().all() on bfloat16
        values = (
            tensor.float() if tensor.is_floating_point() and tensor.element_size() == 1 else tensor
        )  # fp8
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(values.abs().amax())):
            raise SubspaceError(f"tensor '{key}' contains NaN or Inf", path)


class _RepeatedKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: a key given twice is ambiguous (readers disagree on which wins)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_safetensors_header(head: bytes, path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file from its first bytes (8-byte little-endian length, then JSON),
    refusing a header that names a tensor twice."""
    if len(head) < 8:
        raise SubspaceError("not a readable safetensors file (shorter than its 8-byte header size)", path)
    size = int.from_bytes(head[:8], "little")
    if size > MAX_HEADER_BYTES or len(head) < 8 + size:
        raise SubspaceError(
            f"not a readable safetensors file (header size {size} does not fit in the file)", path
        )
    try:
        header = json.loads(head[8 : 8 + size].decode("utf-8"), object_pairs_hook=_unique_pairs)
    except _RepeatedKey as exc:
        raise SubspaceError(f"safetensors header names tensor '{_short(exc.key)}' twice", path) from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SubspaceError(f"not a readable safetensors file (header is not JSON: {exc})", path) from None
    if not isinstance(header, dict):
        raise SubspaceError("not a readable safetensors file (header is not a JSON object)", path)
    return header


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Read and check only the header of a safetensors file (cheap: two small reads)."""
    try:
        with open(path, "rb") as handle:
            size_bytes = handle.read(8)
            size = int.from_bytes(size_bytes, "little") if len(size_bytes) == 8 else 0
            file_size = os.fstat(handle.fileno()).st_size
            if len(size_bytes) < 8 or size > min(MAX_HEADER_BYTES, file_size - 8):
                return parse_safetensors_header(size_bytes, path)  # raises with the reason
            return parse_safetensors_header(size_bytes + handle.read(size), path)
    except OSError as exc:
        raise SubspaceError(f"cannot be read ({exc.strerror or exc})", path) from None


def tensors_from_bytes(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file already in memory (read once, e.g. to hash it), checked finite."""
    parse_safetensors_header(data[: 8 + min(int.from_bytes(data[:8], "little"), MAX_HEADER_BYTES)], path)
    try:
        tensors = safetensors_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise SubspaceError(f"not a readable safetensors file ({exc})", path) from None
    check_finite(tensors, path)
    return tensors


def load_safetensors(path: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load (some) tensors of a safetensors file, naming the file when it is truncated or corrupt."""
    if not path.is_file():
        raise SubspaceError("file not found", path)
    read_safetensors_header(path)
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
    read_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:
        raise SubspaceError(f"not a readable safetensors file ({exc})", path) from exc


class TensorFile:
    """A safetensors file read lazily (header now, tensors on request), or an in-memory state dict.

    Shapes and dtypes come from the header, which is checked whole at once (known dtypes, offsets inside the
    file and matching each shape), so a zoo can be checked before any tensor is read. A read then copies just
    the named tensors' bytes from the file into fresh tensors (one seek and one read each, no mmap, no
    per-call parsing: a slot-major pass opens every adapter once per slot) and checks their values, so
    nothing stays in memory between reads.
    """

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.path = path
        self._tensors = tensors
        self._entries: dict[str, tuple[int, int]] = {}
        if tensors is not None:
            self.shapes = {key: tuple(t.shape) for key, t in tensors.items()}
            self.dtypes = {key: t.dtype for key, t in tensors.items()}
            return
        if not path.is_file():
            raise SubspaceError("file not found", path)
        if sys.byteorder != "little":  # safetensors data is little-endian; reads copy its bytes as they are
            raise SubspaceError("safetensors files are read on little-endian machines only", path)
        header = read_safetensors_header(path)
        with open(path, "rb") as handle:
            data_start = 8 + int.from_bytes(handle.read(8), "little")
            data_size = os.fstat(handle.fileno()).st_size - data_start
        self.shapes, self.dtypes = {}, {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            shape, dtype, (begin, end) = _header_entry(key, entry, data_size, path)
            self.shapes[key], self.dtypes[key] = shape, dtype
            self._entries[key] = (data_start + begin, end - begin)

    def keys(self) -> list[str]:
        return sorted(self.shapes)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, checked finite; a damaged file is named in the error."""
        if self._tensors is not None:
            tensors = {key: self._tensors[key] for key in keys}
        else:
            tensors = {}
            try:
                with open(self.path, "rb") as handle:
                    for key in keys:
                        offset, size = self._entries[key]
                        tensor = torch.empty(self.shapes[key], dtype=self.dtypes[key])
                        handle.seek(offset)
                        if handle.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy())) != size:
                            raise SubspaceError(
                                f"is shorter than its header says (tensor '{key}')", self.path
                            )
                        tensors[key] = tensor
            except OSError as exc:
                raise SubspaceError(f"cannot be read ({exc.strerror or exc})", self.path) from None
        check_finite(tensors, self.path)
        return tensors


def _header_entry(
    key: str, entry: Any, data_size: int, path: Path
) -> tuple[tuple[int, ...], torch.dtype, tuple[int, int]]:
    """(shape, dtype, data offsets) of one header entry, refusing anything a reader could trip on."""
    problem = None
    if not isinstance(entry, dict):
        problem = "is not an object"
    else:
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if dtype is None:
            problem = f"has dtype {entry.get('dtype')!r}, which is not read here"
        elif not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            problem = "has no valid shape"
        elif not (
            isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        ):
            problem = "has no valid data_offsets"
        else:
            begin, end = offsets
            numel = 1
            for dim in shape:
                numel *= dim
            if not 0 <= begin <= end <= data_size or end - begin != numel * dtype.itemsize:
                problem = f"data_offsets {offsets} do not fit its shape {shape} inside the file"
    if problem is not None:
        raise SubspaceError(f"not a readable safetensors file (tensor '{_short(key)}' {problem})", path)
    return tuple(shape), dtype, (begin, end)


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
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _pickle_reason(exc: Exception) -> str:
    """The one informative line of torch.load's weights-only refusal (its message is a page of advice)."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\s*\n|Check the documentation|$)", text, re.S)
    reason = found.group(1) if found else text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return _short(" ".join(reason.split()), 200)


def load_pickle_weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Load a legacy .bin state dict only on request, and never with code execution."""
    if not allow_pickle:
        raise SubspaceError(
            "is a pickle file; pickle can run code, so it is refused. Convert it to safetensors, "
            "or pass --allow-pickle to load it with torch.load(weights_only=True)",
            path,
        )
    try:
        with (
            warnings.catch_warnings()
        ):  # torch warns about pickle protocols on stderr; the refusal says enough
            warnings.simplefilter("ignore")
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SubspaceError(
            f"refused by torch.load(weights_only=True), it holds more than tensors: {_pickle_reason(exc)}",
            path,
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise SubspaceError("does not hold a flat dict of tensors", path)
    check_finite(state, path)
    return dict(state)


def check_depth(obj: Any, limit: int, path: Path, skip: frozenset[str] = frozenset()) -> None:
    """Refuse JSON nested deeper than `limit` (a stack of a thousand lists breaks recursive code later).
    Values under the keys in `skip` are not walked (the caller types them as flat)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise SubspaceError(f"is nested too deeply (more than {limit} levels)", path)
        if isinstance(node, dict):
            children: Iterable[Any] = (v for k, v in node.items() if k not in skip)
        elif isinstance(node, list):
            children = node
        else:
            continue
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def parse_json(text: str | bytes, path: Path, max_depth: int = MAX_JSON_DEPTH, skip=frozenset()) -> Any:
    """JSON text as data; a repeated key, a syntax error or absurd nesting is one SubspaceError."""
    try:
        data = json.loads(text, object_pairs_hook=_unique_pairs)
    except _RepeatedKey as exc:
        raise SubspaceError(
            f"is ambiguous: the key '{_short(exc.key)}' appears twice in one object", path
        ) from None
    except json.JSONDecodeError as exc:
        raise SubspaceError(
            f"is not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})", path
        ) from None
    except UnicodeDecodeError:
        raise SubspaceError("is not valid JSON (not UTF-8 text)", path) from None
    except RecursionError:
        raise SubspaceError(f"is nested too deeply (more than {max_depth} levels)", path) from None
    check_depth(data, max_depth, path, skip)
    return data


def read_json(path: Path, max_depth: int = MAX_JSON_DEPTH) -> Any:
    if not path.is_file():
        raise SubspaceError("file not found", path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SubspaceError(f"cannot be read ({exc.strerror or exc})", path) from None
    return parse_json(data, path, max_depth)


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


def umask_mode(base: int) -> int:
    """`base` (0o666 for files, 0o777 for folders) less the process umask: what open() and mkdir() give."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _temp_prefix(name: str) -> str:
    return f".{name[:TEMP_NAME_CHARS]}."


def _leftover_pattern(name: str) -> re.Pattern[str]:
    suffixes = "|".join(re.escape(s) for s in LEFTOVER_SUFFIXES)
    return re.compile(rf"^{re.escape(_temp_prefix(name))}[A-Za-z0-9_]{{8}}(?:{suffixes})$")


def is_leftover(path: Path) -> bool:
    """Whether `path` is a temporary sibling that a (killed) atomic write of another name left."""
    name = path.name
    if not name.startswith(".") or not name.endswith(LEFTOVER_SUFFIXES):
        return False
    return re.match(r"^\..+\.[A-Za-z0-9_]{8}\.(?:partial|old|tmp)$", name) is not None


def _try_lock(path: Path) -> int | None:
    """An exclusive lock on a leftover (None while a running writer holds it, or if it cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def clean_leftovers(target: Path, anywhere: bool = False) -> list[Path]:
    """Remove the temporary siblings (.partial, .old, .tmp) that killed writes of `target` left beside it
    (with `anywhere`: those of any name inside the folder `target`); ones a running writer still holds
    locked are kept. Returns what was removed."""
    folder = target if anywhere else target.parent
    try:
        children = list(folder.iterdir())
    except OSError:
        return []
    pattern = None if anywhere else _leftover_pattern(target.name)
    removed: list[Path] = []
    for child in children:
        if not (is_leftover(child) if pattern is None else pattern.match(child.name)):
            continue
        fd = None if child.is_symlink() else _try_lock(child)
        if fd is None and not child.is_symlink():
            continue
        try:
            _remove(child)
            removed.append(child)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename over the target; the file gets the umask's
    permissions (not mkstemp's 0600), and stays locked until renamed so no cleaner takes it for a leftover."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=str(path.parent))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.fchmod(fd, umask_mode(0o666))
        with os.fdopen(os.dup(fd), "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    _fsync_dir(path.parent)


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialize tensors deterministically (contiguous copies, sorted keys).

    Keep `metadata` to one key: safetensors writes it from a hash map, so several keys come out in random order.
    """
    if metadata is not None and len(metadata) > 1:
        raise ValueError("use at most one metadata key for byte-identical files")
    ordered = {key: tensors[key].detach().contiguous() for key in sorted(tensors)}
    return safetensors_bytes(ordered, metadata=metadata)


# ---- atomic exchange of two paths (Linux renameat2 with RENAME_EXCHANGE) ---------------------------------

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_SYS_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276, "riscv64": 276}
_renameat2_fn: Any = None


def _renameat2() -> Any:
    """The C renameat2 (glibc >= 2.28), or a syscall wrapper, or False where there is none."""
    global _renameat2_fn
    if _renameat2_fn is None:
        _renameat2_fn = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            except OSError:
                libc = None
            func = getattr(libc, "renameat2", None) if libc is not None else None
            if func is not None:
                func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                func.restype = ctypes.c_int
                _renameat2_fn = func
            elif libc is not None and platform.machine().lower() in _SYS_RENAMEAT2:
                number = _SYS_RENAMEAT2[platform.machine().lower()]
                syscall = libc.syscall
                syscall.restype = ctypes.c_long

                def via_syscall(olddir: int, old: bytes, newdir: int, new: bytes, flags: int) -> int:
                    return int(
                        syscall(
                            ctypes.c_long(number),
                            ctypes.c_int(olddir),
                            ctypes.c_char_p(old),
                            ctypes.c_int(newdir),
                            ctypes.c_char_p(new),
                            ctypes.c_uint(flags),
                        )
                    )

                _renameat2_fn = via_syscall
    return _renameat2_fn


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the OS or filesystem cannot (then nothing
    happened and the caller falls back to two renames)."""
    func = _renameat2()
    if not func:
        return False
    if func(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


# ---- output paths -----------------------------------------------------------------------------------------


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(str(folder), "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(
    target: str | Path,
    overwrite: bool = False,
    inputs: Iterable[str | Path | None] = (),
    existing_ok: bool = False,
) -> Path:
    """Refuse an output folder that cannot or must not be written, before any work starts.

    Refused: an empty name; a name or path too long for the filesystem; a target that is a file, or whose
    parent is one, or is not writable; an existing target without `overwrite` (unless `existing_ok`); the
    current folder or one above it; a target that is, lies inside or holds one of `inputs` (adapters, stores,
    base models, data): writing there would change or, with --overwrite, delete what the run reads.
    """
    if str(target).strip() == "":
        raise SubspaceError("the output path is empty")
    target = Path(target)
    absolute = Path(os.path.abspath(target))
    ancestor = absolute.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    limit = _name_max(ancestor if ancestor.is_dir() else Path("/"))
    for part in absolute.parts[1:]:
        size = len(os.fsencode(part))
        if size > limit:
            raise SubspaceError(
                f"the name '{_short(part, 40)}' is {size} bytes; this filesystem allows at most {limit}",
                target,
            )
    if len(os.fsencode(str(absolute))) > 4000:
        raise SubspaceError("the path is too long for the filesystem", target)
    if not ancestor.is_dir():
        raise SubspaceError(f"cannot be created: {ancestor} is a file, not a folder", target)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise SubspaceError(f"cannot be created: {ancestor} is not writable", target)
    try:
        resolved = target.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise SubspaceError(f"cannot be resolved ({exc})", target) from None
    if target.exists() or target.is_symlink():
        if not resolved.is_dir():
            raise SubspaceError("exists and is not a folder; choose a folder path", target)
        if not overwrite and not existing_ok:
            raise SubspaceError("already exists; choose another path or pass --overwrite", target)
    cwd = Path.cwd().resolve()
    candidates = {absolute, resolved}
    for candidate in candidates:
        if _inside(cwd, candidate):
            raise SubspaceError(
                "is the current folder or holds it; write the output to a new folder instead", target
            )
    for raw in inputs:
        if raw is None or str(raw) == "":
            continue
        source = Path(os.path.abspath(raw))
        sources = {source, Path(raw).resolve()}
        for candidate in candidates:
            for read in sources:
                if candidate == read:
                    raise SubspaceError(
                        f"is an input of this run ({raw}); write the output elsewhere", target
                    )
                if _inside(candidate, read):
                    raise SubspaceError(
                        f"lies inside an input of this run ({raw}); write it elsewhere", target
                    )
                if _inside(read, candidate):
                    raise SubspaceError(
                        f"holds an input of this run ({raw}), which writing there would destroy; choose "
                        "another folder",
                        target,
                    )
    return target


def _fsync_tree(folder: Path) -> None:
    for child in folder.rglob("*"):
        if child.is_file() and not child.is_symlink():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
        elif child.is_dir():
            _fsync_dir(child)
    _fsync_dir(folder)


def _os_error(exc: OSError, target: Path) -> SubspaceError:
    where = exc.filename or target
    return SubspaceError(f"cannot be written ({exc.strerror or exc})", where)


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target`, on failure it vanishes.

    An existing target is refused unless `overwrite`; it is replaced in one atomic exchange (Linux
    renameat2 RENAME_EXCHANGE; elsewhere two renames), so a kill at any moment leaves the old folder or the
    new one at `target`. Leftovers of earlier killed runs beside `target` are removed first. The folder gets
    the umask's permissions, not mkdtemp's 0700.
    """
    target = Path(target)
    check_output(target, overwrite=overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(target)
        tmp = Path(
            tempfile.mkdtemp(prefix=_temp_prefix(target.name), suffix=".partial", dir=str(target.parent))
        )
    except OSError as exc:
        raise _os_error(exc, target) from None
    lock = os.open(str(tmp), os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent run's cleaner leaves a locked .partial alone
        yield tmp
        _fsync_tree(tmp)
        os.chmod(tmp, umask_mode(0o777))
        if target.exists() or target.is_symlink():
            if exchange_paths(tmp, target):
                _fsync_dir(target.parent)
                _remove(tmp)  # the previous folder, now at the temporary name
            else:
                old = Path(
                    tempfile.mkdtemp(prefix=_temp_prefix(target.name), suffix=".old", dir=str(target.parent))
                )
                os.replace(target, old / "prev")
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        _remove(tmp)
        raise _os_error(exc, target) from None
    except BaseException:
        _remove(tmp)
        raise
    finally:
        os.close(lock)


def folder_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)
