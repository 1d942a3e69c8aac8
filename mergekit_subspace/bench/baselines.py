"""The baselines a skeptical reviewer asks for, as per-slot PEFT factors computed from factors only.

- mean_adapter: the zoo's average delta (what summing centred coefficients gives back);
- per_task_svd: each adapter truncated on its own to a rank that spends the same bytes;
- leave_one_out: a basis fit without the task, the task projected onto it (is a *new* task storable?);
- base_only: no delta at all, only the task's head.
"""

from __future__ import annotations

import torch

from mergekit_subspace.fit import SubspaceBasis
from mergekit_subspace.lowrank import COMPUTE_DTYPE, LowRankDelta, core_to_factors, stored_error_sq
from mergekit_subspace.recipe import SubspaceSettings
from mergekit_subspace.sources import TaskSource

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def truncated_factors(delta: LowRankDelta, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation of s B A via QR of both factors and an SVD of the r x r middle."""
    B, A = delta.factors()
    Qb, Rb = torch.linalg.qr(B, mode="reduced")
    Qa, Ra = torch.linalg.qr(A.T, mode="reduced")
    return core_to_factors(Qb, Rb @ Ra.T, Qa, rank)


def mean_adapter(tasks: list[TaskSource]) -> Factors:
    """Exact average of all N deltas per slot (a task that does not touch a slot counts as zero)."""
    slots = sorted({module for task in tasks for module in task.slots})
    count = len(tasks)
    factors: Factors = {}
    for module in slots:
        members = [task.slots[module] for task in tasks if module in task.slots]
        B = torch.cat([d.factors()[0] for d in members], dim=1) / count
        A = torch.cat([d.factors()[1] for d in members], dim=0)
        stacked = LowRankDelta(B=B, A=A)
        factors[module] = truncated_factors(stacked, min(stacked.rank, *stacked.shape))
    return factors


def per_task_svd(task: TaskSource, element_budget: float) -> tuple[Factors, int]:
    """One rank for all of the task's slots, the largest whose factors fit `element_budget` numbers."""
    per_rank = sum(sum(d.shape) for d in task.slots.values())
    rank = max(1, int(element_budget // per_rank))
    return {m: truncated_factors(d, min(rank, d.rank)) for m, d in task.slots.items()}, rank


def leave_one_out(
    tasks: list[TaskSource],
    index: int,
    sizes: dict[str, tuple[int, int]],
    settings: SubspaceSettings,
) -> tuple[Factors, float]:
    """Fit the store's basis without task `index` (each slot at the store's own (k_out, k_in)), project the
    task onto it, return its factors and relative error."""
    held_out = tasks[index]
    others = [t for i, t in enumerate(tasks) if i != index]
    shared = sorted(m for m in held_out.shapes if any(m in t.shapes for t in others))
    factors: Factors = {}
    err = norm = 0.0
    fitted = None
    if shared:
        fitted = SubspaceBasis(settings, sizes={m: sizes[m] for m in shared}).fit(others, modules=shared)
    for module in sorted(held_out.shapes):
        delta = held_out.slots[module]
        norm += delta.norm_sq()
        if (
            fitted is None or module not in fitted.bases_
        ):  # nothing else touches it: a fresh basis knows nothing
            err += delta.norm_sq()
            continue
        U, V = fitted.bases_[module]
        core = delta.project(U, V)
        err += stored_error_sq(delta, U, core, V)
        factors[module] = core_to_factors(U, core, V, min(delta.rank, *core.shape))
    return factors, (err / norm) ** 0.5 if norm else 0.0


def zero_factors(task: TaskSource) -> Factors:
    """A rank-1 all-zero LoRA on the task's modules: PEFT loads it, the output is the base plus the head."""
    return {
        m: (torch.zeros(d.shape[0], 1, dtype=COMPUTE_DTYPE), torch.zeros(1, d.shape[1], dtype=COMPUTE_DTYPE))
        for m, d in task.slots.items()
    }
