"""Growing a store's bases for a new task the bases cannot hold (`add --policy grow|auto`).

For a slot with bases U (m x k), V (n x k') and a new delta D = B A, the left residual (I - U U^T) B and the
right residual (I - V V^T) A^T span everything the bases miss. Their principal directions X (m x a) and
Y (n x b), a <= r and b <= r, are appended: U' = [U X], V' = [V Y]. The new task's core U'^T D V' then holds
what the grown bases capture, and every older core is the old core padded with zeros, because the columns
added are orthogonal to the old ones (the older tasks were stored as U C V^T, which has no component there).

How many directions each slot gets is chosen across the task's slots at once: the extended core
[U X]^T D [V Y] of each slot gives the exact energy captured by any (a, b), so directions are added greedily
by captured energy per basis byte until the task's relative error meets the target. The older tasks are
untouched; only the basis file and the manifest change besides the new task's file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.lowrank import COMPUTE_DTYPE, LowRankDelta

POLICIES = ("auto", "project", "grow")
DEFAULT_MAX_REL_ERROR = 0.5
GROW_MARGIN = 0.5  # grow to half the guard, so quantization of the new columns cannot push it back over


def _residual_directions(
    basis: torch.Tensor, left: torch.Tensor, right_factor: torch.Tensor, room: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal directions of (I - basis basis^T) left right_factor^T, strongest first, and their
    singular values; orthogonal to `basis` (projected out twice, as classical Gram-Schmidt needs)."""
    residual = left - basis @ (basis.T @ left)
    residual = residual - basis @ (basis.T @ residual)
    r_right = torch.linalg.qr(right_factor.T, mode="r").R
    u, s, _ = torch.linalg.svd(residual @ r_right.T, full_matrices=False)
    keep = int((s > s.new_tensor(1e-10) * max(float(s[0]) if s.numel() else 0.0, 1e-300)).sum())
    keep = min(keep, room)
    directions = u[:, :keep]
    directions = directions - basis @ (basis.T @ directions)  # drift from the float32/16 basis as stored
    directions, _ = torch.linalg.qr(directions)
    return directions, s[:keep]


@dataclass
class SlotGrowth:
    """One slot's options for growing toward one task: the candidate directions and the extended core."""

    module: str
    X: torch.Tensor  # m x a_max, orthonormal, orthogonal to U
    Y: torch.Tensor  # n x b_max, orthonormal, orthogonal to V
    energy: torch.Tensor  # (k + a_max) x (k' + b_max): squared entries of [U X]^T D [V Y]
    k_out: int
    k_in: int
    norm_sq: float

    @property
    def limits(self) -> tuple[int, int]:
        return self.X.shape[1], self.Y.shape[1]

    def captured(self, a: int, b: int) -> float:
        """Energy of the task the slot holds with the first a left and b right new directions."""
        return float(self.energy[: self.k_out + a, : self.k_in + b].sum())


def slot_growth(module: str, U: torch.Tensor, V: torch.Tensor, delta: LowRankDelta) -> SlotGrowth:
    """The directions one slot could add for `delta` (at most its rank per side, at most what the slot's
    dimensions leave), from factors only."""
    U, V = U.to(COMPUTE_DTYPE), V.to(COMPUTE_DTYPE)
    B, A = (t.to(COMPUTE_DTYPE) for t in delta.factors())
    m, n = U.shape[0], V.shape[0]
    X, _ = _residual_directions(U, B, A, m - U.shape[1])
    Y, _ = _residual_directions(V, A.T, B.T, n - V.shape[1])
    left = torch.cat([U, X], dim=1)
    right = torch.cat([V, Y], dim=1)
    core = (left.T @ B) @ (A @ right)
    return SlotGrowth(module, X, Y, core.square(), U.shape[1], V.shape[1], delta.norm_sq())


def plan_growth(
    slots: dict[str, SlotGrowth], target_rel_error: float, item_bytes: float
) -> dict[str, tuple[int, int]]:
    """(a, b) new directions per slot: greedy by captured energy per basis byte until the task's relative
    error (over all its slots) is at most the target, or nothing is left to add."""
    chosen = {module: (0, 0) for module in slots}
    total = sum(g.norm_sq for g in slots.values())
    if total <= 0:
        return chosen
    captured = {module: g.captured(0, 0) for module, g in slots.items()}
    budget_sq = (target_rel_error**2) * total

    def error_sq() -> float:
        return max(0.0, total - sum(captured.values()))

    while error_sq() > budget_sq:
        best: tuple[float, str, tuple[int, int], float] | None = None
        for module, growth in slots.items():
            a, b = chosen[module]
            a_max, b_max = growth.limits
            m, n = growth.X.shape[0], growth.Y.shape[0]
            for step, cost in (((a + 1, b), m), ((a, b + 1), n), ((a + 1, b + 1), m + n)):
                if step[0] > a_max or step[1] > b_max:
                    continue
                gain = growth.captured(*step) - captured[module]
                rate = gain / (cost * item_bytes)
                if gain > 1e-12 * total and (best is None or rate > best[0]):
                    best = (rate, module, step, gain)
        if best is None:
            break
        _, module, step, gain = best
        chosen[module] = step
        captured[module] += gain
    return chosen


def check_policy(policy: str, max_rel_error: float) -> None:
    """Refuse a policy or guard that cannot be met, before anything is read."""
    if policy not in POLICIES:
        raise SubspaceError(f"policy must be one of {', '.join(POLICIES)}, not '{policy}'")
    if not max_rel_error > 0:  # NaN fails this too; inf means no guard
        raise SubspaceError(f"max_rel_error must be a number above 0 (inf: no guard), not {max_rel_error}")
