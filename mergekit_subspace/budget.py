"""Per-slot k under one byte budget: spend the bytes where the captured energy per byte is highest.

Slots differ: one touched by 12 adapters may hold all it can at k = 16 while one touched by 48 keeps gaining
at 64. A single k for every slot wastes bytes on the first and starves the second. `allocate` grows each
slot's k in steps, always taking the step with the largest gain in captured energy (weighted as the store fits) per
byte added, until the next step no longer fits. Bytes count the stored numbers of the basis and of every
task's core (factored when smaller, as the store keeps them), each at its own dtype's width (`priced`: a
store may keep its cores finer than its bases); heads and the manifest are not part of it.

Each slot's curve comes from one fit at its largest size (`SubspaceBasis` makes it, slot by slot, on any
solver): the captured energy of every prefix of its directions, or, given calibration inputs, the output
energy each prefix keeps on them (calibration.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

STEP = 4


def core_numbers(k_out: int, k_in: int, rank: int) -> int:
    """Numbers one task's core costs at (k_out, k_in): dense, or its rank-rho factors when smaller."""
    rho = max(1, min(rank, k_out, k_in))
    return min(k_out * k_in, rho * (k_out + k_in))


@dataclass
class SlotCurve:
    sizes: list[tuple[int, int]]  # (k_out, k_in) per step
    gains: list[float]  # captured energy (task units) per step
    costs: list[int]  # stored numbers per step (bases and cores)
    total: float = 0.0  # the slot's whole weighted energy, what the gains are shares of
    core_costs: list[int] = field(default_factory=list)  # of `costs`, the cores' numbers per step

    def priced(self, basis_item: float, core_item: float) -> SlotCurve:
        """The same curve with costs in bytes: basis numbers at `basis_item` bytes each, core numbers at
        `core_item` (a store whose cores are kept finer than its bases)."""
        costs = [
            math.ceil((total - cores) * basis_item + cores * core_item)
            for total, cores in zip(self.costs, self.core_costs, strict=True)
        ]
        return SlotCurve(self.sizes, self.gains, costs, self.total, self.core_costs)


def curve_sizes(cap_out: int, cap_in: int, k_in: int | None) -> list[tuple[int, int]]:
    """The (k_out, k_in) steps an allocation may give a slot fit at (cap_out, cap_in)."""
    return [
        (k, min(cap_in, k if k_in is None else k_in))
        for k in sorted({1, *range(STEP, cap_out, STEP), cap_out})
    ]


def slot_curve(
    capture: Callable[[int, int], float],
    total: float,
    shape: tuple[int, int],
    ranks: list[int],
    cap_out: int,
    cap_in: int,
    k_in: int | None,
) -> SlotCurve:
    """Gain and cost of each step of one slot. `capture(k_out, k_in)` is the weighted share the first
    directions keep, `total` the slot's weighted energy; `cap_out` / `cap_in` the sizes it was fit at."""
    m, n = shape
    curve = SlotCurve([], [], [], total)
    for ko, ki in curve_sizes(cap_out, cap_in, k_in):
        curve.sizes.append((ko, ki))
        curve.gains.append(total * capture(ko, ki))
        cores = sum(core_numbers(ko, ki, r) for r in ranks)
        curve.costs.append(ko * m + ki * n + cores)
        curve.core_costs.append(cores)
    return curve


def allocate(curves: dict[str, SlotCurve], budget_bytes: int) -> dict[str, tuple[int, int]]:
    """(k_out, k_in) per slot whose costs fit `budget_bytes` (curves `priced` in bytes).

    Raises ValueError when even the first step (k_out = 1) in every slot does not fit.
    """
    chosen = dict.fromkeys(curves, 0)
    spent = sum(c.costs[0] for c in curves.values())
    if spent > budget_bytes:
        raise ValueError(f"the smallest store (k_out = 1 per slot) needs {spent:,} bytes, over the budget")
    while True:
        best, best_rate = None, 0.0
        for module, curve in curves.items():
            i = chosen[module]
            if i + 1 >= len(curve.sizes):
                continue
            extra = curve.costs[i + 1] - curve.costs[i]
            if spent + extra > budget_bytes:
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
