"""How the store keeps its numbers: a float cast, int8 with one float32 scale per matrix, or int4 with one
float32 scale per group of INT4_GROUP numbers.

int4 keeps levels -7..7 (symmetric, so 0 is exact), two to a uint8 byte (low nibble first, stored as
level + 8). Groups run over a matrix's numbers in row-major order: along the last axis, wrapping to the next
row, so a 4 x 4 core or an m x 8 basis does not pay one scale per short row. Group size 64 with float32
scales costs 0.5 bit per number (4.5 bits in all); float16 scales would halve that but flush the scales of
small cores to subnormals (cores carry the delta's true scale, often 1e-4 or less), and groups of 32 lower
the error only about 15% (the absmax of 32 Gaussians is ~2.1 sigma, of 64 ~2.4) for a full extra half bit.

Scales are not simply absmax / levels: each group (int4) or matrix (int8) takes, among absmax x c / levels for
c in CLIP_GRID, the float32 scale whose rounding leaves the least squared error. Clipping the few largest
values of a group buys finer steps for all the others; where the largest values carry the energy, c = 1 wins.
Decoding is the same multiply either way, so stores written before read as they were.

A task's cores are packed into one flat tensor (and, for int8, one vector of scales), so a task file carries
one small safetensors header instead of one entry per slot. Each slot's core is kept either dense
(k_out x k_in) or, when that is smaller, as the two factors P (k_out x rho) and Q (rho x k_in) of its rank-rho
form: the projection of a rank-r delta has rank <= r, so a low-rank task costs rho (k_out + k_in) numbers
instead of k_out k_in, and nothing is lost.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from mergekit_subspace.lowrank import COMPUTE_DTYPE

STORE_DTYPES = ("float32", "float16", "bfloat16", "int8", "int4")
INT_DTYPES = ("int8", "int4")
INT8_MAX = 127.0
INT4_MAX = 7.0
INT4_GROUP = 64
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)  # fractions of absmax a scale may cover
# bytes one stored number costs; int4 includes its share of the group scales (4 bytes per INT4_GROUP)
ITEM_BYTES: dict[str, float] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int8": 1,
    "int4": 0.5 + 4 / INT4_GROUP,
}


class StoreDtypes(NamedTuple):
    """How a store keeps its numbers: `basis` for the bases and heads (the recipe's `dtype`), `cores` for
    the tasks' cores (`core_dtype`, the same unless set). Finer cores cost little where the bases hold
    most of the bytes, and take away the larger share of the rounding error."""

    basis: str
    cores: str

    @property
    def label(self) -> str:
        """`int4`, or `int4/int8` for int4 bases with int8 cores."""
        return self.basis if self.cores == self.basis else f"{self.basis}/{self.cores}"


def store_dtypes(settings: Mapping[str, Any] | Any) -> StoreDtypes:
    """The dtypes of a manifest's settings (a mapping) or of SubspaceSettings."""
    get = settings.get if isinstance(settings, Mapping) else lambda key: getattr(settings, key, None)
    basis = str(get("dtype"))
    return StoreDtypes(basis, str(get("core_dtype") or basis))


def number_dtype(name: str) -> torch.dtype:
    """The torch dtype the store writes numbers in (int4 levels are packed into uint8 bytes)."""
    return torch.uint8 if name == "int4" else getattr(torch, name)


def extras_dtype(name: str) -> torch.dtype | None:
    """Dtype that heads and biases are kept in: None (verbatim) for float32 stores, float16 for int stores
    (where `row_int8` does not apply)."""
    if name == "float32":
        return None
    return torch.float16 if name in INT_DTYPES else number_dtype(name)


ROW_INT8_MIN_COLS = 16  # narrower matrices keep float16: a scale per row would cost about what it saves


def row_int8(extra: torch.Tensor, store_dtype: str) -> bool:
    """Whether a head or embedding is kept as int8 rows with one float32 scale each: 2-D floats of int
    stores. Rows are what a head's logits (or an embedding's lookups) read one at a time, so each keeps its
    own absmax; 1-D biases and narrow matrices stay float16."""
    return (
        store_dtype in INT_DTYPES
        and extra.is_floating_point()
        and extra.dim() == 2
        and extra.shape[1] >= ROW_INT8_MIN_COLS
    )


def encode_extra(extra: torch.Tensor, store_dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stored tensor, row scales or None) of one head, bias or embedding in a store of `store_dtype`."""
    if row_int8(extra, store_dtype):
        x = extra.to(COMPUTE_DTYPE)
        amax = x.abs().amax(dim=1)
        scales = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax)).to(torch.float32)
        levels = torch.round(x / scales.to(COMPUTE_DTYPE)[:, None]).clamp_(-INT8_MAX, INT8_MAX)
        return levels.to(torch.int8), scales
    keep_as = extras_dtype(store_dtype)
    return (extra.to(keep_as) if keep_as is not None and extra.is_floating_point() else extra), None


def decode_extra(stored: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The extra in its original dtype: int8 rows times their scales, or the stored tensor cast back."""
    if scales is None:
        return stored.to(dtype)
    return (stored.to(torch.float32) * scales[:, None]).to(dtype)


def int4_groups(numel: int) -> int:
    """Scales an int4 matrix of `numel` numbers carries: one per group, the last group possibly partial."""
    return -(-numel // INT4_GROUP)


def pack_nibbles(levels: torch.Tensor) -> torch.Tensor:
    """int4 levels (-7..7, any shape) as uint8 bytes, two per byte, low nibble first; an odd count pads 0."""
    flat = (levels.reshape(-1).to(torch.int16) + 8).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, torch.full((1,), 8, dtype=torch.uint8)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` int4 levels of packed bytes, as int8; ValueError when the length does not fit."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-count // 2):
        raise ValueError(f"packed int4 holds {packed.numel()} bytes, {count} numbers need {-(-count // 2)}")
    levels = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:count]
    if bool((levels == 0).any()):
        raise ValueError("packed int4 holds the level -8, which this format never writes")
    return levels.to(torch.int8) - 8


def best_scales(rows: torch.Tensor, top: float) -> torch.Tensor:
    """One float32 scale per row of `rows` (float64): of absmax x c / top for c in CLIP_GRID, the one whose
    rounding to levels -top..top leaves the least squared error (1.0 for an all-zero row)."""
    amax = rows.abs().amax(dim=1)
    amax = torch.where(amax > 0, amax, torch.full_like(amax, top))  # an all-zero row: scale 1.0, exact

    def scale_and_error(c: float) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (amax * (c / top)).to(torch.float32).to(COMPUTE_DTYPE)  # the value the file will hold
        rounded = torch.round(rows / scale[:, None]).clamp_(-top, top) * scale[:, None]
        return scale, ((rounded - rows) ** 2).sum(dim=1)

    best, best_err = scale_and_error(CLIP_GRID[0])
    for c in CLIP_GRID[1:]:
        scale, err = scale_and_error(c)
        better = err < best_err
        best, best_err = torch.where(better, scale, best), torch.where(better, err, best_err)
    return best.to(torch.float32)


def int4_encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 levels (int8, x's shape) and one float32 scale per group (`best_scales`)."""
    flat = x.reshape(-1).to(COMPUTE_DTYPE)
    groups = int4_groups(flat.numel())
    padded = torch.nn.functional.pad(flat, (0, groups * INT4_GROUP - flat.numel())).reshape(
        groups, INT4_GROUP
    )
    scales = best_scales(padded, INT4_MAX)
    levels = torch.round(padded / scales.to(COMPUTE_DTYPE)[:, None]).clamp_(-INT4_MAX, INT4_MAX)
    return levels.reshape(-1)[: flat.numel()].to(torch.int8).reshape(x.shape), scales


def int4_decode(levels: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values of int4 levels (any shape) and their group scales."""
    flat = levels.reshape(-1).to(torch.float32)
    groups = int4_groups(flat.numel())
    if scales.numel() != groups:
        raise ValueError(f"int4 matrix of {flat.numel()} numbers has {scales.numel()} scales, not {groups}")
    padded = torch.nn.functional.pad(flat, (0, groups * INT4_GROUP - flat.numel())).reshape(
        groups, INT4_GROUP
    )
    return (padded * scales.to(torch.float32)[:, None]).reshape(-1)[: flat.numel()].reshape(levels.shape)


def extra_bytes(tensor: torch.Tensor, dtype: str) -> int:
    """Bytes one head or bias takes in a store of `dtype` (its numbers and row scales, no header)."""
    if row_int8(tensor, dtype):
        return tensor.numel() + 4 * tensor.shape[0]
    keep_as = extras_dtype(dtype) if tensor.is_floating_point() else None
    return tensor.numel() * (keep_as.itemsize if keep_as is not None else tensor.element_size())


def int8_scale(x: torch.Tensor) -> float:
    """One float32 scale per matrix (`best_scales` over the whole matrix; 1.0 for an empty one)."""
    if x.numel() == 0:
        return 1.0
    return float(best_scales(x.reshape(1, -1).to(COMPUTE_DTYPE), INT8_MAX)[0])


Scale = float | torch.Tensor | None  # int8: one float; int4: a float32 tensor of group scales; floats: None


def encode(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, Scale]:
    """(stored tensor, scale): a cast for float dtypes, int8 levels and their scale for int8, int4 levels
    (one int8 per number, x's shape; packed into bytes when a file is written) and group scales for int4."""
    if dtype == "int4":
        return int4_encode(x)
    if dtype != "int8":
        return x.to(number_dtype(dtype)), None
    scale = int8_scale(x)
    levels = torch.round(x.to(COMPUTE_DTYPE) / scale).clamp_(-INT8_MAX, INT8_MAX)
    return levels.to(torch.int8), scale


def decode(stored: torch.Tensor, scale: Scale) -> torch.Tensor:
    """The values a stored tensor stands for: as stored for floats, float32 levels x scale(s) for ints."""
    if scale is None:
        return stored
    if isinstance(scale, torch.Tensor):
        return int4_decode(stored, scale)
    return stored.to(torch.float32) * torch.tensor(scale, dtype=torch.float32)


def scale_list(scale: Scale) -> list[float]:
    """A matrix's scales as the floats a task's scale vector holds (none for float stores)."""
    if scale is None:
        return []
    return [float(x) for x in scale] if isinstance(scale, torch.Tensor) else [scale]


def split_core(core: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Balanced factors (P, Q) with P Q = core, of rank min(rank, k_out, k_in); None when dense is smaller."""
    k_out, k_in = core.shape
    rho = max(1, min(rank, k_out, k_in))
    if rho * (k_out + k_in) >= k_out * k_in:
        return None
    left, sing, right_h = torch.linalg.svd(core.to(COMPUTE_DTYPE), full_matrices=False)
    root = torch.sqrt(sing[:rho])
    return left[:, :rho] * root, root[:, None] * right_h[:rho]


@dataclass(frozen=True)
class SlotLayout:
    """Where one slot's core sits in a task's packed tensor: dense when rho == 0, else factors of rank rho."""

    module: str
    k_out: int
    k_in: int
    rho: int

    def shapes(self) -> list[tuple[int, int]]:
        if self.rho == 0:
            return [(self.k_out, self.k_in)]
        return [(self.k_out, self.rho), (self.rho, self.k_in)]

    def numbers(self) -> int:
        return sum(a * b for a, b in self.shapes())


@dataclass
class PackedCores:
    """A task's cores as they go into its file: one flat tensor (int4: packed bytes), int scales (or None),
    and each slot's layout."""

    flat: torch.Tensor
    scales: torch.Tensor | None
    layouts: list[SlotLayout]
    dtype: str = ""  # "int4" when `flat` holds packed nibbles


@dataclass
class EncodedCore:
    """One slot's core as it goes into a task file: the stored matrices (flattened), their int8 scales and
    its layout."""

    pieces: list[torch.Tensor]
    scales: list[float]
    layout: SlotLayout


def encode_core(module: str, core: torch.Tensor, rank: int, dtype: str) -> tuple[EncodedCore, torch.Tensor]:
    """Encode one float64 core (dense, or its rank-rho factors when smaller); also returns the core as it
    will read back, for honest errors."""
    factors = split_core(core, rank)
    matrices = [core] if factors is None else list(factors)
    pieces, scales, decoded = [], [], []
    for matrix in matrices:
        stored, scale = encode(matrix, dtype)
        pieces.append(stored.reshape(-1))
        decoded.append(decode(stored, scale).to(COMPUTE_DTYPE))
        scales.extend(scale_list(scale))
    rho = 0 if factors is None else factors[0].shape[1]
    readback = decoded[0] if factors is None else decoded[0] @ decoded[1]
    return EncodedCore(pieces, scales, SlotLayout(module, core.shape[0], core.shape[1], rho)), readback


def assemble_cores(encoded: list[EncodedCore], dtype: str) -> PackedCores:
    """A task's packed tensor from its slots' encoded cores, in slot (sorted module) order."""
    ordered = sorted(encoded, key=lambda e: e.layout.module)
    pieces = [piece for e in ordered for piece in e.pieces]
    scales = [scale for e in ordered for scale in e.scales]
    flat = (
        torch.cat(pieces)
        if pieces
        else torch.zeros(0, dtype=torch.int8 if dtype == "int4" else number_dtype(dtype))
    )
    if dtype == "int4":
        flat = pack_nibbles(flat)
    scale_tensor = torch.tensor(scales, dtype=torch.float32) if dtype in INT_DTYPES else None
    return PackedCores(flat, scale_tensor, [e.layout for e in ordered], dtype)


def unpack_cores(packed: PackedCores) -> dict[str, list[torch.Tensor]]:
    """Per slot, the stored matrices decoded: [core] when dense, [P, Q] when factored. ValueError when the
    numbers or the scales do not add up to the layout."""
    expected = sum(layout.numbers() for layout in packed.layouts)
    flat = unpack_nibbles(packed.flat, expected) if packed.dtype == "int4" else packed.flat
    out: dict[str, list[torch.Tensor]] = {}
    offset = scale_index = 0
    for layout in packed.layouts:
        matrices = []
        for rows, cols in layout.shapes():
            piece = flat[offset : offset + rows * cols].reshape(rows, cols)
            offset += rows * cols
            scale: Scale = None
            if packed.dtype == "int4" and packed.scales is not None:
                count = int4_groups(rows * cols)
                scale = packed.scales[scale_index : scale_index + count]
                scale_index += count
            elif packed.scales is not None:
                scale = float(packed.scales[scale_index])
                scale_index += 1
            matrices.append(decode(piece, scale))
        out[layout.module] = matrices
    if offset != flat.numel():
        raise ValueError(f"packed cores hold {flat.numel()} numbers, the layout expects {offset}")
    if packed.scales is not None and scale_index != packed.scales.numel():
        raise ValueError(f"the cores carry {packed.scales.numel()} scales, the layout expects {scale_index}")
    return out


def dense_core(matrices: list[torch.Tensor]) -> torch.Tensor:
    """k_out x k_in core from its stored form, in float32."""
    if len(matrices) == 1:
        return matrices[0].to(torch.float32)
    P, Q = matrices
    return P.to(torch.float32) @ Q.to(torch.float32)
