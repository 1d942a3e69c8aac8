"""The on-disk store: manifest.json, basis.safetensors, tasks/<task>.safetensors.

The manifest is written last and holds the sha256 of every other file, so a store is whatever the manifest
says, and `verify` can tell a damaged one. Canonical JSON and sorted tensor keys make equal inputs give
byte-identical files.

A store only ever touches `basis.safetensors` (or `basis-<n>.safetensors`, the name a grown basis is written
under so that the manifest switches to it in one rename), `tasks/<plain task name>.safetensors` and
`manifest.json` inside its folder: the manifest is validated when it is read (types, ranges, and every file name it holds), no
file is followed through a symlink, and every file is checked against its sha256 when it is read. The manifest
carries a digest of its own content (`manifest_sha256`), so `verify` also tells a manifest edited together
with re-hashed files (this guards against damage and careless edits, not against someone who recomputes it).

The manifest is small on disk: PEFT configs are kept once and referenced by id, per-slot task statistics are
columns indexed by slot number, floats are rounded, and the JSON has no indentation. `expand_manifest` turns it
back into the plain nested form the rest of the code reads (`tasks[name]["peft_config"]` is a dict,
`tasks[name]["slots"][module]` a dict, `slots[module]["tasks"]` the task names).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, ValidationError

from mergekit_subspace.errors import SubspaceError, validation_message
from mergekit_subspace.io.codec import (
    INT_DTYPES,
    PackedCores,
    SlotLayout,
    decode,
    decode_extra,
    dense_core,
    encode,
    int4_groups,
    number_dtype,
    pack_nibbles,
    store_dtypes,
    unpack_cores,
    unpack_nibbles,
)
from mergekit_subspace.io.files import (
    atomic_write_bytes,
    clean_leftovers,
    is_leftover,
    json_bytes,
    parse_json,
    sha256_bytes,
    sha256_file,
    tensors_from_bytes,
)
from mergekit_subspace.recipe import TASK_NAME, SubspaceSettings

FORMAT = "mergekit-subspace/2"
MANIFEST = "manifest.json"
BASIS = "basis.safetensors"
TASKS_DIR = "tasks"
EXTRA_PREFIX = "extra:"
EXTRA_SCALE_PREFIX = "extra_scale:"  # row scales of a head kept as int8 rows (codec.row_int8)
CORES_KEY = "cores"
SCALES_KEY = "core_scales"
SCALE_SUFFIX = ".scale"
SLOT_COLUMNS = ("rank", "rho", "norm", "rel_error", "alpha", "k_out", "k_in", "o_out", "o_in")
BASIS_NAME = re.compile(r"basis(-[1-9][0-9]{0,8})?\.safetensors")
FLOAT_DIGITS = 6
DIGEST_KEY = "manifest_sha256"
FLAT_KEYS = frozenset({"slot_table", "spectrum_out"})  # typed as flat lists; not walked for nesting


def basis_file(manifest: dict[str, Any]) -> str:
    """The basis file a manifest names: basis.safetensors, or basis-<n>.safetensors after the basis grew."""
    return manifest.get("basis_file") or BASIS


def next_basis_file(manifest: dict[str, Any]) -> str:
    """The name a grown basis is written under: a new file, so the manifest's rename is the one switch."""
    match = re.fullmatch(r"basis-([0-9]+)\.safetensors", basis_file(manifest))
    return f"basis-{int(match.group(1)) + 1 if match else 1}.safetensors"


def task_file(name: str) -> str:
    return f"{TASKS_DIR}/{name}.safetensors"


def basis_keys(module: str) -> tuple[str, str]:
    return f"{module}.U", f"{module}.V"


