"""The math of docs/math.md on factored deltas: norms, gauge-freedom, exactness, k selection, refinement."""

from __future__ import annotations

import torch

from mergekit_subspace.basis import captured_energy, fit_slot_basis
from mergekit_subspace.lowrank import LowRankDelta, core_to_factors, stored_error_sq


def random_deltas(count: int, m: int = 40, n: int = 30, seed: int = 0) -> list[LowRankDelta]:
    generator = torch.Generator().manual_seed(seed)
    deltas = []
    for i in range(count):
        r = 2 + i % 3
        B = torch.randn(m, r, generator=generator, dtype=torch.float64)
        A = torch.randn(r, n, generator=generator, dtype=torch.float64)
        deltas.append(LowRankDelta(B=B, A=A, scale=0.5 + i))
    return deltas


def test_norm_and_gram_factors_match_dense() -> None:
    delta = random_deltas(1)[0]
    dense = delta.to_dense()
    assert abs(delta.norm_sq() - float((dense * dense).sum())) < 1e-8 * float((dense * dense).sum())
    Y, Z = delta.left_gram_factor(), delta.right_gram_factor()
    torch.testing.assert_close(Y @ Y.T, dense @ dense.T)
    torch.testing.assert_close(Z @ Z.T, dense.T @ dense)


def test_basis_is_gauge_invariant() -> None:
    """Refactoring an adapter as (B G, G^-1 A) must not change the basis nor the cores."""
    deltas = random_deltas(4)
    generator = torch.Generator().manual_seed(7)
    regauged = []
    for d in deltas:
        G = torch.randn(d.rank, d.rank, generator=generator, dtype=torch.float64) + 3 * torch.eye(d.rank)
        regauged.append(LowRankDelta(B=d.B @ G, A=torch.linalg.solve(G, d.A), scale=d.scale))
    first = fit_slot_basis(deltas, k=5)
    second = fit_slot_basis(regauged, k=5)
    torch.testing.assert_close(first.U, second.U, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(first.V, second.V, atol=1e-9, rtol=1e-7)
    for a, b in zip(deltas, regauged, strict=True):
        torch.testing.assert_close(
            a.project(first.U, first.V), b.project(second.U, second.V), atol=1e-9, rtol=1e-7
        )


def test_exact_when_k_reaches_total_rank() -> None:
    deltas = random_deltas(4)
    total_rank = sum(d.rank for d in deltas)
    basis = fit_slot_basis(deltas, k=total_rank)
    for d in deltas:
        core = d.project(basis.U, basis.V)
        rebuilt = basis.U @ core @ basis.V.T
        torch.testing.assert_close(rebuilt, d.to_dense(), atol=1e-9, rtol=1e-9)
        # the error comes from a cancelling difference, so float64 leaves ~1e-16 of the norm
        assert stored_error_sq(d, basis.U, core, basis.V) < 1e-12 * d.norm_sq()
        B, A = core_to_factors(basis.U, core, basis.V, d.rank)
        torch.testing.assert_close(B @ A, d.to_dense(), atol=1e-9, rtol=1e-9)


def test_k_is_capped_at_what_a_slot_holds() -> None:
    deltas = random_deltas(2)  # total rank 5
    basis = fit_slot_basis(deltas, k=100)
    assert basis.k_out == 5 and basis.k_in == 5 and basis.capped


def test_truncation_error_matches_dense_error() -> None:
    deltas = random_deltas(5)
    basis = fit_slot_basis(deltas, k=3)
    for d in deltas:
        core = d.project(basis.U, basis.V)
        dense_err = float(((d.to_dense() - basis.U @ core @ basis.V.T) ** 2).sum())
        assert abs(stored_error_sq(d, basis.U, core, basis.V) - dense_err) < 1e-8 * d.norm_sq()
        assert dense_err > 0


def test_energy_selection_picks_smallest_k() -> None:
    deltas = random_deltas(6, seed=2)
    for energy in (0.5, 0.8, 0.95):
        basis = fit_slot_basis(deltas, energy=energy)
        assert captured_energy(deltas, basis) >= energy
        k = max(basis.k_out, basis.k_in)
        smaller = fit_slot_basis(deltas, k=k - 1) if k > 1 else None
        assert smaller is None or captured_energy(deltas, smaller) < energy


def test_refinement_never_loses_energy() -> None:
    deltas = random_deltas(6, seed=3)
    plain = captured_energy(deltas, fit_slot_basis(deltas, k=4))
    refined = captured_energy(deltas, fit_slot_basis(deltas, k=4, refine=5))
    assert refined >= plain - 1e-12
    assert 0 < plain < 1


def test_normalization_stops_a_loud_adapter_from_owning_the_basis() -> None:
    deltas = random_deltas(4, seed=5)
    loud = LowRankDelta(B=deltas[0].B, A=deltas[0].A, scale=1e4)
    zoo = [loud] + deltas[1:]
    weighted = fit_slot_basis(zoo, k=3, normalize=True)
    raw = fit_slot_basis(zoo, k=3, normalize=False)
    quiet_err = [
        sum(stored_error_sq(d, b.U, d.project(b.U, b.V), b.V) / d.norm_sq() for d in deltas[1:])
        for b in (weighted, raw)
    ]
    assert quiet_err[0] < quiet_err[1]


def test_from_dense_reports_dropped_energy() -> None:
    generator = torch.Generator().manual_seed(1)
    dense = torch.randn(20, 12, generator=generator, dtype=torch.float64)
    low, dropped = LowRankDelta.from_dense(dense, max_rank=4)
    singular = torch.linalg.svdvals(dense)
    expected = float((singular[4:] ** 2).sum() / (singular**2).sum())
    assert abs(dropped - expected) < 1e-10
    full, none_dropped = LowRankDelta.from_dense(dense, max_rank=12)
    torch.testing.assert_close(full.to_dense(), dense)
    assert none_dropped < 1e-12
