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

A clustered store grows one cluster's block of each slot the same way, with U and V the block's own columns
U_c, V_c: the new columns go in at the end of the block, the blocks after it (and their tasks' offsets)
move along, and the cluster's older cores, narrower than the block now, read as zero on the new columns.
A plain store is the case of one block per slot, the whole basis (`grow_blocks`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_subspace.add_policy import GROW_MARGIN
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.io.codec import ITEM_BYTES
from mergekit_subspace.io.store import append_basis_columns
from mergekit_subspace.lowrank import COMPUTE_DTYPE, LowRankDelta
from mergekit_subspace.sources import TaskSource


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


def slot_growth(
    module: str,
    U: torch.Tensor,
    V: torch.Tensor,
    delta: LowRankDelta,
    room: tuple[int, int] | None = None,
) -> SlotGrowth:
    """The directions one slot could add for `delta` (at most its rank per side, at most `room` per side:
    by default what the slot's dimensions leave beyond U and V; a cluster's block, whose U and V are only
    part of the slot's basis, is capped by the whole basis's width instead), from factors only."""
    U, V = U.to(COMPUTE_DTYPE), V.to(COMPUTE_DTYPE)
    B, A = (t.to(COMPUTE_DTYPE) for t in delta.factors())
    m, n = U.shape[0], V.shape[0]
    room_out, room_in = room if room is not None else (m - U.shape[1], n - V.shape[1])
    X, _ = _residual_directions(U, B, A, room_out)
    Y, _ = _residual_directions(V, A.T, B.T, room_in)
    left = torch.cat([U, X], dim=1)
    right = torch.cat([V, Y], dim=1)
    core = (left.T @ B) @ (A @ right)
    return SlotGrowth(module, X, Y, core.square(), U.shape[1], V.shape[1], delta.norm_sq())


def plan_growth(
    slots: dict[str, SlotGrowth],
    target_rel_error: float,
    item_bytes: float,
    floor: dict[str, tuple[int, int]] | None = None,
) -> dict[str, tuple[int, int]]:
    """(a, b) new directions per slot: greedy by captured energy per basis byte until the task's relative
    error (over all its slots) is at most the target, or nothing is left to add. `floor` is the least a slot
    takes (as far as it has directions): a cluster new to a slot needs a column on each side to hold anything."""
    chosen = {module: (0, 0) for module in slots}
    for module, (a, b) in (floor or {}).items():
        a_max, b_max = slots[module].limits
        chosen[module] = (min(a, a_max), min(b, b_max))
    total = sum(g.norm_sq for g in slots.values())
    if total <= 0:
        return chosen
    captured = {module: g.captured(*chosen[module]) for module, g in slots.items()}
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


def slot_block(meta: dict[str, Any], cluster: int | None) -> list[int] | None:
    """The columns [o_out, k_out, o_in, k_in] of a slot's basis that one cluster's tasks are encoded on (a
    plain store, cluster None: the whole basis); None where the cluster has no columns in the slot."""
    if cluster is None:
        return [0, meta["k_out"], 0, meta["k_in"]]
    blocks = meta.get("clusters") or []
    return blocks[cluster] if cluster < len(blocks) else None


@dataclass
class GrowingBases:
    """A store's manifest and basis file tensors as the adds of one write leave them: every growth is made
    here, in memory, and the store is written once when the whole batch is in (or not at all)."""

    manifest: dict[str, Any]  # expanded form, a copy: the batch's tasks and growth go in as they come
    tensors: dict[str, torch.Tensor]  # the basis file's tensors, grown
    stored: Callable[[str], tuple[torch.Tensor, torch.Tensor]]  # a slot's bases as the store reads them
    root: Path
    grown: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # as they read back
    _read: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # decoded once each

    def basis(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) of a slot as they will read back from the store once written."""
        if module in self.grown:
            return self.grown[module]
        if module not in self._read:
            self._read[module] = self.stored(module)
        return self._read[module]


def _insert_block_columns(
    manifest: dict[str, Any], module: str, cluster: int | None, at: tuple[int, int], a: int, b: int
) -> None:
    """Record a columns inserted into U and b into V at `at` for one cluster of a slot: its block widens (or
    is made), and the blocks and tasks' cores that start at or after `at` move along."""
    meta = manifest["slots"][module]
    blocks = meta.get("clusters")
    if cluster is None or blocks is None:
        return
    for block in blocks:
        if block is not None:
            block[0] += a if block[0] >= at[0] else 0
            block[2] += b if block[2] >= at[1] else 0
    own = blocks[cluster]
    blocks[cluster] = [at[0], a, at[1], b] if own is None else [own[0], own[1] + a, own[2], own[3] + b]
    for name in meta["tasks"]:
        stats = manifest["tasks"][name]["slots"][module]
        for key, start, added in (("o_out", at[0], a), ("o_in", at[1], b)):
            if (stats.get(key) or 0) >= start:
                stats[key] = (stats.get(key) or 0) + added


def grow_blocks(
    bases: GrowingBases, source: TaskSource, cluster: int | None, max_rel_error: float, device: str
) -> dict[str, tuple[int, int]]:
    """Grow one cluster's block of every slot `source` touches (cluster None: a plain store's whole basis)
    toward half the guard, as `add --policy grow` does, and record it in `bases`. The residual directions are
    taken against the block's own columns; they go in at the end of the block, or, where the cluster has no
    block in a slot yet, as a new block at the end of the slot's columns. Returns the columns added per slot."""
    from mergekit_subspace.subspace import _record_growth

    manifest = bases.manifest
    dtype = manifest["settings"]["dtype"]  # the bases' (cores are encoded by the caller)
    growths: dict[str, SlotGrowth] = {}
    floor: dict[str, tuple[int, int]] = {}
    starts: dict[str, tuple[int, int]] = {}
    for module in sorted(source.shapes):
        meta = manifest["slots"][module]
        block = slot_block(meta, cluster)
        if block is None:
            block = [meta["k_out"], 0, meta["k_in"], 0]
            floor[module] = (1, 1)
        o_out, k_out, o_in, k_in = block
        U, V = (t.to(device) for t in bases.basis(module))
        delta = source.slots[module]
        delta = LowRankDelta(B=delta.B.to(device), A=delta.A.to(device), scale=delta.scale)
        room = (meta["shape"][0] - meta["k_out"], meta["shape"][1] - meta["k_in"])
        growth = slot_growth(module, U[:, o_out : o_out + k_out], V[:, o_in : o_in + k_in], delta, room)
        growth.X, growth.Y, growth.energy = growth.X.cpu(), growth.Y.cpu(), growth.energy.cpu()
        growths[module] = growth
        starts[module] = (o_out + k_out, o_in + k_in)
    plan = plan_growth(growths, GROW_MARGIN * max_rel_error, ITEM_BYTES.get(dtype, 4), floor)
    empty = sorted(m for m in floor if min(plan[m]) < 1)
    if empty:
        raise SubspaceError(
            f"has nothing cluster {cluster} could hold in slot '{empty[0]}', where the cluster has no "
            "columns yet (its delta there is zero, or the slot's basis is full); fit it in with `refit --add`",
            source.source,
        )
    grown = {m: ab for m, ab in plan.items() if ab != (0, 0)}
    for module, (a, b) in sorted(grown.items()):
        X, Y = growths[module].X[:, :a], growths[module].Y[:, :b]
        bases.tensors, bases.grown[module] = append_basis_columns(
            bases.tensors, module, X, Y, dtype, bases.root, at=starts[module]
        )
        _insert_block_columns(manifest, module, cluster, starts[module], a, b)
    _record_growth(manifest, grown, None)
    return grown