def basis_tensors(
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: str
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """File tensors of the bases (int8 adds one scale pair per slot; int4 packs U and V flat, two numbers a
    byte, and adds U's group scales then V's) and the bases as they will read back."""
    tensors: dict[str, torch.Tensor] = {}
    readback: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, (U, V) in bases.items():
        (u, su), (v, sv) = encode(U, dtype), encode(V, dtype)
        key_u, key_v = basis_keys(module)
        tensors[key_u], tensors[key_v] = u, v
        if isinstance(su, torch.Tensor) and isinstance(sv, torch.Tensor):
            tensors[key_u], tensors[key_v] = pack_nibbles(u), pack_nibbles(v)
            tensors[module + SCALE_SUFFIX] = torch.cat([su, sv])
        elif su is not None and sv is not None:
            tensors[module + SCALE_SUFFIX] = torch.tensor([su, sv], dtype=torch.float32)
        readback[module] = (decode(u, su), decode(v, sv))
    return tensors, readback


def append_basis_columns(
    tensors: dict[str, torch.Tensor],
    module: str,
    X: torch.Tensor,
    Y: torch.Tensor,
    dtype: str,
    root: Path,
    at: tuple[int, int] | None = None,
) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The basis file's tensors with columns X, Y added to one slot's U, V (at the end, or before columns
    `at` of U and V: a clustered store grows one cluster's block), and that slot's bases as they will read
    back. The old columns keep their stored values exactly (older cores stay valid): an int8 basis encodes
    the new columns with the slot's existing scales, clipping what they cannot hold (the task's error is
    measured on the bases as stored)."""
    key_u, key_v = basis_keys(module)
    out = dict(tensors)
    where = at or (tensors[key_u].shape[1], tensors[key_v].shape[1])

    def put(old: torch.Tensor, new: torch.Tensor, column: int) -> torch.Tensor:
        return torch.cat([old[:, :column], new, old[:, column:]], dim=1)

    if dtype in FLOAT_DTYPES:
        out[key_u] = put(tensors[key_u], X.to(number_dtype(dtype)), where[0])
        out[key_v] = put(tensors[key_v], Y.to(number_dtype(dtype)), where[1])
        return out, (out[key_u], out[key_v])
    if dtype != "int8":
        raise SubspaceError(
            f"the basis of a {dtype} store cannot grow yet; add with --policy project, or compress again",
            root / MANIFEST,
        )
    scale_u, scale_v = (float(x) for x in tensors[module + SCALE_SUFFIX])
    grown = []
    for key, new, scale, column in ((key_u, X, scale_u, where[0]), (key_v, Y, scale_v, where[1])):
        levels = torch.round(new.to(torch.float64) / scale).clamp_(-127, 127).to(torch.int8)
        out[key] = put(tensors[key], levels, column)
        grown.append(decode(out[key], scale))
    return out, (grown[0], grown[1])


def task_tensors(
    packed: PackedCores, extras: dict[str, torch.Tensor], row_scales: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    tensors = {CORES_KEY: packed.flat}
    if packed.scales is not None:
        tensors[SCALES_KEY] = packed.scales
    tensors.update({f"{EXTRA_PREFIX}{key}": value for key, value in extras.items()})
    tensors.update({f"{EXTRA_SCALE_PREFIX}{key}": value for key, value in (row_scales or {}).items()})
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
    } | ({"basis_file": manifest["basis_file"]} if manifest.get("basis_file") else {})


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


def _canonical(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")


def manifest_digest(raw: dict[str, Any]) -> str:
    """sha256 of an on-disk manifest's canonical JSON without its own digest field."""
    return sha256_bytes(_canonical({k: v for k, v in raw.items() if k != DIGEST_KEY}))


def _digest_matches(data: bytes, digest: str, raw: dict[str, Any]) -> bool:
    """Whether a manifest's bytes hold the content its digest names. Fast path: the file as this module writes
    it, with the digest field cut out, is the canonical text; otherwise (reformatted by hand) re-encode."""
    if not isinstance(digest, str):
        return False
    field = f',"{DIGEST_KEY}":"{digest}"'.encode()
    if data.count(field) == 1 and sha256_bytes(data.replace(field, b"", 1)) == digest:
        return True
    return manifest_digest(raw) == digest


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """Canonical compact JSON of the on-disk manifest, with the digest of its own content."""
    compact = compact_manifest(manifest)
    return _canonical(compact | {DIGEST_KEY: manifest_digest(compact)})


# ---- what a manifest may hold (checked when it is read) -------------------------------------------------

Finite = Annotated[float, AllowInfNan(False)]
NonNegFinite = Annotated[float, AllowInfNan(False), Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _SlotModel(_Open):
    shape: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]
    k_out: PositiveInt
    k_in: PositiveInt
    k_capped: bool
    total_rank: NonNegInt
    captured_energy: Finite
    spectrum_out: list[Finite]
    solver: str | None = None
    # a clustered store's column ranges per cluster: [first U column, width, first V column, width], or
    # null where no task of the cluster touches the slot
    clusters: list[Annotated[list[NonNegInt], Field(min_length=4, max_length=4)] | None] | None = None


class _SlotTable(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    slot: list[NonNegInt]
    rank: list[PositiveInt]
    rho: list[NonNegInt] | None = None
    norm: list[NonNegFinite | None] | None = None
    rel_error: list[NonNegFinite | None] | None = None
    alpha: list[Finite | None] | None = None
    k_out: list[PositiveInt | None] | None = (
        None  # the basis width a task was encoded on, where the basis grew
    )
    k_in: list[PositiveInt | None] | None = None
    # where a task's core starts in its slot's basis: a clustered store's bases are its clusters' bases side
    # by side, and each task's core covers its own cluster's columns only
    o_out: list[NonNegInt | None] | None = None
    o_in: list[NonNegInt | None] | None = None


class _TaskModel(_Open):
    kind: str
    source: str
    source_sha256: str
    source_bytes: NonNegInt
    file: str
    peft_config: str
    dtype: str
    slot_table: _SlotTable
    rel_error: NonNegFinite
    extra_dtypes: dict[str, str]
    added_after_fit: bool
    energy_dropped: NonNegFinite | None = None
    cluster: NonNegInt | None = None  # which of a clustered store's bases the task was fit with


class _StoredConfig(_Open):
    """The fields of a kept PEFT config that reconstruct, merge and serve read."""

    task_type: str | None = None
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None


class _BaseIdentity(_Open):
    path: str | None = None
    config_sha256: str | None = None
    model_type: str | None = None
    architectures: list[str] | None = None


class _ManifestModel(_Open):
    format: str
    base_model: _BaseIdentity | None
    settings: dict[str, Any]
    slots: dict[str, _SlotModel]
    peft_configs: dict[str, _StoredConfig]
    tasks: dict[str, _TaskModel]
    files: dict[str, Sha256]
    basis_file: str | None = None
    manifest_sha256: Sha256 | None = None


def _in_use(path: Path) -> bool:
    """Whether a writer holds `path` locked right now (atomic writes and staging folders lock theirs)."""
    try:
        fd = os.open(str(path), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _is_dtype(name: Any) -> bool:
    return (
        isinstance(name, str)
        and not name.startswith("_")
        and isinstance(getattr(torch, name, None), torch.dtype)
    )


def check_manifest(raw: dict[str, Any], path: Path) -> None:
    """Refuse, in one line naming the manifest, anything a store's readers could trip on or be misled by:
    wrong types or ranges, task names that are not plain, a task file other than tasks/<name>.safetensors,
    a `files` map naming anything but the basis and the tasks' files, slot tables that do not add up."""

    def damaged(problem: str) -> SubspaceError:
        return SubspaceError(f"manifest is damaged: {problem}", path)

    try:
        _ManifestModel.model_validate(raw)
    except ValidationError as exc:
        raise damaged(validation_message(exc.errors())) from None
    try:
        SubspaceSettings.model_validate(raw["settings"], strict=True)
    except ValidationError as exc:
        errors = [dict(e, loc=("settings", *e["loc"])) for e in exc.errors()]
        raise damaged(validation_message(errors)) from None
    if (
        "dtype" not in raw["settings"]
    ):  # every store records how its numbers are kept; nothing can be read without
        raise damaged("settings.dtype is missing")
    slots = raw["slots"]
    for module, meta in slots.items():
        if meta["k_out"] > meta["shape"][0] or meta["k_in"] > meta["shape"][1]:
            raise damaged(f"slot '{module}' has k ({meta['k_out']}, {meta['k_in']}) beyond its shape")
        for block in meta.get("clusters") or []:
            if block is not None and (
                min(block[1], block[3]) < 1
                or block[0] + block[1] > meta["k_out"]
                or block[2] + block[3] > meta["k_in"]
            ):
                raise damaged(f"slot '{module}' has a cluster's columns {block} beyond its basis")
    basis_name = raw.get("basis_file") or BASIS
    if not BASIS_NAME.fullmatch(basis_name):
        raise damaged(f"basis_file '{basis_name[:120]}' is not basis.safetensors or basis-<n>.safetensors")
    expected_files = {basis_name}
    for name, entry in raw["tasks"].items():
        if not TASK_NAME.match(name) or name in {".", ".."} or len(name) > 200:
            raise damaged(f"task name '{name[:80]}' is not a plain file name")
        if entry["file"] != task_file(name):
            raise damaged(f"task '{name}' names the file '{entry['file'][:120]}', not {task_file(name)}")
        expected_files.add(entry["file"])
        if entry["peft_config"] not in raw["peft_configs"]:
            raise damaged(
                f"task '{name}' refers to a PEFT config '{entry['peft_config'][:40]}' it does not hold"
            )
        if entry["dtype"] not in FLOAT_DTYPES:
            raise damaged(
                f"task '{name}' has dtype '{entry['dtype'][:40]}', not one of {', '.join(FLOAT_DTYPES)}"
            )
        bad = [d for d in entry["extra_dtypes"].values() if not _is_dtype(d)]
        if bad:
            raise damaged(f"task '{name}' has an extra of unknown dtype '{str(bad[0])[:40]}'")
        if entry.get("cluster") is not None and not any(
            entry["cluster"] < len(meta.get("clusters") or []) for meta in slots.values()
        ):
            raise damaged(f"task '{name}' names cluster {entry['cluster']}, which no slot has")
        table = entry["slot_table"]
        rows = len(table["slot"])
        if len(set(table["slot"])) != rows or any(index >= len(slots) for index in table["slot"]):
            raise damaged(f"task '{name}' has slot numbers that repeat or exceed the {len(slots)} slots")
        for column in SLOT_COLUMNS:
            if table.get(column) is not None and len(table[column]) != rows:
                raise damaged(
                    f"task '{name}' slot column '{column}' has {len(table[column])} rows, not {rows}"
                )
        ordered = sorted(slots)
        for column, offset in (("k_out", "o_out"), ("k_in", "o_in")):
            widths, offsets = table.get(column), table.get(offset)
            for row, index in enumerate(table["slot"]):
                meta = slots[ordered[index]]
                width = (widths[row] if widths else None) or meta[column]
                start = (offsets[row] if offsets else None) or 0
                if start + width > meta[column]:
                    raise damaged(f"task '{name}' has {column} {width} beyond its slot's {meta[column]}")
    files = set(raw["files"])
    if files != expected_files:
        extra = sorted(files - expected_files)
        if extra:
            raise damaged(f"`files` names '{extra[0][:120]}', which is neither the basis nor a task's file")
        raise damaged(f"`files` has no sha256 for '{sorted(expected_files - files)[0]}'")


def slot_layouts(entry: dict[str, Any], slots: dict[str, Any]) -> list[SlotLayout]:
    """Each slot's core layout in a task file, at the basis width the task was encoded on."""
    layouts = []
    for m in sorted(entry["slots"]):
        stats = entry["slots"][m]
        k_out = stats.get("k_out") or slots[m]["k_out"]
        k_in = stats.get("k_in") or slots[m]["k_in"]
        layouts.append(SlotLayout(m, k_out, k_in, int(stats.get("rho", 0))))
    return layouts


def pad_to_basis(
    matrices: list[torch.Tensor], k_out: int, k_in: int, o_out: int = 0, o_in: int = 0
) -> list[torch.Tensor]:
    """A core that covers only part of its slot's basis, widened to the whole basis: a core encoded before
    the basis grew (the task reads as zero on the directions added after it), or a clustered store's core,
    which starts at its cluster's columns (o_out, o_in) and reads as zero on the other clusters'."""
    if len(matrices) == 1:
        core = matrices[0]
        if tuple(core.shape) == (k_out, k_in):
            return matrices
        rows, cols = core.shape
        return [torch.nn.functional.pad(core, (o_in, k_in - o_in - cols, o_out, k_out - o_out - rows))]
    P, Q = matrices
    if P.shape[0] == k_out and Q.shape[1] == k_in:
        return matrices
    return [
        torch.nn.functional.pad(P, (0, 0, o_out, k_out - o_out - P.shape[0])),
        torch.nn.functional.pad(Q, (o_in, k_in - o_in - Q.shape[1])),
    ]


class StoreFiles:
    """Reads a store folder: checks the manifest when it opens, loads tensors lazily, and checks each file
    it reads against the manifest's sha256."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SubspaceError("store folder not found", self.root)
        self._basis: dict[str, torch.Tensor] | None = None
        self._load_manifest(self._read_plain(self.root / MANIFEST, "file not found"))

    def _load_manifest(self, data: bytes) -> None:
        manifest_path = self.root / MANIFEST
        raw = parse_json(data, manifest_path, skip=FLAT_KEYS)
        found = raw.get("format") if isinstance(raw, dict) else None
        if found != FORMAT:
            hint = "; recompress it with this version" if str(found).startswith("mergekit-subspace/") else ""
            raise SubspaceError(
                f"is not a {FORMAT} manifest (format: {str(found)[:60]}){hint}", manifest_path
            )
        check_manifest(raw, manifest_path)
        digest = raw.pop(DIGEST_KEY, None)
        if digest is not None and not _digest_matches(data, digest, raw):
            raise SubspaceError(
                f"altered: its content does not match its own {DIGEST_KEY} (run verify)", manifest_path
            )
        self.manifest_sha256: str | None = digest
        self.file_sha256 = sha256_bytes(data)
        self.manifest: dict[str, Any] = expand_manifest(raw, manifest_path)

    # ---- paths: only plain files inside the store, never through a symlink ----
    def path(self, rel: str) -> Path:
        """STORE/rel for a name the manifest allows, refusing a symlinked tasks/ or file."""
        if (
            not BASIS_NAME.fullmatch(rel)
            and rel != MANIFEST
            and not (
                rel.startswith(f"{TASKS_DIR}/")
                and rel.endswith(".safetensors")
                and "/" not in rel[len(TASKS_DIR) + 1 :]
            )
        ):
            raise SubspaceError(f"'{rel[:120]}' is not a file a store holds", self.root / MANIFEST)
        path = self.root / rel
        if rel.startswith(f"{TASKS_DIR}/") and (self.root / TASKS_DIR).is_symlink():
            raise SubspaceError(
                "is a symlink; a store's files must lie inside the store", self.root / TASKS_DIR
            )
        if path.is_symlink():
            raise SubspaceError("is a symlink; a store's files must lie inside the store", path)
        return path

    @staticmethod
    def _read_plain(path: Path, missing: str) -> bytes:
        try:
            fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise SubspaceError(missing, path) from None
        except OSError as exc:
            if path.is_symlink():
                raise SubspaceError("is a symlink; a store's files must lie inside the store", path) from None
            raise SubspaceError(f"cannot be read ({exc.strerror or exc})", path) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise SubspaceError("is not a file", path)
        with os.fdopen(fd, "rb") as handle:
            return handle.read()

    def read_verified(self, rel: str) -> bytes:
        """The bytes of one store file, checked against the manifest's sha256 (one read, one hash)."""
        path = self.path(rel)
        data = self._read_plain(path, "file not found: the store is incomplete (run verify)")
        if sha256_bytes(data) != self.manifest["files"][rel]:
            raise SubspaceError("altered: its sha256 differs from the manifest (run verify)", path)
        return data

    def basis_tensors(self) -> dict[str, torch.Tensor]:
        if self._basis is None:
            name = basis_file(self.manifest)
            self._basis = tensors_from_bytes(self.read_verified(name), self.root / name)
        return self._basis

    def basis(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) of one slot: as stored for float stores, dequantized to float32 for int8 and int4."""
        key_u, key_v = basis_keys(module)
        tensors = self.basis_tensors()
        path = self.root / basis_file(self.manifest)
        meta = self.manifest["slots"].get(module)
        if key_u not in tensors or key_v not in tensors or meta is None:
            raise SubspaceError(f"has no basis for slot '{module}'", path)
        U, V = tensors[key_u], tensors[key_v]
        expected = ((meta["shape"][0], meta["k_out"]), (meta["shape"][1], meta["k_in"]))
        if self.manifest["settings"]["dtype"] == "int4":
            return self._int4_basis(module, U, V, tensors.get(module + SCALE_SUFFIX), expected, path)
        if (tuple(U.shape), tuple(V.shape)) != expected:
            raise SubspaceError(
                f"basis of slot '{module}' is {tuple(U.shape)}, {tuple(V.shape)}; the manifest says {expected}",
                path,
            )
        dtype = self.manifest["settings"]["dtype"]
        if U.dtype != number_dtype(dtype) or V.dtype != number_dtype(dtype):
            raise SubspaceError(f"basis of slot '{module}' is {U.dtype}, not the store's {dtype}", path)
        scales = tensors.get(module + SCALE_SUFFIX)
        if dtype != "int8":
            return U, V
        if scales is None or scales.dtype != torch.float32 or tuple(scales.shape) != (2,):
            raise SubspaceError(f"int8 basis of slot '{module}' has no (2,) float32 scales", path)
        return decode(U, float(scales[0])), decode(V, float(scales[1]))

    @staticmethod
    def _int4_basis(
        module: str,
        U: torch.Tensor,
        V: torch.Tensor,
        scales: torch.Tensor | None,
        shapes: tuple[tuple[int, int], tuple[int, int]],
        path: Path,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) of an int4 slot, dequantized to float32: packed bytes and their group scales, checked."""
        counts = [rows * cols for rows, cols in shapes]
        groups = [int4_groups(c) for c in counts]
        if scales is None or scales.dtype != torch.float32 or tuple(scales.shape) != (sum(groups),):
            raise SubspaceError(f"int4 basis of slot '{module}' has no ({sum(groups)},) float32 scales", path)
        try:
            levels = [unpack_nibbles(t, c) for t, c in zip((U, V), counts, strict=True)]
        except ValueError as exc:
            problem = f"int4 basis of slot '{module}' does not match the manifest: {exc}"
            raise SubspaceError(problem, path) from None
        parts = (scales[: groups[0]], scales[groups[0] :])
        U_, V_ = (
            decode(lv.reshape(shape), part) for lv, shape, part in zip(levels, shapes, parts, strict=True)
        )
        return U_, V_

    def task_stored(self, name: str) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor]]:
        """Per slot the stored core matrices, decoded ([C] dense or [P, Q] factors), and the task's extras
        in their original dtypes."""
        entry = self.manifest["tasks"].get(name)
        if entry is None:
            known = ", ".join(sorted(self.manifest["tasks"])) or "none"
            raise SubspaceError(f"has no task '{name}' (known: {known})", self.root)
        path = self.root / entry["file"]
        tensors = tensors_from_bytes(self.read_verified(entry["file"]), path)
        dtype = store_dtypes(self.manifest["settings"]).cores
        if CORES_KEY not in tensors:
            raise SubspaceError(f"has no '{CORES_KEY}' tensor", path)
        if tensors[CORES_KEY].dtype != number_dtype(dtype) or tensors[CORES_KEY].dim() != 1:
            raise SubspaceError(f"'{CORES_KEY}' is not a flat {dtype} tensor", path)
        scales = tensors.get(SCALES_KEY)
        if (dtype in INT_DTYPES) != (scales is not None) or (
            scales is not None and (scales.dtype != torch.float32 or scales.dim() != 1)
        ):
            raise SubspaceError(f"'{SCALES_KEY}' does not fit {dtype} cores", path)
        packed = PackedCores(tensors[CORES_KEY], scales, slot_layouts(entry, self.manifest["slots"]), dtype)
        try:
            matrices = unpack_cores(packed)
        except (ValueError, IndexError, RuntimeError) as exc:
            raise SubspaceError(f"does not match the manifest: {exc}", path) from None
        slots = self.manifest["slots"]
        matrices = {
            m: pad_to_basis(
                mats,
                slots[m]["k_out"],
                slots[m]["k_in"],
                entry["slots"][m].get("o_out") or 0,
                entry["slots"][m].get("o_in") or 0,
            )
            for m, mats in matrices.items()
        }
        return matrices, self._extras(entry, tensors, path)

    @staticmethod
    def _extras(
        entry: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path
    ) -> dict[str, torch.Tensor]:
        """A task file's heads and biases in their original dtypes, checked against the manifest: int8 rows
        come with one finite float32 scale per row, and only a float extra may be stored that way."""
        dtypes = entry["extra_dtypes"]
        held = {key[len(EXTRA_PREFIX) :] for key in tensors if key.startswith(EXTRA_PREFIX)}
        scaled = {key[len(EXTRA_SCALE_PREFIX) :] for key in tensors if key.startswith(EXTRA_SCALE_PREFIX)}
        expected = {EXTRA_PREFIX + k for k in held} | {EXTRA_SCALE_PREFIX + k for k in scaled}
        if held != set(dtypes) or not scaled <= held or set(tensors) - {CORES_KEY, SCALES_KEY} != expected:
            raise SubspaceError(
                "does not match the manifest: its tensors are not the cores and listed extras", path
            )
        extras = {}
        for key in sorted(held):
            stored, dtype = tensors[EXTRA_PREFIX + key], getattr(torch, dtypes[key])
            scales = tensors.get(EXTRA_SCALE_PREFIX + key)
            if scales is not None and not (
                dtype.is_floating_point
                and stored.dtype == torch.int8
                and stored.dim() == 2
                and scales.dtype == torch.float32
                and tuple(scales.shape) == (stored.shape[0],)
                and bool(torch.isfinite(scales).all())
            ):
                raise SubspaceError(f"extra '{key}' has int8 rows whose scales do not fit them", path)
            if scales is None and dtype.is_floating_point and not stored.is_floating_point():
                raise SubspaceError(f"extra '{key}' is stored as {stored.dtype} without row scales", path)
            extras[key] = decode_extra(stored, scales, dtype)
        return extras

    def task(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Dense float32 cores (k_out x k_in) per slot and the extras of one task."""
        matrices, extras = self.task_stored(name)
        return {module: dense_core(stored) for module, stored in matrices.items()}, extras

    def file_paths(self) -> list[Path]:
        return [self.root / MANIFEST] + [self.root / rel for rel in sorted(self.manifest["files"])]

    def bytes_on_disk(self) -> int:
        return sum(p.lstat().st_size for p in self.file_paths() if p.is_file() and not p.is_symlink())

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        """An flock on the store folder: adds take it exclusively, verify shared, so each sees a whole add."""
        try:
            fd = os.open(str(self.root), os.O_RDONLY)
        except OSError:
            yield
            return
        try:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def verify(self) -> list[str]:
        """Problems found by re-hashing every file the manifest lists, checking the manifest's own digest, and
        looking for symlinks and files that are not part of the store (empty when the store is intact)."""
        with self._locked(exclusive=False):
            return self._verify()

    def _verify(self) -> list[str]:
        manifest_path = self.root / MANIFEST
        problems = []
        try:
            current = self._read_plain(manifest_path, "missing")
        except SubspaceError as exc:
            return [str(exc)]
        if sha256_bytes(current) != self.file_sha256:
            try:
                self._load_manifest(current)  # changed since it was opened: check what is there now
            except SubspaceError as exc:
                return [str(exc)]
        if self.manifest_sha256 is None:
            problems.append(
                f"{manifest_path}: has no {DIGEST_KEY} of its own (written by an older version), so an edited "
                "manifest cannot be told; recompress to add it"
            )
        tasks_dir = self.root / TASKS_DIR
        tasks_linked = tasks_dir.is_symlink()
        if tasks_linked:
            problems.append(f"{tasks_dir}: is a symlink; a store's files must lie inside the store")
        for rel, digest in sorted(self.manifest["files"].items()):
            path = self.root / rel
            if tasks_linked and rel.startswith(f"{TASKS_DIR}/"):
                continue
            if path.is_symlink():
                problems.append(f"{path}: is a symlink; a store's files must lie inside the store")
            elif not path.exists():
                problems.append(f"{path}: missing")
            elif not path.is_file():
                problems.append(f"{path}: is not a file")
            elif sha256_file(path) != digest:
                problems.append(f"{path}: altered (sha256 differs from the manifest)")
        listed = set(self.manifest["files"])
        children = sorted(self.root.iterdir())
        if tasks_dir.is_dir() and not tasks_linked:
            children += sorted(tasks_dir.iterdir())
        for child in children:
            rel = child.relative_to(self.root).as_posix()
            if rel in listed or rel in (MANIFEST, TASKS_DIR):
                continue
            if is_leftover(child) and _in_use(child):
                continue  # a running add or add-many is writing it
            problems.append(f"{child}: {self._stray_kind(child)}")
        return problems

    def _stray_kind(self, child: Path) -> str:
        if is_leftover(child):
            return "leftover of an interrupted write, not part of the store (the next add removes it)"
        if child.parent == self.root and BASIS_NAME.fullmatch(child.name) and not child.is_symlink():
            return "orphan: a basis the manifest does not name (an interrupted or finished grow leaves one; the next add removes it)"
        if child.parent.name == TASKS_DIR and child.name.endswith(".safetensors") and not child.is_symlink():
            return "orphan: a task file the manifest does not list (an interrupted add leaves one; the next add removes it)"
        return (
            "orphan: not part of the store (a store holds only manifest.json, basis.safetensors and tasks/)"
        )

    def write_task_and_manifest(
        self, name: str, data: bytes, manifest: dict[str, Any], basis: bytes | None = None
    ) -> None:
        """Add one task: its file first (and a grown basis under the new name the manifest gives), then the
        manifest that makes them part of the store, then the basis it no longer names is removed.

        Holds the store's lock while it writes, refuses a store changed since it was opened (another add or a
        compress --overwrite), and first removes what killed adds left (temporary files, unlisted task files).
        """
        target = self.path(task_file(name))
        manifest_path = self.root / MANIFEST
        with self._locked(exclusive=True):
            current = self._read_plain(manifest_path, "file not found")
            if sha256_bytes(current) != self.file_sha256:
                raise SubspaceError(
                    "changed since it was opened (another add or compress ran meanwhile); run add again",
                    manifest_path,
                )
            self.remove_leftovers()
            old_basis = basis_file(self.manifest)
            if basis is not None:
                atomic_write_bytes(self.path(basis_file(manifest)), basis)
            atomic_write_bytes(target, data)
            data = manifest_bytes(manifest)
            atomic_write_bytes(manifest_path, data)
            self._load_manifest(data)  # exactly what a reopen sees
            self._basis = None
            if basis_file(manifest) != old_basis:
                with contextlib.suppress(FileNotFoundError):
                    self.path(old_basis).unlink()

    def remove_leftovers(self) -> None:
        """Remove what killed writers left inside the store: temporary files and staging folders no running
        writer holds, and task files the manifest does not list. Call it holding the store's lock."""
        clean_leftovers(self.root, anywhere=True)
        for child in self.root.iterdir():
            if (
                BASIS_NAME.fullmatch(child.name)
                and child.name not in self.manifest["files"]
                and (child.is_symlink() or child.is_file())
            ):
                with contextlib.suppress(FileNotFoundError):
                    child.unlink()
        tasks_dir = self.root / TASKS_DIR
        if not tasks_dir.is_dir() or tasks_dir.is_symlink():
            return
        clean_leftovers(tasks_dir, anywhere=True)
        listed = set(self.manifest["files"])
        for child in tasks_dir.iterdir():
            rel = f"{TASKS_DIR}/{child.name}"
            stem = child.name[: -len(".safetensors")]
            if (
                rel not in listed
                and child.name.endswith(".safetensors")
                and TASK_NAME.match(stem)
                and (child.is_symlink() or child.is_file())
            ):
                with contextlib.suppress(FileNotFoundError):
                    child.unlink()
