"""Per-slot k under one byte budget: spend the bytes where the captured energy per byte is highest.

Slots differ: one touched by 12 adapters may hold all it can at k = 16 while one touched by 48 keeps gaining
at 64. A single k for every slot wastes bytes on the first and starves the second. `allocate` grows each
slot's k in steps, always taking the step with the largest gain in captured energy (weighted as the store fits) per
byte added, until the next step no longer fits. Bytes count the stored numbers of the basis and of every
task's core (factored when smaller, as the store keeps them); heads and the manifest are not part of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergekit_subspace.basis import fit_slot_basis, task_weights, weighted_capture
from mergekit_subspace.lowrank import LowRankDelta

STEP = 4


def core_numbers(k_out: int, k_in: int, rank: int) -> int:
    """Numbers one task's core costs at (k_out, k_in): dense, or its rank-rho factors when smaller."""
    rho = max(1, min(rank, k_out, k_in))
    return min(k_out * k_in, rho * (k_out + k_in))


@dataclass
class _SlotCurve:
    sizes: list[tuple[int, int]]  # (k_out, k_in) per step
    gains: list[float]  # captured energy (task units) per step
    costs: list[int]  # stored numbers per step


def _curve(deltas: list[LowRankDelta], k_max: int, k_in: int | None, normalize: bool) -> _SlotCurve:
    m, n = deltas[0].shape
    total_rank = sum(d.rank for d in deltas)
    cap_out = min(m, total_rank, k_max)
    cap_in = min(n, total_rank, k_in if k_in is not None else k_max)
    basis = fit_slot_basis(deltas, k=cap_out, k_in=cap_in, normalize=normalize)
    weights = task_weights(deltas, normalize)
    total = sum(w * w * d.norm_sq() for w, d in zip(weights, deltas, strict=True))
    curve = _SlotCurve([], [], [])
    for k in sorted({1, *range(STEP, cap_out, STEP), cap_out}):
        ko, ki = k, min(cap_in, k if k_in is None else k_in)
        curve.sizes.append((ko, ki))
        curve.gains.append(total * weighted_capture(deltas, weights, basis.U[:, :ko], basis.V[:, :ki]))
        curve.costs.append(ko * m + ki * n + sum(core_numbers(ko, ki, d.rank) for d in deltas))
    return curve


def allocate(
    slots: dict[str, list[LowRankDelta]],
    budget_numbers: int,
    k_max: int,
    k_in: int | None = None,
    normalize: bool = True,
) -> dict[str, tuple[int, int]]:
    """(k_out, k_in) per slot whose stored numbers fit `budget_numbers`.

    With `k_in` set, only k_out grows and the right basis stays at k_in; otherwise both grow together.
    Energy is weighted as the store fits it (`normalize`: unit-norm tasks, else raw norms).
    Raises ValueError when even k_out = 1 in every slot does not fit.
    """
    curves = {module: _curve(deltas, k_max, k_in, normalize) for module, deltas in slots.items()}
    chosen = dict.fromkeys(curves, 0)
    spent = sum(c.costs[0] for c in curves.values())
    if spent > budget_numbers:
        raise ValueError(f"the smallest store (k_out = 1 per slot) needs {spent:,} numbers, over the budget")
    while True:
        best, best_rate = None, 0.0
        for module, curve in curves.items():
            i = chosen[module]
            if i + 1 >= len(curve.sizes):
                continue
            extra = curve.costs[i + 1] - curve.costs[i]
            if spent + extra > budget_numbers:
                continue
            rate = (curve.gains[i + 1] - curve.gains[i]) / max(extra, 1)
            if rate > best_rate:
                best, best_rate = module, rate
        if best is None:
            break
        i = chosen[best]
        spent += curves[best].costs[i + 1] - curves[best].costs[i]
        chosen[best] = i + 1
    return {module: curves[module].sizes[i] for module, i in chosen.items()}
