"""The baselines a skeptical reviewer asks for, as per-slot PEFT factors computed from factors only.

- mean_adapter: the zoo's average delta (what summing centred coefficients gives back);
- per_task_svd: each adapter truncated on its own to a rank that spends the same bytes;
- leave_one_out: a basis fit without the task, the task projected onto it (is a *new* task storable?);
- base_only: no delta at all, only the task's head.
"""

from __future__ import annotations

import torch

from mergekit_subspace.basis import fit_slot_basis
from mergekit_subspace.lowrank import COMPUTE_DTYPE, LowRankDelta, core_to_factors, stored_error_sq
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
    normalize: bool = True,
) -> tuple[Factors, float]:
    """Fit each slot's basis without task `index` at the store's (k_out, k_in) for that slot, project the task,
    return its factors and relative error."""
    held_out = tasks[index]
    others = [t for i, t in enumerate(tasks) if i != index]
    factors: Factors = {}
    err = norm = 0.0
    for module, delta in held_out.slots.items():
        peers = [t.slots[module] for t in others if module in t.slots]
        norm += delta.norm_sq()
        if not peers:  # nothing else touches this slot: a fresh basis would know nothing of it
            err += delta.norm_sq()
            continue
        k_out, k_in = sizes[module]
        basis = fit_slot_basis(peers, k=k_out, normalize=normalize, k_in=k_in)
        core = delta.project(basis.U, basis.V)
        err += stored_error_sq(delta, basis.U, core, basis.V)
        factors[module] = core_to_factors(basis.U, core, basis.V, min(delta.rank, *core.shape))
    return factors, (err / norm) ** 0.5 if norm else 0.0


def zero_factors(task: TaskSource) -> Factors:
    """A rank-1 all-zero LoRA on the task's modules: PEFT loads it, the output is the base plus the head."""
    return {
        m: (torch.zeros(d.shape[0], 1, dtype=COMPUTE_DTYPE), torch.zeros(1, d.shape[1], dtype=COMPUTE_DTYPE))
        for m, d in task.slots.items()
    }
