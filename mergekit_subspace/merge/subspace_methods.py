"""KnOTS and Core Space merging on per-slot cores: the tasks are re-aligned to a basis of their own first.

Both papers merge LoRA tasks entry-wise (TIES, DARE) in a basis computed from the tasks being merged, where
the entries mean something shared. A store's basis (U, V) is fit on the whole zoo, so these methods compute
that basis from the merged tasks' cores; every step is on k x k matrices, never on an m x n delta.

Mapping onto cores. With D_t = U C_t V^T and the SVD [C_1 ... C_T] = P S [Q_1^T ... Q_T^T],

    [D_1 ... D_T] = (U P) S [Q_1^T V^T ... Q_T^T V^T]

is the SVD of the concatenated deltas (U, V orthonormal), so the tasks' joint column space comes from the
small cores alone.

KnOTS (Stoica et al., ICLR 2025). The paper merges the per-task blocks S Q_t^T V^T (r x n) entry-wise and
returns (U P) R_merged. Here the blocks are S Q_t^T = P^T C_t (r x k_in): the right side stays in V's
coordinates instead of the raw input coordinates. With V the identity (k_in = n) these are the paper's
numbers; otherwise a rotation that entry-wise masks do not commute with. The paper trims each task's top-K
entries over the whole model; here per slot, as every method of this package. knots_ties is TIES (trim,
elect, disjoint mean) on the blocks; knots_dare_ties is the paper's DARE variant: random drop with rescale,
then sign election and disjoint mean without a trim (mergekit's dare_ties sums instead).

Core Space (Panariello et al., NeurIPS 2025). The paper takes reference bases from the SVDs of the stacked
[B_1 ... B_T] and [A_1; ...; A_T], aligns each task to M_t = U_ref^T B_t A_t V_ref, merges the M_t and maps
back U_ref M V_ref^T. Stacked factors depend on how each adapter happens to be factored (docs/math.md, gauge
freedom) and a store keeps no B or A, so the reference bases here are the left singular vectors of
[C_1 ... C_T] and the right ones of [C_1; ...; C_T]: the same column and row spaces, independent of the
factorization. Rotation-invariant merges (task_arithmetic, tsv, iso_c, iso_cts) give in any such basis what
they give on the cores, so the paper's Core Space TSV / Iso-C are this package's tsv / iso_c; only the
entry-wise inner merges change: core_ties, core_dare_linear, core_dare_ties.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from mergekit_subspace.merge.methods import (
    MergeMethod,
    MethodFn,
    SlotInputs,
    dare_linear,
    dare_ties,
    drop_and_rescale,
    numerical_rank,
    register,
    ties,
)


def joint_left(cores: list[torch.Tensor]) -> torch.Tensor:
    """Left singular vectors of [C_1 ... C_T] over its numerical rank: the tasks' joint column space."""
    P, S, _ = torch.linalg.svd(torch.cat(cores, dim=1), full_matrices=False)
    return P[:, : numerical_rank(S)]


def joint_right(cores: list[torch.Tensor]) -> torch.Tensor:
    """Right singular vectors of [C_1; ...; C_T] over its numerical rank: the tasks' joint row space."""
    _, S, Qh = torch.linalg.svd(torch.cat(cores, dim=0), full_matrices=False)
    return Qh[: numerical_rank(S)].T


def _cores(inputs: SlotInputs) -> list[torch.Tensor]:
    return [c.to(torch.float64) for c in inputs.cores]


def knots_ties(inputs: SlotInputs) -> torch.Tensor:
    """KnOTS-TIES: TIES on each task's block P^T C_t of the concatenated cores' SVD, mapped back by P."""
    cores = _cores(inputs)
    left = joint_left(cores)
    return left @ ties(replace(inputs, cores=[left.T @ c for c in cores]))


def knots_dare_ties(inputs: SlotInputs) -> torch.Tensor:
    """KnOTS-DARE-TIES: drop and rescale each block, then elect signs and take the disjoint mean (no trim)."""
    cores = _cores(inputs)
    left = joint_left(cores)
    dropped = [
        drop_and_rescale(left.T @ c, d, inputs.generator) for c, d in zip(cores, inputs.density, strict=True)
    ]
    return left @ ties(replace(inputs, cores=dropped, density=[1.0] * len(dropped)))


def in_core_space(inner: MethodFn) -> MethodFn:
    """`inner` applied to the cores M_t = L^T C_t R in the tasks' own reference bases L, R, mapped back."""

    def merged(inputs: SlotInputs) -> torch.Tensor:
        cores = _cores(inputs)
        left, right = joint_left(cores), joint_right(cores)
        aligned = replace(inputs, cores=[left.T @ c @ right for c in cores])
        return left @ inner(aligned) @ right.T

    merged.__name__ = f"core_{inner.__name__}"
    merged.__doc__ = f"Core Space merging with `{inner.__name__}` as the inner merge."
    return merged


core_ties = in_core_space(ties)
core_dare_linear = in_core_space(dare_linear)
core_dare_ties = in_core_space(dare_ties)

_KNOTS = "Stoica et al. 2025, Model merging with SVD to tie the KnOTS (ICLR 2025, arXiv:2410.19735)"
_CORE = (
    "Panariello et al. 2025, Accurate and Efficient Low-Rank Model Merging in Core Space "
    "(NeurIPS 2025, arXiv:2509.17786)"
)
# Same defaults as ties / dare_*: the papers tune them per model (KnOTS ViT-B: top 20%, drop 0.1; Llama-8B:
# no trim, drop 0.8), and a lambda grid on validation data matters more than the default.
_TIES = {"density": 0.2}
_DARE = {"density": 0.5}
_DENSITY = ("weight", "density")

register(
    MergeMethod(
        "knots_ties",
        knots_ties,
        "TIES on the task blocks of the SVD of the concatenated deltas (KnOTS)",
        _KNOTS,
        task_parameters=_DENSITY,
        defaults=_TIES,
    )
)
register(
    MergeMethod(
        "knots_dare_ties",
        knots_dare_ties,
        "DARE, then sign election and disjoint mean, on the KnOTS task blocks",
        _KNOTS,
        task_parameters=_DENSITY,
        shared_parameters={"seed": 0},
        defaults=_DARE,
    )
)
register(
    MergeMethod(
        "core_ties",
        core_ties,
        "TIES on the tasks' cores in their own reference bases (Core Space)",
        _CORE,
        task_parameters=_DENSITY,
        defaults=_TIES,
    )
)
register(
    MergeMethod(
        "core_dare_linear",
        core_dare_linear,
        "DARE then weighted sum, in Core Space",
        _CORE,
        task_parameters=_DENSITY,
        shared_parameters={"seed": 0},
        defaults=_DARE,
    )
)
register(
    MergeMethod(
        "core_dare_ties",
        core_dare_ties,
        "DARE then TIES sign election, in Core Space",
        _CORE,
        task_parameters=_DENSITY,
        shared_parameters={"seed": 0},
        defaults=_DARE,
    )
)
