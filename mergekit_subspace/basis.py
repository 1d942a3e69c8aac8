"""Shared per-slot bases fit from factored deltas (truncated HOSVD, optional HOOI refinement), and k selection.

The left basis U is the top singular space of Y = [w_i Y_i] with Y_i Y_i^T = D_i D_i^T, i.e. the top
eigenvectors of sum_i w_i^2 D_i D_i^T; V the same on the input side. Each Y_i is m x r_i, so the cost is
O(m (sum r)^2) and no m x n matrix is formed. Because Y_i Y_i^T is the same however an adapter is factored,
the basis is gauge-free.
"""

from __future__ import annotations

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
    signs = torch.sign(vectors[index, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1
    return vectors * signs


def _top_left_singular(stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, _ = torch.linalg.svd(stacked, full_matrices=False)
    return U, S * S


def weighted_capture(
    deltas: list[LowRankDelta], weights: list[float], U: torch.Tensor, V: torch.Tensor
) -> float:
    kept = total = 0.0
    for w, d in zip(weights, deltas, strict=True):
        core = d.project(U, V)
        kept += w * w * float(torch.sum(core * core))
        total += w * w * d.norm_sq()
    return 1.0 if total == 0 else kept / total


def _smallest_k_for_energy(
    deltas: list[LowRankDelta],
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


def task_weights(deltas: list[LowRankDelta], normalize: bool) -> list[float]:
    """1/||D_i|| per task when normalizing, so no adapter owns the basis by sheer scale."""
    if not normalize:
        return [1.0] * len(deltas)
    weights = []
    for delta in deltas:
        norm = delta.norm_sq() ** 0.5
        weights.append(0.0 if norm == 0 else 1.0 / norm)
    return weights


def fit_slot_basis(
    deltas: list[LowRankDelta],
    k: int | None = None,
    energy: float | None = None,
    normalize: bool = True,
    refine: int = 0,
    k_in: int | None = None,
) -> SlotBasis:
    """Fit U, V for one slot from the tasks that touch it; `k_in` (default: k) sizes the right basis alone."""
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


def captured_energy(deltas: list[LowRankDelta], basis: SlotBasis, normalize: bool = True) -> float:
    """Weighted energy fraction sum_i w_i^2 ||C_i||^2 / sum_i w_i^2 ||D_i||^2 that the basis keeps."""
    return weighted_capture(deltas, task_weights(deltas, normalize), basis.U, basis.V)
