"""KnOTS and Core Space merging on cores: each against a dense implementation of its paper's algorithm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_lora
from test_merge import dense, make_store, run_recipe

from mergekit_subspace.merge import METHODS, SlotInputs
from mergekit_subspace.merge.inputs import from_store
from mergekit_subspace.merge.methods import ties, tsv
from mergekit_subspace.merge.run import _slot_seed
from mergekit_subspace.merge.subspace_methods import (
    core_dare_linear,
    core_dare_ties,
    core_ties,
    knots_dare_ties,
    knots_ties,
)

PEERS = ["knots_ties", "knots_dare_ties", "core_ties", "core_dare_linear", "core_dare_ties"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=_gen(seed), dtype=torch.float64))[0]


def _holding(columns: torch.Tensor, width: int, seed: int) -> torch.Tensor:
    """A random orthonormal basis of `width` columns whose span holds the given columns (as a store's does)."""
    rank = int(torch.linalg.matrix_rank(columns))
    extra = torch.randn(columns.shape[0], width - rank, generator=_gen(seed), dtype=torch.float64)
    span = torch.linalg.svd(torch.cat([columns, extra], dim=1), full_matrices=False)[0][:, :width]
    return span @ _orthonormal(width, width, seed + 1)


def _lora(m: int, n: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    return torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(
        r, n, generator=g, dtype=torch.float64
    )


def _slot(
    cores: list[torch.Tensor], density: float = 1.0, seed: int | None = None, **kw: object
) -> SlotInputs:
    return SlotInputs(
        cores=cores,
        weights=kw.pop("weights", [1.0] * len(cores)),  # type: ignore[arg-type]
        density=[density] * len(cores),
        generator=_gen(seed) if seed is not None else None,
        **kw,  # type: ignore[arg-type]
    )


# ---- the papers' algorithms, written out on dense matrices ------------------------------------------------


def paper_ties(reps: list[torch.Tensor], density: float) -> torch.Tensor:
    """KnOTS' ties_masking + disjoint mean: top entries per task, sign of the summed values, mean of agreeing."""
    flat = torch.stack([r.reshape(-1) for r in reps])
    keep = int(density * flat.shape[1])
    if density < 1.0:  # (the paper's kthvalue mask also keeps the entry at the threshold: one more)
        top = flat.abs().argsort(dim=1, descending=True)[:, :keep]
        flat = torch.zeros_like(flat).scatter(1, top, flat.gather(1, top))
    sign = torch.sign(flat.sum(dim=0))
    agree = torch.where(sign > 0, flat > 0, flat < 0)
    merged = (flat * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    return merged.reshape(reps[0].shape)


def paper_knots(
    deltas: list[torch.Tensor], density: float, drop: torch.Generator | None = None
) -> torch.Tensor:
    """KnOTS (task_merger.SVDMerger): SVD of [D_1 ... D_T], per-task blocks diag(s) V_t^T, TIES, U @ merged."""
    U, s, Vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
    keep = s > 1e-10 * s[0]
    U, s, Vh = U[:, keep], s[keep], Vh[keep]
    reps = [torch.diag(s) @ block for block in torch.split(Vh, deltas[0].shape[1], dim=1)]
    if drop is not None:  # apply_dare, then ties_masking with topK 100
        reps = [
            torch.where(torch.rand(r.shape, generator=drop, dtype=r.dtype) < density, r / density, 0 * r)
            for r in reps
        ]
        density = 1.0
    return U @ paper_ties(reps, density)


def paper_core_space(loras: list[tuple[torch.Tensor, torch.Tensor]], inner) -> torch.Tensor:
    """Core Space (MatrixPerLayerMerger.get_core_matrices): reference bases from the stacked B's and A's."""
    U_ref = torch.linalg.svd(torch.cat([B for B, _ in loras], dim=1), full_matrices=False)[0]
    Vh_ref = torch.linalg.svd(torch.cat([A for _, A in loras], dim=0), full_matrices=False)[2]
    cores = [U_ref.T @ B @ A @ Vh_ref.T for B, A in loras]
    return U_ref @ inner(cores) @ Vh_ref


def paper_tsv(matrices: list[torch.Tensor]) -> torch.Tensor:
    """TSV-M as the Core Space code writes it (get_tsv_delta_w): top 1/T of each, both sides orthogonalised."""
    share = matrices[0].shape[0] // len(matrices)
    lefts, values, rights = [], [], []
    for M in matrices:
        u, s, vh = torch.linalg.svd(M, full_matrices=False)
        lefts.append(u[:, :share])
        values.append(s[:share])
        rights.append(vh[:share])
    uu, _, vu = torch.linalg.svd(torch.cat(lefts, dim=1), full_matrices=False)
    uv, _, vv = torch.linalg.svd(torch.cat(rights, dim=0), full_matrices=False)
    return uu @ vu @ torch.diag(torch.cat(values)) @ uv @ vv


# ---- KnOTS --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_knots_ties_is_the_papers_algorithm_on_dense_deltas(density: float) -> None:
    """With V the identity (k_in = n) the cores' blocks are the paper's numbers; any left basis U holding
    the tasks gives the same merge (the SVD of [C_1 ... C_T] is that of [D_1 ... D_T] rotated by U)."""
    m, n = 12, 7
    deltas = [B @ A for B, A in (_lora(m, n, r, seed) for r, seed in [(2, 1), (3, 2), (2, 3)])]
    expected = paper_knots(deltas, density)
    U = _holding(torch.cat(deltas, dim=1), 9, seed=4)  # the 7 task directions and 2 more
    cores = [U.T @ D for D in deltas]
    got = U @ knots_ties(_slot(cores, density))
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert not torch.allclose(got, sum(deltas) / 3, atol=1e-3)  # the sign election did something


def test_knots_dare_ties_is_the_papers_dare_variant() -> None:
    m, n = 10, 6
    deltas = [B @ A for B, A in (_lora(m, n, 2, seed) for seed in (5, 6, 7))]
    expected = paper_knots(deltas, 0.6, drop=_gen(11))
    got = knots_dare_ties(_slot(deltas, 0.6, seed=11))
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


def test_knots_depends_on_the_right_basis_and_says_so() -> None:
    """The documented difference: blocks stay in V's coordinates, so a rotated right basis changes TIES."""
    deltas = [B @ A for B, A in (_lora(8, 8, 2, seed) for seed in (1, 2))]
    R = _orthonormal(8, 8, seed=3)
    direct = knots_ties(_slot(deltas, 0.3))
    rotated = knots_ties(_slot([D @ R for D in deltas], 0.3)) @ R.T
    assert not torch.allclose(direct, rotated, atol=1e-6)


# ---- Core Space ------------------------------------------------------------------------------------------


def test_core_space_tsv_of_the_paper_is_our_tsv_on_the_cores() -> None:
    """Rotation-invariant merges give in any basis holding the tasks what they give on the cores."""
    m, n, r = 16, 14, 2
    loras = [_lora(m, n, r, seed) for seed in (1, 2, 3)]
    expected = paper_core_space(loras, paper_tsv)
    deltas = [B @ A for B, A in loras]
    U = _holding(torch.cat(deltas, dim=1), 8, seed=9)
    V = _holding(torch.cat(deltas, dim=0).T, 8, seed=10)
    cores = [U.T @ D @ V for D in deltas]
    got = U @ tsv(_slot(cores, shape=(r * 3, r * 3))) @ V.T  # the paper's core is (T r) x (T r)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert torch.linalg.matrix_rank(expected) == 6


def test_core_ties_is_the_same_merge_in_any_store_basis() -> None:
    """The reference bases come from the tasks, so two stores with different bases merge alike; plain ties
    on the stores' cores does not (that is what re-aligning buys)."""
    m, n = 14, 12
    deltas = [B @ A for B, A in (_lora(m, n, 2, seed) for seed in (1, 2, 3))]
    results, plain = [], []
    for seed in (20, 30):
        U = _holding(torch.cat(deltas, dim=1), 10, seed=seed)
        V = _holding(torch.cat(deltas, dim=0).T, 9, seed=seed + 5)
        cores = [U.T @ D @ V for D in deltas]
        results.append(U @ core_ties(_slot(cores, 0.3)) @ V.T)
        plain.append(U @ ties(_slot(cores, 0.3)) @ V.T)
    torch.testing.assert_close(results[0], results[1], atol=1e-10, rtol=1e-10)
    assert not torch.allclose(plain[0], plain[1], atol=1e-4)


def test_core_ties_uses_the_reference_bases_of_the_concatenated_deltas() -> None:
    """Dense check of the mapping: bases from the SVDs of [D_1 ... D_T] and [D_1; ...; D_T], TIES on the
    aligned cores, mapped back."""
    m, n = 11, 9
    deltas = [B @ A for B, A in (_lora(m, n, r, seed) for r, seed in [(1, 4), (3, 5)])]
    L = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)[0][:, :4]
    R = torch.linalg.svd(torch.cat(deltas, dim=0), full_matrices=False)[2][:4].T
    expected = L @ paper_ties([L.T @ D @ R for D in deltas], 0.4) @ R.T
    torch.testing.assert_close(core_ties(_slot(deltas, 0.4)), expected, atol=1e-10, rtol=1e-10)


def test_core_dare_is_reproducible_and_unbiased_in_its_mask() -> None:
    deltas = [B @ A for B, A in (_lora(9, 9, 3, seed) for seed in (1, 2))]
    first = core_dare_linear(_slot(deltas, 0.5, seed=3))
    torch.testing.assert_close(first, core_dare_linear(_slot(deltas, 0.5, seed=3)))
    assert not torch.allclose(first, core_dare_linear(_slot(deltas, 0.5, seed=4)))
    truth = sum(deltas)
    one_error = float((first - truth).norm() / truth.norm())
    mean = sum(core_dare_linear(_slot(deltas, 0.5, seed=s)) for s in range(100)) / 100
    mean_error = float((mean - truth).norm() / truth.norm())
    assert mean_error < one_error / 4  # rescaled survivors: the expectation is the plain sum


# ---- properties every peer method has ----------------------------------------------------------------------


@pytest.mark.parametrize("name", PEERS)
def test_a_single_task_and_copies_of_it_merge_to_itself(name: str) -> None:
    B, A = _lora(10, 8, 3, seed=1)
    core = B @ A
    fn = METHODS[name].fn
    torch.testing.assert_close(fn(_slot([core], seed=0)), core, atol=1e-10, rtol=1e-10)
    copies = fn(_slot([core, core, core], seed=0))
    summed = name in (
        "core_dare_linear",
        "core_dare_ties",
    )  # as dare_linear / dare_ties: agreeing entries add
    torch.testing.assert_close(copies, 3 * core if summed else core, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("fn", [knots_ties, core_ties, knots_dare_ties, core_dare_ties])
def test_the_order_of_the_tasks_does_not_matter(fn) -> None:
    cores = [B @ A for B, A in (_lora(9, 8, 2, seed) for seed in (1, 2, 3))]
    weights = [1.0, 0.5, 2.0]
    density = 0.4 if fn in (knots_ties, core_ties) else 1.0  # DARE's masks follow the task order
    order = [2, 0, 1]
    forward = fn(_slot(cores, density, weights=weights))
    permuted = fn(_slot([cores[i] for i in order], density, weights=[weights[i] for i in order]))
    torch.testing.assert_close(forward, permuted, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("fn", [knots_ties, core_ties, core_dare_linear])
def test_an_absent_task_and_an_empty_slot_are_harmless(fn) -> None:
    core = torch.randn(6, 5, generator=_gen(1), dtype=torch.float64)
    zero = torch.zeros(6, 5, dtype=torch.float64)
    torch.testing.assert_close(fn(_slot([zero, zero], seed=0)), zero)
    with_absent = fn(_slot([core, zero], seed=0))
    alone = fn(_slot([core], seed=0))
    torch.testing.assert_close(with_absent, alone, atol=1e-10, rtol=1e-10)


# ---- through the pipeline -----------------------------------------------------------------------------


def test_every_peer_method_runs_from_a_store_and_writes_what_it_computes(
    tiny_bert: Path, tmp_path: Path
) -> None:
    """The written adapter is U (merged core) V^T on every slot, exactly, for each registered peer method."""
    zoo = [
        make_lora(tiny_bert, tmp_path / "zoo" / "ta", seed=11, r=4, alpha=8),
        make_lora(
            tiny_bert, tmp_path / "zoo" / "tb", seed=12, r=2, alpha=4, targets=("query", "key", "value")
        ),
    ]
    store = make_store(tmp_path, None, zoo)
    cores = from_store(store, None)
    for name in PEERS:
        out = tmp_path / name
        code, output = run_recipe(
            tmp_path, {"merge_method": name, "store": str(store), "output": {"path": str(out)}}
        )
        assert code == 0, output
        report = json.loads((out / "merge_report.json").read_text())
        assert report["method"] == name and "arXiv" in report["reference"]
        got = dense(out / "ta")
        assert set(got) == set(cores.slots)
        for module, delta in got.items():
            U, V = cores.bases[module]
            slot = SlotInputs(
                cores=[cores.core(task, module) for task in ("ta", "tb")],
                weights=[1.0, 1.0],
                density=[METHODS[name].defaults["density"]] * 2,
                generator=torch.Generator().manual_seed(_slot_seed(0, module)) if "dare" in name else None,
            )
            expected = U.double() @ METHODS[name].fn(slot) @ V.double().T
            torch.testing.assert_close(delta.double(), expected, atol=1e-5, rtol=1e-4)
