"""How the store keeps its numbers: a float cast, or int8 with one float32 scale per matrix.

A task's cores are packed into one flat tensor (and, for int8, one vector of scales), so a task file carries
one small safetensors header instead of one entry per slot. Each slot's core is kept either dense
(k_out x k_in) or, when that is smaller, as the two factors P (k_out x rho) and Q (rho x k_in) of its rank-rho
form: the projection of a rank-r delta has rank <= r, so a low-rank task costs rho (k_out + k_in) numbers
instead of k_out k_in, and nothing is lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergekit_subspace.lowrank import COMPUTE_DTYPE

STORE_DTYPES = ("float32", "float16", "bfloat16", "int8")
ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
INT8_MAX = 127.0


def number_dtype(name: str) -> torch.dtype:
    """The torch dtype the store writes numbers in."""
    return getattr(torch, name)


def extras_dtype(name: str) -> torch.dtype | None:
    """Dtype that heads and biases are kept in: None (verbatim) for float32 stores, float16 for int8 stores."""
    if name == "float32":
        return None
    return torch.float16 if name == "int8" else number_dtype(name)


def extra_bytes(tensor: torch.Tensor, dtype: str) -> int:
    """Bytes one head or bias takes in a store of `dtype` (its numbers only, no header)."""
    keep_as = extras_dtype(dtype) if tensor.is_floating_point() else None
    return tensor.numel() * (keep_as.itemsize if keep_as is not None else tensor.element_size())


def int8_scale(x: torch.Tensor) -> float:
    """One float32 scale per matrix: absmax / 127 (1.0 for an all-zero matrix)."""
    amax = float(x.abs().max()) if x.numel() else 0.0
    scale = amax / INT8_MAX if amax > 0 else 1.0
    return float(torch.tensor(scale, dtype=torch.float32))  # the value the file will hold


def encode(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, float | None]:
    """(stored tensor, scale): a cast for float dtypes, int8 levels and their scale for int8."""
    if dtype != "int8":
        return x.to(number_dtype(dtype)), None
    scale = int8_scale(x)
    levels = torch.round(x.to(COMPUTE_DTYPE) / scale).clamp_(-INT8_MAX, INT8_MAX)
    return levels.to(torch.int8), scale


def decode(stored: torch.Tensor, scale: float | None) -> torch.Tensor:
    """The values a stored tensor stands for: as stored for floats, float32 levels x scale for int8."""
    if scale is None:
        return stored
    return stored.to(torch.float32) * torch.tensor(scale, dtype=torch.float32)


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
    """A task's cores as they go into its file: one flat tensor, int8 scales (or None), and each slot's layout."""

    flat: torch.Tensor
    scales: torch.Tensor | None
    layouts: list[SlotLayout]


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
        if scale is not None:
            scales.append(scale)
    rho = 0 if factors is None else factors[0].shape[1]
    readback = decoded[0] if factors is None else decoded[0] @ decoded[1]
    return EncodedCore(pieces, scales, SlotLayout(module, core.shape[0], core.shape[1], rho)), readback


def assemble_cores(encoded: list[EncodedCore], dtype: str) -> PackedCores:
    """A task's packed tensor from its slots' encoded cores, in slot (sorted module) order."""
    ordered = sorted(encoded, key=lambda e: e.layout.module)
    pieces = [piece for e in ordered for piece in e.pieces]
    scales = [scale for e in ordered for scale in e.scales]
    flat = torch.cat(pieces) if pieces else torch.zeros(0, dtype=number_dtype(dtype))
    scale_tensor = torch.tensor(scales, dtype=torch.float32) if dtype == "int8" else None
    return PackedCores(flat, scale_tensor, [e.layout for e in ordered])


def unpack_cores(packed: PackedCores) -> dict[str, list[torch.Tensor]]:
    """Per slot, the stored matrices decoded: [core] when dense, [P, Q] when factored."""
    out: dict[str, list[torch.Tensor]] = {}
    offset = scale_index = 0
    for layout in packed.layouts:
        matrices = []
        for rows, cols in layout.shapes():
            piece = packed.flat[offset : offset + rows * cols].reshape(rows, cols)
            offset += rows * cols
            scale = None
            if packed.scales is not None:
                scale = float(packed.scales[scale_index])
                scale_index += 1
            matrices.append(decode(piece, scale))
        out[layout.module] = matrices
    if offset != packed.flat.numel():
        raise ValueError(f"packed cores hold {packed.flat.numel()} numbers, the layout expects {offset}")
    return out


def dense_core(matrices: list[torch.Tensor]) -> torch.Tensor:
    """k_out x k_in core from its stored form, in float32."""
    if len(matrices) == 1:
        return matrices[0].to(torch.float32)
    P, Q = matrices
    return P.to(torch.float32) @ Q.to(torch.float32)
