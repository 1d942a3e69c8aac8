"""Shared per-slot bases fit from factored deltas (truncated HOSVD, optional HOOI refinement), and k selection.

The left basis U is the top singular space of Y = [w_i Y_i] with Y_i Y_i^T = D_i D_i^T, i.e. the top
eigenvectors of sum_i w_i^2 D_i D_i^T; V the same on the input side. Each Y_i is m x r_i, so the cost is
O(m (sum r)^2) and no m x n matrix is formed. Because Y_i Y_i^T is the same however an adapter is factored,
the basis is gauge-free.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from mergekit_subspace.lowrank import COMPUTE_DTYPE, LowRankDelta


@dataclass(frozen=True)
class SlotBasis:
    """Orthonormal U (m x k_out) and V (n x k_in) for one slot, with the spectra they were cut from."""

    U: torch.Tensor
    V: torch.Tensor
    spectrum_out: torch.Tensor  # squared singular values of Y, descending (captured energy per direction)
    spectrum_in: torch.Tensor
    k_requested: int | None
    capped: bool  # True when the requested k was more than the slot can hold

    @property
    def k_out(self) -> int:
        return int(self.U.shape[1])

    @property
    def k_in(self) -> int:
        return int(self.V.shape[1])


def fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Make each column's largest-magnitude entry positive, so equal inputs give byte-equal bases."""
    if vectors.numel() == 0:
        return vectors
    index = torch.argmax(vectors.abs(), dim=0)
    signs = torch.sign(vectors[index, torch.arange(vectors.shape[1], device=vectors.device)])
    signs[signs == 0] = 1
    return vectors * signs


