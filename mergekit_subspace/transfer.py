"""Basis transfer: fit a small zoo's bases pulled toward another store's bases (`subspace.transfer_from`).

A zoo of a few adapters spans few directions, and a task added later often lies outside them. A store fit on
a larger zoo of the same base model knows directions that tasks of that model tend to use. Per slot, the
left basis is then the top k_out eigenvectors of

    M_out = sum_t w_t^2 D_t D_t^T  +  a * (E / k_s) * U_s U_s^T        E = sum_t w_t^2 ||D_t||^2

(U_s: the source store's left basis of the slot, k_s its width), and V likewise from D_t^T D_t and V_s. The
prior's total energy is `a` times the zoo's own, so `a` means the same on every slot and zoo: 0 is the plain
fit, 1 weighs the source as much as the zoo. M_out = S S^T for the column stack S = [w_t Y_t | sqrt(a E /
k_s) U_s] (Y_t Y_t^T = D_t D_t^T, from the factors), so the exact solver's one thin SVD takes the prior as
a few more columns and no m x n matrix is formed. Slots the source store does not hold get the plain fit.

`transfer_weight: auto` (the default) picks `a` per slot from GRID by leave-one-task-out: each task is
projected on the bases fit without it, and the `a` keeping the most held-out energy wins (the smallest on a
tie). A slot touched by one task has no held-out fold and takes DEFAULT_WEIGHT. The weight each slot used is
recorded in the manifest (`slots[m]["transfer_weight"]`).

Transfer fits take the exact solver: the point is a small zoo, where the dense SVD is cheap.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_subspace.basis import SlotBasis, fit_slot_basis, task_weights
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.lowrank import COMPUTE_DTYPE, LowRankDelta
from mergekit_subspace.recipe import SubspaceSettings

GRID = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)  # prior weights `auto` chooses among
DEFAULT_WEIGHT = 1.0  # a slot touched by a single task (nothing to hold out)
TIE = 1e-9  # held-out shares this close are equal: the smaller weight wins
Bases = tuple[torch.Tensor, torch.Tensor]


@dataclass
class TransferSource:
    """The store a fit is pulled toward: its path, manifest and (lazily read) bases."""

    path: Path
    manifest: dict[str, Any]
    files: Any  # io.store.StoreFiles

    @classmethod
    def open(cls, path: str | Path) -> TransferSource:
        from mergekit_subspace.io.store import StoreFiles

        try:
            files = StoreFiles(path)
        except SubspaceError as exc:
            raise SubspaceError(f"subspace.transfer_from is not a readable store: {exc}") from None
        return cls(Path(path), files.manifest, files)

    def shape(self, module: str) -> tuple[int, int] | None:
        meta = self.manifest["slots"].get(module)
        return None if meta is None else (int(meta["shape"][0]), int(meta["shape"][1]))

    def holds(self, module: str, shape: tuple[int, int]) -> bool:
        """Whether the store has the slot; one of another shape is refused."""
        found = self.shape(module)
        if found is not None and found != tuple(shape):
            raise SubspaceError(
                f"subspace.transfer_from: slot '{module}' is {found} in that store, {tuple(shape)} in this zoo",
                self.path,
            )
        return found is not None

    def prior(self, module: str, shape: tuple[int, int]) -> Bases | None:
        """(U_s, V_s) of the slot in float64, or None when the source store does not hold it."""
        if not self.holds(module, shape):
            return None
        U, V = self.files.basis(module)
        return U.to(COMPUTE_DTYPE), V.to(COMPUTE_DTYPE)


def open_source(settings: SubspaceSettings) -> TransferSource | None:
    """The settings' transfer source, opened and its manifest checked (None without `transfer_from`)."""
    return None if settings.transfer_from is None else TransferSource.open(settings.transfer_from)


def check_source(
    source: TransferSource | None, shapes: dict[str, tuple[int, int]], base_identity: dict[str, Any] | None
) -> None:
    """Refuse, before any fit, a source store of another base model, with a slot of another shape, or
    sharing no slot with the zoo."""
    if source is None:
        return
    theirs = source.manifest.get("base_model") or {}
    ours = base_identity or {}
    for key in ("config_sha256", "model_type"):
        if theirs.get(key) and ours.get(key) and theirs[key] != ours[key]:
            raise SubspaceError(
                f"subspace.transfer_from: that store was fit on another base model ({key} "
                f"{str(theirs[key])[:16]}, this recipe's base has {str(ours[key])[:16]})",
                source.path,
            )
    if not [m for m in sorted(shapes) if source.holds(m, shapes[m])]:
        raise SubspaceError(
            "subspace.transfer_from: that store holds none of this zoo's slots (another model, or other "
            "target modules)",
            source.path,
        )


