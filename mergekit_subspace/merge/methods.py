"""Merge methods on per-slot cores: one small function each, and a registry like mergekit's.

Every task's core C_t (k_out x k_in) lives in the same slot basis (U, V), so a merge is arithmetic on these
small matrices; the pipeline turns the merged core into PEFT factors with U C_m V^T never formed. Because U
and V are orthonormal, the spectral methods (tsv, iso_c, iso_cts) give exactly what they give on the full
deltas when the basis holds the tasks exactly. The entry-wise methods (ties, dare_*) act on core entries,
i.e. in the shared singular coordinates, not on raw weight entries; knots_* and core_* (subspace_methods.py)
first re-align the cores to a basis of the merged tasks' own, as KnOTS and Core Space merging do.

A task absent from a slot has a zero delta there; the functions receive a zero core for it. Each function
returns the merged core before the global `lambda`, which the pipeline applies (every method is linear in it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# Singular values below RANK_TOL * largest are treated as zero: cores read from a float32 store carry noise
# around 1e-7 relative, which must not become directions (iso_c would lift it to the mean singular value).
RANK_TOL = 1e-5


@dataclass(frozen=True)
class SlotInputs:
    """What a method sees for one slot: the tasks' cores in recipe order and their resolved parameters."""

    cores: list[torch.Tensor]  # float64, k_out x k_in, zeros where the task does not touch the slot
    weights: list[float]
    density: list[float]
    rank: int | None = None  # output rank (None: keep the merged core's numerical rank)
    options: dict[str, float] = field(default_factory=dict)  # shared method options (common_fraction, ...)
    generator: torch.Generator | None = None  # seeded per slot, for DARE
    shape: tuple[int, int] | None = None  # the slot's full (out, in) shape, for TSV's 1/T share