def _top_left_singular(stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, _ = torch.linalg.svd(stacked, full_matrices=False)
    return U, S * S


def weighted_capture(
    deltas: Sequence[LowRankDelta], weights: list[float], U: torch.Tensor, V: torch.Tensor
) -> float:
    """sum_i w_i^2 ||U^T D_i V||^2 / sum_i w_i^2 ||D_i||^2: the share of the weighted zoo the bases keep."""
    kept = total = 0.0
    for w, d in zip(weights, deltas, strict=True):
        core = d.project(U, V)
        kept += w * w * float(torch.sum(core * core))
        total += w * w * d.norm_sq()
    return 1.0 if total == 0 else kept / total


def _smallest_k_for_energy(
    deltas: Sequence[LowRankDelta],
    weights: list[float],
    U_all: torch.Tensor,
    V_all: torch.Tensor,
    energy: float,
    cap_out: int,
    cap_in: int,
) -> tuple[int, int]:
    """Smallest k whose two-sided projection U_k^T D V_k keeps `energy` of the (weighted) zoo.

    Per-side thresholds alone would only promise 1 - 2 (1 - energy); captured energy grows with k, so a
    binary search on the joint figure finds the true smallest k.
    """
    low, high = 1, max(cap_out, cap_in)
    while low < high:
        mid = (low + high) // 2
        if (
            weighted_capture(deltas, weights, U_all[:, : min(mid, cap_out)], V_all[:, : min(mid, cap_in)])
            >= energy - 1e-12
        ):
            high = mid
        else:
            low = mid + 1
    return min(low, cap_out), min(low, cap_in)


def task_weights(deltas: Sequence[LowRankDelta], normalize: bool) -> list[float]:
    """1/||D_i|| per task when normalizing, so no adapter owns the basis by sheer scale."""
    if not normalize:
        return [1.0] * len(deltas)
    weights = []
    for delta in deltas:
        norm = delta.norm_sq() ** 0.5
        weights.append(0.0 if norm == 0 else 1.0 / norm)
    return weights


def fit_slot_basis(
    deltas: Sequence[LowRankDelta],
    k: int | None = None,
    energy: float | None = None,
    normalize: bool = True,
    refine: int = 0,
    k_in: int | None = None,
    prior: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SlotBasis:
    """Fit U, V for one slot from the tasks that touch it; `k_in` (default: k) sizes the right basis alone.
    `prior` holds columns appended to the left and right stacks (another store's scaled bases, transfer.py)."""
    if (k is None) == (energy is None):
        raise ValueError("give exactly one of k and energy")
    if k_in is not None and k is None:
        raise ValueError("k_in goes with a fixed k, not with an energy target")
    if not deltas:
        raise ValueError("a slot basis needs at least one delta")
    weights = task_weights(deltas, normalize)
    m, n = deltas[0].shape
    Y = torch.cat([w * d.left_gram_factor() for w, d in zip(weights, deltas, strict=True)], dim=1)
    Z = torch.cat([w * d.right_gram_factor() for w, d in zip(weights, deltas, strict=True)], dim=1)
    if prior is not None:
        Y, Z = torch.cat([Y, prior[0].to(Y)], dim=1), torch.cat([Z, prior[1].to(Z)], dim=1)
    U_all, spec_out = _top_left_singular(Y)
    V_all, spec_in = _top_left_singular(Z)
    total_rank = sum(d.rank for d in deltas)
    cap_out, cap_in = min(m, total_rank), min(n, total_rank)
    want_in = k if k_in is None else k_in
    if k is not None:
        assert want_in is not None
        k_out, k_in = min(k, cap_out), min(want_in, cap_in)
    else:
        assert energy is not None
        k_out, k_in = _smallest_k_for_energy(deltas, weights, U_all, V_all, energy, cap_out, cap_in)
    U, V = U_all[:, :k_out], V_all[:, :k_in]
    for _ in range(refine):
        U = _top_left_singular(
            torch.cat([w * d.times_right(V) for w, d in zip(weights, deltas, strict=True)], dim=1)
        )[0][:, :k_out]
        V = _top_left_singular(
            torch.cat([w * d.transpose_times_left(U) for w, d in zip(weights, deltas, strict=True)], dim=1)
        )[0][:, :k_in]
    capped = k is not None and want_in is not None and (k > cap_out or want_in > cap_in)
    return SlotBasis(
        U=fix_signs(U).to(COMPUTE_DTYPE),
        V=fix_signs(V).to(COMPUTE_DTYPE),
        spectrum_out=spec_out,
        spectrum_in=spec_in,
        k_requested=k,
        capped=capped,
    )


def captured_energy(deltas: Sequence[LowRankDelta], basis: SlotBasis, normalize: bool = True) -> float:
    """Weighted energy fraction sum_i w_i^2 ||C_i||^2 / sum_i w_i^2 ||D_i||^2 that the basis keeps."""
    return weighted_capture(deltas, task_weights(deltas, normalize), basis.U, basis.V)


# ---- the randomized solver -------------------------------------------------------------------------------
#
# For a slot touched by many adapters the stacked Y = [w_i Y_i] is m x sum(r), and its dense SVD costs
# O(m (sum r)^2). The top-k left singular vectors of Y are the top eigenvectors of G = sum_i w_i^2 Y_i Y_i^T =
# sum_i w_i^2 B_i (A_i A_i^T) B_i^T, and G is applied to a thin m x l block one adapter at a time, without G or
# Y ever being formed: a randomized range finder (Halko, Martinsson, Tropp 2011) with power passes, then
# Rayleigh-Ritz on the range. Each pass reads every adapter of the slot once (from memory when the slot is
# held) and costs O((m + n) r l) per adapter, so time grows with the data read, not with its square.


def slot_seed(module: str) -> int:
    """A seed from the slot name, so the random test matrices (and the bytes) are the same run to run."""
    return int(hashlib.sha256(module.encode()).hexdigest()[:15], 16)


SKETCH_DTYPE = torch.float32  # the passes over the zoo; the small Ritz problems are solved in float64
BLOCK_COLUMNS = 1024  # adapters of one rank are stacked into blocks of about this many factor columns


@dataclass
class RandomizedFit:
    """What the randomized solver learns about one slot: the Ritz bases and the task coordinates in them."""

    U: torch.Tensor  # m x l_out, orthonormal, columns by descending Ritz value
    V: torch.Tensor  # n x l_in
    spectrum_out: torch.Tensor  # Ritz values (squared singular values of Y), descending
    spectrum_in: torch.Tensor
    # per block of equal-rank tasks, U^T B_i (b x l_out x r) and A_i V (b x r x l_in): the two-sided energy of
    # any prefix, kept as factors (2 l r numbers a task instead of l^2)
    left: list[torch.Tensor]
    right: list[torch.Tensor]
    weights: torch.Tensor  # per task w_i (float64)
    norms_sq: torch.Tensor  # per task ||D_i||^2 (float64)

    def capture(self, k_out: int, k_in: int) -> float:
        """Weighted share of the zoo that the first k_out / k_in directions keep (exact for these bases)."""
        w2 = self.weights**2
        total = float(torch.sum(w2 * self.norms_sq))
        kept, start = 0.0, 0
        for left, right in zip(self.left, self.right, strict=True):
            cores = (left[:, :k_out].double() @ right[:, :, :k_in].double()).square().sum(dim=(1, 2))
            kept += float(torch.sum(w2[start : start + len(cores)] * cores))
            start += len(cores)
        return 1.0 if total == 0 else kept / total


@dataclass
class FactorBlock:
    """Consecutive adapters of one rank, stacked: B (m x b r), A (b r x n), scale folded into B, float32."""

    B: torch.Tensor
    A: torch.Tensor
    count: int
    rank: int

    def per_task(self, stacked_columns: torch.Tensor) -> torch.Tensor:
        """(rows x b r) -> (b x rows x r): the columns that belong to each adapter."""
        return stacked_columns.reshape(stacked_columns.shape[0], self.count, self.rank).permute(1, 0, 2)

    def deltas(self) -> Iterator[LowRankDelta]:
        """The block's adapters again, as views (scale folded in, so scale 1)."""
        r = self.rank
        for i in range(self.count):
            yield LowRankDelta(B=self.B[:, i * r : (i + 1) * r], A=self.A[i * r : (i + 1) * r])


def stack_blocks(deltas: Iterable[LowRankDelta], reuse: bool = False) -> Iterator[FactorBlock]:
    """Group consecutive adapters of equal rank into FactorBlocks of about BLOCK_COLUMNS columns.

    With `reuse` every block is written into the same buffers, so a pass that streams the slot allocates
    them once (each block must then be used before the next one is asked for).
    """
    pending: list[LowRankDelta] = []
    buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def flush() -> FactorBlock:
        r, (m, n) = pending[0].rank, pending[0].shape
        device = pending[0].B.device
        columns = len(pending) * r
        if reuse:
            key = (r, m, n, device)
            if key not in buffers:
                full = -(-BLOCK_COLUMNS // r) * r
                buffers[key] = (
                    torch.empty(m, full, dtype=SKETCH_DTYPE, device=device),
                    torch.empty(full, n, dtype=SKETCH_DTYPE, device=device),
                )
            B, A = buffers[key][0][:, :columns], buffers[key][1][:columns]
        else:
            B = torch.empty(m, columns, dtype=SKETCH_DTYPE, device=device)
            A = torch.empty(columns, n, dtype=SKETCH_DTYPE, device=device)
        for i, d in enumerate(pending):  # cast while copying into place: no per-adapter float32 copies
            B[:, i * r : (i + 1) * r].copy_(d.B)
            A[i * r : (i + 1) * r].copy_(d.A)
        scales = torch.tensor([d.scale for d in pending], dtype=SKETCH_DTYPE, device=device)
        B.view(m, len(pending), r).mul_(scales[None, :, None])
        return FactorBlock(B, A, len(pending), r)

    for delta in deltas:
        if pending and (delta.rank != pending[0].rank or len(pending) * delta.rank >= BLOCK_COLUMNS):
            yield flush()
            pending = []
        pending.append(delta)
    if pending:
        yield flush()


def _orthonormal(block: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(block, mode="reduced")[0]


def randomized_fit(
    blocks: Callable[[], Iterable[FactorBlock]],
    shape: tuple[int, int],
    width_out: int,
    width_in: int,
    normalize: bool,
    power_iters: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> RandomizedFit:
    """Top `width_out` left and `width_in` right directions of a slot, from passes over `blocks()`.

    Pass 1 sketches G Omega (and the right side's G' Omega') with Gaussian test matrices seeded by `seed`,
    and learns each task's weight; each power pass applies G to the orthonormalized sketch again; the last
    pass forms Q^T G Q (small) on the whole block Krylov space and each task's coordinates Q^T D_i Q', from
    which the Ritz vectors, their values and every prefix's captured energy follow. 2 + power_iters passes
    in all. Adapters of equal rank go through in stacked blocks, so each pass is a few large GEMMs.
    """
    m, n = shape
    generator = torch.Generator().manual_seed(seed)
    sketch_out = torch.randn(m, width_out, generator=generator, dtype=COMPUTE_DTYPE).to(device, SKETCH_DTYPE)
    sketch_in = torch.randn(n, width_in, generator=generator, dtype=COMPUTE_DTYPE).to(device, SKETCH_DTYPE)
    weights: list[torch.Tensor] = []
    norms_sq: list[torch.Tensor] = []
    krylov_out: list[torch.Tensor] = []
    krylov_in: list[torch.Tensor] = []
    grams: list[tuple[torch.Tensor, torch.Tensor]] = []
    for pass_index in range(1 + power_iters):
        probe_out, probe_in = sketch_out, sketch_in
        if pass_index > 0:
            probe_out, probe_in = _orthonormal(sketch_out), _orthonormal(sketch_in)
        sketch_out = torch.zeros(m, width_out, dtype=SKETCH_DTYPE, device=device)
        sketch_in = torch.zeros(n, width_in, dtype=SKETCH_DTYPE, device=device)
        for index, block in enumerate(blocks()):
            if pass_index == 0:  # each adapter's r x r Gram matrices, kept for every later pass
                A3 = block.A.reshape(block.count, block.rank, n)
                B3 = block.per_task(block.B)  # b x m x r
                grams.append((A3 @ A3.transpose(1, 2), B3.transpose(1, 2) @ B3))
            gram_a, gram_b = grams[index]
            if pass_index == 0:
                norm_sq = torch.sum(gram_a.double() * gram_b.double(), dim=(1, 2))
                norms_sq.append(norm_sq)
                safe = torch.where(norm_sq > 0, norm_sq, torch.ones_like(norm_sq))
                w = torch.where(norm_sq > 0, safe**-0.5, torch.zeros_like(norm_sq))
                weights.append(w if normalize else torch.ones_like(norm_sq))
            w2 = (weights[index] ** 2).to(SKETCH_DTYPE)[:, None, None]
            left = (w2 * (gram_a @ (block.B.T @ probe_out).reshape(block.count, block.rank, -1))).reshape(
                block.count * block.rank, -1
            )
            sketch_out += block.B @ left
            right = (w2 * (gram_b @ (block.A @ probe_in).reshape(block.count, block.rank, -1))).reshape(
                block.count * block.rank, -1
            )
            sketch_in += block.A.T @ right
        krylov_out.append(_orthonormal(sketch_out))
        krylov_in.append(_orthonormal(sketch_in))
    # Rayleigh-Ritz on the whole block Krylov space [G W, G^2 W, ...], not only its last block: on the flat
    # spectra of LoRA input sides it converges far faster than plain power passes (Musco & Musco 2015)
    # (orthonormalized in float64, so the final bases are orthonormal to float64 rounding)
    Q_out64 = _orthonormal(torch.cat(krylov_out, dim=1)[:, : min(m, width_out * (1 + power_iters))].double())
    Q_in64 = _orthonormal(torch.cat(krylov_in, dim=1)[:, : min(n, width_in * (1 + power_iters))].double())
    Q_out, Q_in = Q_out64.to(SKETCH_DTYPE), Q_in64.to(SKETCH_DTYPE)
    small_out = torch.zeros(Q_out.shape[1], Q_out.shape[1], dtype=COMPUTE_DTYPE, device=device)
    small_in = torch.zeros(Q_in.shape[1], Q_in.shape[1], dtype=COMPUTE_DTYPE, device=device)
    lefts: list[torch.Tensor] = []
    rights: list[torch.Tensor] = []
    for index, block in enumerate(blocks()):
        left = block.per_task(Q_out.T @ block.B)  # b x l_out x r
        right = (block.A @ Q_in).reshape(block.count, block.rank, -1)  # b x r x l_in
        w2 = (weights[index] ** 2)[:, None, None]
        gram_a, gram_b = (gram.double() for gram in grams[index])
        left64, right64 = left.double(), right.double()
        small_out += torch.sum(w2 * (left64 @ gram_a @ left64.transpose(1, 2)), dim=0)
        small_in += torch.sum(w2 * (right64.transpose(1, 2) @ gram_b @ right64), dim=0)
        lefts.append(left)
        rights.append(right)
    values_out, vectors_out = torch.linalg.eigh(small_out)
    values_in, vectors_in = torch.linalg.eigh(small_in)
    vectors_out, vectors_in = vectors_out.flip(1), vectors_in.flip(1)
    U, V = fix_signs(Q_out64 @ vectors_out), fix_signs(Q_in64 @ vectors_in)
    # coordinates in the Ritz bases (the sign fix included): U^T B_i = (U^T Q) (Q^T B_i), A_i V likewise
    turn_out, turn_in = (U.T @ Q_out64).to(SKETCH_DTYPE), (Q_in64.T @ V).to(SKETCH_DTYPE)
    return RandomizedFit(
        U=U,
        V=V,
        spectrum_out=values_out.flip(0).clamp_min(0.0),
        spectrum_in=values_in.flip(0).clamp_min(0.0),
        left=[turn_out @ left for left in lefts],
        right=[right @ turn_in for right in rights],
        weights=torch.cat(weights),
        norms_sq=torch.cat(norms_sq),
    )


def smallest_k_for_capture(
    capture: Callable[[int, int], float], energy: float, cap_out: int, cap_in: int
) -> tuple[int, int]:
    """Smallest k whose two-sided capture reaches `energy` (binary search: capture grows with k)."""
    low, high = 1, max(cap_out, cap_in)
    while low < high:
        mid = (low + high) // 2
        if capture(min(mid, cap_out), min(mid, cap_in)) >= energy - 1e-12:
            high = mid
        else:
            low = mid + 1
    return min(low, cap_out), min(low, cap_in)


def hooi_step(
    deltas: Callable[[], Iterable[LowRankDelta]],
    weights: list[float],
    fixed: torch.Tensor,
    width: int,
    left: bool,
    power_iters: int,
    seed: int,
) -> torch.Tensor:
    """One HOOI half-step on the randomized path: top `width` eigenvectors of sum_i w_i^2 (D_i F)(D_i F)^T
    (left side, F = V) or of sum_i w_i^2 (D_i^T F)(D_i^T F)^T (right side, F = U), from passes over deltas."""

    def thin(delta: LowRankDelta) -> torch.Tensor:
        return delta.times_right(fixed) if left else delta.transpose_times_left(fixed)

    first = next(iter(deltas()))
    dim = first.shape[0] if left else first.shape[1]
    generator = torch.Generator().manual_seed(seed)
    sketch = torch.randn(dim, width, generator=generator, dtype=COMPUTE_DTYPE).to(fixed.device)
    probe = sketch
    for pass_index in range(2 + power_iters):
        if pass_index > 0:
            probe = _orthonormal(sketch)
        sketch = torch.zeros(dim, width, dtype=COMPUTE_DTYPE, device=fixed.device)
        small = torch.zeros(width, width, dtype=COMPUTE_DTYPE, device=fixed.device)
        for w, delta in zip(weights, deltas(), strict=True):
            block = thin(delta)
            sketch += w * w * (block @ (block.T @ probe))
            if pass_index == 1 + power_iters:
                projected = probe.T @ block
                small += w * w * (projected @ projected.T)
    values, vectors = torch.linalg.eigh(small)
    return fix_signs(probe @ vectors.flip(1))