def prior_columns(prior: Bases, energy: float, weight: float) -> Bases:
    """sqrt(a E / k_s) U_s and the same for V_s: columns whose outer product is the prior term of M."""
    U, V = prior
    return (
        U * (weight * energy / max(U.shape[1], 1)) ** 0.5,
        V * (weight * energy / max(V.shape[1], 1)) ** 0.5,
    )


def _top(stack: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.svd(stack, full_matrices=False)[0][:, :k]


def choose_weight(
    deltas: Sequence[LowRankDelta], prior: Bases, k_out: int, k_in: int, normalize: bool
) -> tuple[float, dict[float, float]]:
    """The GRID weight keeping the most held-out energy, leaving one task out at a time, and the held-out
    share per weight. Gram factors are formed once; each fold and weight costs two thin SVDs."""
    if len(deltas) < 2:
        return DEFAULT_WEIGHT, {}
    weights = task_weights(deltas, normalize)
    lefts = [w * d.left_gram_factor() for w, d in zip(weights, deltas, strict=True)]
    rights = [w * d.right_gram_factor() for w, d in zip(weights, deltas, strict=True)]
    energies = [w * w * d.norm_sq() for w, d in zip(weights, deltas, strict=True)]
    kept = dict.fromkeys(GRID, 0.0)
    for held, delta in enumerate(deltas):
        others = [i for i in range(len(deltas)) if i != held]
        energy = sum(energies[i] for i in others)
        Y = torch.cat([lefts[i] for i in others], dim=1)
        Z = torch.cat([rights[i] for i in others], dim=1)
        for weight in GRID:
            extra_out, extra_in = prior_columns(prior, energy, weight)
            U = _top(torch.cat([Y, extra_out], dim=1) if weight else Y, k_out)
            V = _top(torch.cat([Z, extra_in], dim=1) if weight else Z, k_in)
            core = delta.project(U, V)
            kept[weight] += weights[held] ** 2 * float(torch.sum(core * core))
    total = sum(energies) or 1.0
    shares = {weight: value / total for weight, value in kept.items()}
    top = max(shares.values())
    return min(weight for weight in GRID if shares[weight] >= top - TIE), shares


def fit_slot(
    deltas: Sequence[LowRankDelta],
    prior: Bases | None,
    settings: SubspaceSettings,
    k: int | None,
    energy: float | None,
    refine: int,
    k_in: int | None,
) -> tuple[SlotBasis, float | None]:
    """The exact fit of one slot, pulled toward `prior` when there is one; returns the basis and the weight
    used (None without a prior). `energy` and `refine` only ever reach the plain fit (the recipe refuses
    them beside transfer_from)."""
    if prior is None:
        basis = fit_slot_basis(
            deltas, k=k, energy=energy, normalize=settings.normalize, refine=refine, k_in=k_in
        )
        return basis, None
    assert k is not None and energy is None and refine == 0
    device = deltas[0].B.device
    prior = (prior[0].to(device), prior[1].to(device))
    weight = settings.transfer_weight
    if weight is None or weight == "auto":
        m, n = deltas[0].shape
        total_rank = sum(d.rank for d in deltas)
        k_out, k_in_ = min(k, m, total_rank), min(k if k_in is None else k_in, n, total_rank)
        weight = choose_weight(deltas, prior, k_out, k_in_, settings.normalize)[0]
    weight = float(weight)
    weights = task_weights(deltas, settings.normalize)
    zoo_energy = sum(w * w * d.norm_sq() for w, d in zip(weights, deltas, strict=True))
    columns = prior_columns(prior, zoo_energy, weight) if weight else None
    basis = fit_slot_basis(deltas, k=k, normalize=settings.normalize, k_in=k_in, prior=columns)
    return basis, weight


def describe(manifest: dict[str, Any]) -> str:
    """One line for `compress`: the source store and the weights the slots used ('' without transfer)."""
    source = manifest["settings"].get("transfer_from")
    if source is None:
        return ""
    used = [meta["transfer_weight"] for meta in manifest["slots"].values() if "transfer_weight" in meta]
    plain = len(manifest["slots"]) - len(used)
    line = f"transfer from {source} (weight {manifest['settings'].get('transfer_weight', 'auto')}): "
    if not used:
        return line + "no slot of that store matched; every slot is a plain fit"
    line += (
        f"{len(used)} slot(s) pulled toward it, weight median {statistics.median(used):g} "
        f"(min {min(used):g}, max {max(used):g})"
    )
    return line + (f"; {plain} slot(s) it does not hold fit plainly" if plain else "")