MethodFn = Callable[[SlotInputs], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function, the parameters it accepts, and where it comes from."""

    name: str
    fn: MethodFn
    summary: str
    reference: str
    task_parameters: tuple[str, ...] = ("weight",)  # may vary by task and by layer
    shared_parameters: dict[str, float] = field(default_factory=dict)  # name -> default, global only
    defaults: dict[str, float] = field(default_factory=dict)  # defaults of task parameters

    @property
    def parameters(self) -> tuple[str, ...]:
        return ("lambda", *self.task_parameters, *self.shared_parameters)


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """The registered method, or a KeyError naming the known ones."""
    if name not in METHODS:
        raise KeyError(f"unknown merge method '{name}' (known: {', '.join(METHODS)})")
    return METHODS[name]


# ---- helpers --------------------------------------------------------------------------------------------


def _stack(inputs: SlotInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Cores as a (T, k_out, k_in) stack and weights broadcastable against it."""
    cores = torch.stack([c.to(torch.float64) for c in inputs.cores])
    weights = torch.tensor(inputs.weights, dtype=torch.float64).view(-1, 1, 1)
    return cores, weights


def _present(inputs: SlotInputs) -> list[int]:
    """Indices of tasks with a non-zero core in this slot."""
    return [i for i, c in enumerate(inputs.cores) if bool(torch.any(c != 0))]


def trim_to_density(core: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top `density` share of entries by magnitude (at least one), zero the rest (TIES step 1)."""
    if density >= 1.0:
        return core.clone()
    keep = max(1, int(density * core.numel()))
    flat = core.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.argsort(flat.abs(), descending=True)[:keep]] = 1.0
    return (flat * mask).reshape(core.shape)


def elect_sign(tau: torch.Tensor) -> torch.Tensor:
    """Per-entry sign of the summed (trimmed, weighted) deltas; ties go to +, as in mergekit (TIES step 2)."""
    return torch.where(tau.sum(dim=0) >= 0, 1.0, -1.0).to(tau.dtype)


def drop_and_rescale(core: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: drop each entry with probability 1 - density, scale survivors by 1 / density."""
    if density >= 1.0:
        return core.clone()
    keep = torch.rand(core.shape, generator=generator, dtype=torch.float64) < density
    return torch.where(keep, core / density, torch.zeros_like(core))


def numerical_rank(singular: torch.Tensor) -> int:
    if singular.numel() == 0 or float(singular[0]) <= 0.0:
        return 0
    return int((singular > RANK_TOL * singular[0]).sum())


def polar(vectors: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns (P Q^T of the SVD), over the numerically non-zero directions.

    Dropping null directions matters: for two equal columns [u, u] the full polar factor would add an
    arbitrary vector orthogonal to u; the truncated one gives [u, u] / sqrt(2).
    """
    P, S, Qh = torch.linalg.svd(vectors, full_matrices=False)
    r = max(1, numerical_rank(S))
    return P[:, :r] @ Qh[:r]


def _iso_scale(singular: torch.Tensor, rank: int | None) -> tuple[float, int]:
    """Mean of the non-zero singular values (Iso-C's sigma bar) and how many directions to keep."""
    r = numerical_rank(singular)
    if r == 0:
        return 0.0, 0
    return float(singular[:r].mean()), r if rank is None else min(r, rank)


# ---- methods --------------------------------------------------------------------------------------------


def linear(inputs: SlotInputs) -> torch.Tensor:
    """Weighted average sum_t w_t C_t / sum_t w_t (mergekit `linear` with normalize: true)."""
    cores, weights = _stack(inputs)
    total = float(weights.sum())
    return (cores * weights).sum(dim=0) / (total if abs(total) > 1e-12 else 1.0)


def task_arithmetic(inputs: SlotInputs) -> torch.Tensor:
    """Weighted sum of task vectors sum_t w_t C_t."""
    cores, weights = _stack(inputs)
    return (cores * weights).sum(dim=0)


def mean(inputs: SlotInputs) -> torch.Tensor:
    """Plain mean of the task deltas, weights ignored: the mean-adapter baseline."""
    cores, _ = _stack(inputs)
    return cores.mean(dim=0)


def _ties_combine(tau: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    sign = elect_sign(tau)
    agree = (torch.sign(tau) == sign).to(tau.dtype)  # zeros (trimmed or dropped) never agree
    merged = (tau * agree).sum(dim=0)
    if not normalize:
        return merged
    divisor = (weights * agree).sum(dim=0)
    return merged / torch.where(divisor.abs() > 1e-12, divisor, torch.ones_like(divisor))


def ties(inputs: SlotInputs) -> torch.Tensor:
    """TIES: trim each core to its top-density entries, elect a sign per entry, average the agreeing ones."""
    cores, weights = _stack(inputs)
    trimmed = torch.stack([trim_to_density(c, d) for c, d in zip(cores, inputs.density, strict=True)])
    return _ties_combine(trimmed * weights, weights, normalize=True)


def dare_linear(inputs: SlotInputs) -> torch.Tensor:
    """DARE then task arithmetic: random drop with rescale, weighted sum."""
    cores, weights = _stack(inputs)
    dropped = torch.stack(
        [drop_and_rescale(c, d, inputs.generator) for c, d in zip(cores, inputs.density, strict=True)]
    )
    return (dropped * weights).sum(dim=0)


def dare_ties(inputs: SlotInputs) -> torch.Tensor:
    """DARE then TIES sign election; agreeing entries are summed, not averaged (as mergekit's dare_ties)."""
    cores, weights = _stack(inputs)
    dropped = torch.stack(
        [drop_and_rescale(c, d, inputs.generator) for c, d in zip(cores, inputs.density, strict=True)]
    )
    return _ties_combine(dropped * weights, weights, normalize=False)


def tsv(inputs: SlotInputs) -> torch.Tensor:
    """TSV-M: each task keeps its top 1/T singular triplets; the stacked singular vectors are
    orthogonalised (polar factor) on both sides, then recombined with the kept singular values."""
    present = _present(inputs)
    k_out, k_in = inputs.cores[0].shape
    if not present:
        return torch.zeros(k_out, k_in, dtype=torch.float64)
    # The paper shares the full rank min(m, n) among the tasks; a task never keeps more than it has.
    budget = min(inputs.shape) if inputs.shape is not None else min(k_out, k_in)
    if inputs.rank is not None:
        budget = min(budget, inputs.rank)
    share = max(1, budget // len(present))
    lefts, values, rights = [], [], []
    for i in present:
        P, S, Qh = torch.linalg.svd(
            inputs.weights[i] * inputs.cores[i].to(torch.float64), full_matrices=False
        )
        keep = max(1, min(share, numerical_rank(S)))
        lefts.append(P[:, :keep])
        values.append(S[:keep])
        rights.append(Qh[:keep].T)
    U_perp, V_perp = polar(torch.cat(lefts, dim=1)), polar(torch.cat(rights, dim=1))
    return (U_perp * torch.cat(values)) @ V_perp.T


def iso_c(inputs: SlotInputs) -> torch.Tensor:
    """Iso-C: SVD of the task-arithmetic sum, every singular value replaced by their mean (same nuclear norm).

    The paper's deltas are full fine-tunes, of full rank; a sum of LoRAs is not, so the mean runs over the
    numerically non-zero singular values and the null space stays empty (lifting it would add arbitrary
    directions). With an output rank, the top directions of the sum are kept at that same mean value.
    """
    P, S, Qh = torch.linalg.svd(task_arithmetic(inputs), full_matrices=False)
    sigma, keep = _iso_scale(S, inputs.rank)
    return sigma * (P[:, :keep] @ Qh[:keep])


def iso_cts(inputs: SlotInputs) -> torch.Tensor:
    """Iso-CTS: the top common_fraction of the sum's singular directions, plus for each task the top
    directions of its residual outside that common subspace; both sides orthogonalised, spectrum flattened.

    The budget split follows the reference code (common size rounded so the rest divides evenly among the
    tasks), over the sum's numerical rank instead of min(m, n), for the same reason as in iso_c; a task
    whose residual has fewer directions than its share contributes only those it has.
    """
    summed = task_arithmetic(inputs)
    P, S, Qh = torch.linalg.svd(summed, full_matrices=False)
    present = _present(inputs)
    r = numerical_rank(S)
    if r == 0 or not present:
        return torch.zeros_like(summed)
    budget = r if inputs.rank is None else min(r, inputs.rank)
    fraction = float(inputs.options.get("common_fraction", 0.8))
    common = int(budget * fraction)
    per_task = round((budget - common) / len(present))
    common = max(0, budget - per_task * len(present))
    lefts, values, rights = [P[:, :common]], [S[:common]], [Qh[:common].T]
    project_out = torch.eye(P.shape[0], dtype=torch.float64) - P[:, :common] @ P[:, :common].T
    for i in present:
        if per_task == 0:
            break
        residual = project_out @ (inputs.weights[i] * inputs.cores[i].to(torch.float64))
        Pt, St, Qht = torch.linalg.svd(residual, full_matrices=False)
        keep = min(per_task, int((St > RANK_TOL * S[0]).sum()))  # skip directions the task does not have
        lefts.append(Pt[:, :keep])
        values.append(St[:keep])
        rights.append(Qht[:keep].T)
    values_all = torch.cat(values)
    if values_all.numel() == 0:
        return torch.zeros_like(summed)
    U_perp, V_perp = polar(torch.cat(lefts, dim=1)), polar(torch.cat(rights, dim=1))
    return float(values_all.mean()) * (U_perp @ V_perp.T)


_DENSITY_TIES = {"density": 0.2}
_DENSITY_DARE = {"density": 0.5}

register(
    MergeMethod(
        "linear",
        linear,
        "weighted average of the task deltas",
        "Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
    )
)
register(
    MergeMethod(
        "task_arithmetic",
        task_arithmetic,
        "weighted sum of task vectors, scaled by lambda",
        "Ilharco et al. 2023, Editing Models with Task Arithmetic (arXiv:2212.04089)",
    )
)
register(
    MergeMethod(
        "ties",
        ties,
        "trim to top-density entries, elect signs, disjoint mean",
        "Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
        task_parameters=("weight", "density"),
        defaults=_DENSITY_TIES,
    )
)
register(
    MergeMethod(
        "dare_linear",
        dare_linear,
        "random drop (1 - density) with rescale, then weighted sum",
        "Yu et al. 2024, Language Models are Super Mario / DARE (arXiv:2311.03099)",
        task_parameters=("weight", "density"),
        shared_parameters={"seed": 0},
        defaults=_DENSITY_DARE,
    )
)
register(
    MergeMethod(
        "dare_ties",
        dare_ties,
        "random drop with rescale, then TIES sign election",
        "Yu et al. 2024 (arXiv:2311.03099) with Yadav et al. 2023 (arXiv:2306.01708)",
        task_parameters=("weight", "density"),
        shared_parameters={"seed": 0},
        defaults=_DENSITY_DARE,
    )
)
register(
    MergeMethod(
        "tsv",
        tsv,
        "Task Singular Vectors merge (TSV-M): per-task top 1/T singular vectors, orthogonalised",
        "Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging "
        "(CVPR 2025, arXiv:2412.00081)",
    )
)
register(
    MergeMethod(
        "iso_c",
        iso_c,
        "isotropic merge in the common subspace: flatten the task-arithmetic spectrum",
        "Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and "
        "Task-Specific Subspaces (ICML 2025, arXiv:2502.04959)",
    )
)
register(
    MergeMethod(
        "iso_cts",
        iso_cts,
        "isotropic merge in common + task-specific subspaces",
        "Marczak et al. 2025 (arXiv:2502.04959)",
        shared_parameters={"common_fraction": 0.8},
    )
)
register(
    MergeMethod(
        "mean",
        mean,
        "plain mean of the task deltas (the mean-adapter baseline; weights not used)",
        "the mean-adapter baseline of every benchmark (no paper)",
        task_parameters=(),
    )
)


def describe_methods() -> str:
    """One line per method with its reference, for --help and the docs."""
    return "\n".join(f"{m.name}: {m.summary}. {m.reference}" for m in METHODS.values())


# KnOTS and Core Space merging register themselves after the methods they build on.
from mergekit_subspace.merge import subspace_methods  # noqa: E402, F401
