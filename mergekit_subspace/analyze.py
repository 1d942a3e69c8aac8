"""`analyze`: is a zoo really low-dimensional, which tasks own its directions, how far each update moves the base.

Every number is measured beside a null, so "low-dimensional" is a claim with a baseline: per slot the zoo's
captured energy against k (two-sided, U_k^T D_i V_k, on the task-normalized deltas the fit uses) is compared
with zoos of random adapters of the same shapes, ranks and norms, a few seeds each. Two nulls: `spectrum`
keeps each adapter's own singular values and draws its singular vectors at random (it isolates what the
tasks *share*: a zoo of rank-1-ish adapters is not "low-dimensional" merely because each is), `gaussian`
draws both factors i.i.d. (the classic null).

The work streams slot by slot through `SubspaceBasis.fit_slots`, from factors only (r x r Gram matrices, k x k
cores); no LoRA is densified. The optional base-model part reads each slot's W lazily; the top-k singular
subspace of W + D is computed densely when m * n <= `dense_limit` (MiniLM- and SmolLM-sized slots), else by
block Krylov iteration on the operator x -> W x + B (A x), warm-started from W's own subspace.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_subspace.basis import SlotBasis, slot_seed, task_weights
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.fit import SlotDeltas, SubspaceBasis
from mergekit_subspace.io.checkpoint import Checkpoint
from mergekit_subspace.lowrank import COMPUTE_DTYPE, LowRankDelta
from mergekit_subspace.recipe import SubspaceSettings
from mergekit_subspace.sources import TaskSource, delta_task

LEVELS = (0.5, 0.8, 0.9)
NULLS = ("spectrum", "gaussian")
DENSE_LIMIT = 1 << 22  # m * n up to which the base part takes dense SVDs of W and W + D
KRYLOV_ITERS = 4
OVERSAMPLE = 10
MIN_GAP = 0.02  # a zoo beats the null only by a material margin, not just many standard deviations


@dataclass
class AnalyzeOptions:
    """How wide and how many: `k` scree width, `seeds` per null, `leverage_k` top directions whose owners are
    reported, `overlap_threshold` for the shared-initialization check, `base_k` principal directions of W."""

    k: int = 64
    seeds: int = 3
    leverage_k: int = 8
    overlap_threshold: float = 0.9
    base_k: int = 16
    dense_limit: int = DENSE_LIMIT
    progress: bool = True


@dataclass
class Zoo:
    """The tasks to analyze, where they came from and the fit settings they were (or would be) stored with."""

    kind: str  # "store" or "recipe"
    path: str
    tasks: list[TaskSource]
    settings: SubspaceSettings
    notes: list[str] = field(default_factory=list)


# ---- inputs ------------------------------------------------------------------------------------------------


def store_tasks(store: Any) -> list[TaskSource]:
    """A store's tasks as lazy sources of their stored deltas (one slot's factors per lookup)."""
    from mergekit_subspace.refit import stored_task

    return [stored_task(store, name) for name in store.tasks]


def open_zoo(source: str | Path, allow_pickle: bool = False, progress: bool = True) -> Zoo:
    """A store folder or a compress recipe, checked and opened (adapters read lazily)."""
    path = Path(source)
    if not path.exists():
        raise SubspaceError("not found: give a store folder or a compress recipe (.yaml)", path)
    if path.is_dir():
        if not (path / "manifest.json").is_file():
            raise SubspaceError(
                "is a folder but not a store (no manifest.json); give a store or a recipe", path
            )
        from mergekit_subspace.subspace import SubspaceStore

        store = SubspaceStore(path)
        stored = store.manifest["settings"]
        defaults = SubspaceSettings()
        settings = SubspaceSettings(
            normalize=stored.get("normalize", True),
            solver=stored.get("solver", defaults.solver),
            oversample=stored.get("oversample", defaults.oversample),
            power_iters=stored.get("power_iters", defaults.power_iters),
        )
        mean_err = sum(e["rel_error"] ** 2 for e in store.manifest["tasks"].values()) / max(
            1, len(store.tasks)
        )
        notes = [
            "input is a store: the deltas analysed are the stored approximations U C_i V^T, which lie inside "
            f"the store's bases (rank <= k), so every scree reaches 1 by the stored k; the energy the store "
            f"already dropped (mean squared relative error {mean_err:.4f}) is not seen. Analyze the recipe for "
            "the zoo itself.",
            "input is a store: lora_A is not kept by a store, so the shared-initialization check is skipped.",
        ]
        return Zoo("store", str(path), store_tasks(store), settings, notes)
    from mergekit_subspace.recipe import parse_compress_recipe
    from mergekit_subspace.subspace import load_recipe_tasks

    recipe = parse_compress_recipe(path)
    tasks, _ = load_recipe_tasks(recipe, path, allow_pickle=allow_pickle, progress=progress)
    return Zoo("recipe", str(path), tasks, recipe.subspace)


def analysis_settings(settings: SubspaceSettings, k: int) -> SubspaceSettings:
    """The zoo's fitting options (normalization, solver) at a fixed scree width k, no refinement."""
    return SubspaceSettings(
        k=k,
        normalize=settings.normalize,
        solver=settings.solver,
        oversample=settings.oversample,
        power_iters=settings.power_iters,
    )


# ---- spectra -------------------------------------------------------------------------------------------------


@dataclass
class SlotSpectrum:
    """One slot's task-normalized spectra (left: eigenvalues of sum_i w_i^2 D_i D_i^T, right likewise), their
    total, and the two-sided captured energy of the first k directions for k = 1..K."""

    out: torch.Tensor
    in_: torch.Tensor
    total: float
    capture: torch.Tensor


def slot_spectrum(basis: SlotBasis, deltas: Sequence[LowRankDelta], normalize: bool) -> SlotSpectrum:
    """Spectra and the scree curve sum_i w_i^2 ||U_k^T D_i V_k||^2 / sum_i w_i^2 ||D_i||^2, from k x k cores."""
    width = min(basis.k_out, basis.k_in)
    U, V = basis.U[:, :width].to(COMPUTE_DTYPE), basis.V[:, :width].to(COMPUTE_DTYPE)
    kept = torch.zeros(width, dtype=COMPUTE_DTYPE)
    total = 0.0
    for delta in deltas:
        norm_sq = delta.norm_sq()
        w2 = (1.0 / norm_sq if norm_sq > 0 else 0.0) if normalize else 1.0  # as basis.task_weights
        core = delta.project(U.to(delta.B.device), V.to(delta.B.device)).cpu()
        kept += w2 * core.square().cumsum(0).cumsum(1).diagonal()
        total += w2 * norm_sq
    capture = kept / total if total > 0 else torch.ones(width, dtype=COMPUTE_DTYPE)
    return SlotSpectrum(basis.spectrum_out.cpu().double(), basis.spectrum_in.cpu().double(), total, capture)


def spectrum_stats(values: torch.Tensor, total: float) -> dict[str, Any]:
    """Inverse participation ratio sum p^2 (p = energy shares) and its inverse, and the effective rank of
    Roy & Vetterli (exp of the entropy of the singular values sigma = sqrt(energy) normalized to sum 1).
    `complete` is False when only the leading part of the spectrum is known (randomized solver): the
    figures are then over those directions."""
    energy = values.clamp_min(0.0)
    known = float(energy.sum())
    if known <= 0:
        return {"ipr": None, "participation_ratio": None, "effective_rank": None, "complete": True}
    p = energy / known
    ipr = float(p.square().sum())
    sigma = energy.sqrt()
    q = sigma / sigma.sum()
    q = q[q > 0]
    erank = math.exp(float(-(q * q.log()).sum()))
    complete = total <= 0 or abs(known - total) <= 1e-6 * total
    return {"ipr": ipr, "participation_ratio": 1.0 / ipr, "effective_rank": erank, "complete": complete}


def k_for(capture: torch.Tensor, level: float) -> int | None:
    """Smallest k whose captured energy reaches `level` (None: beyond the scree's width)."""
    hit = (capture >= level - 1e-12).nonzero()
    return int(hit[0]) + 1 if len(hit) else None


def null_deltas(deltas: Sequence[LowRankDelta], kind: str, generator: torch.Generator) -> list[LowRankDelta]:
    """Random adapters matched to `deltas` in shape, rank and norm; `spectrum` also keeps each one's singular
    values (only the singular vectors are random), `gaussian` draws i.i.d. factors."""
    out = []
    for delta in deltas:
        m, n = delta.shape
        B, A = (t.cpu() for t in delta.factors())
        r = delta.rank
        if kind == "spectrum":
            _, r_b = torch.linalg.qr(B, mode="reduced")
            _, r_a = torch.linalg.qr(A.T, mode="reduced")
            sigma = torch.linalg.svdvals(r_b @ r_a.T)
            r = min(r, m, n)
            left = torch.linalg.qr(torch.randn(m, r, generator=generator, dtype=COMPUTE_DTYPE))[0]
            right = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=COMPUTE_DTYPE))[0]
            out.append(LowRankDelta(B=left * sigma[:r], A=right.T))
            continue
        B0 = torch.randn(m, r, generator=generator, dtype=COMPUTE_DTYPE)
        A0 = torch.randn(r, n, generator=generator, dtype=COMPUTE_DTYPE)
        drawn = LowRankDelta(B=B0, A=A0)
        target, now = delta.norm_sq(), drawn.norm_sq()
        out.append(LowRankDelta(B=B0 * math.sqrt(target / now) if now > 0 else B0, A=A0))
    return out


def null_spectra(
    module: str, deltas: Sequence[LowRankDelta], settings: SubspaceSettings, seeds: int
) -> dict[str, list[SlotSpectrum]]:
    """Each null's spectra over `seeds` draws, fit by the same loop and settings as the zoo itself."""
    found: dict[str, list[SlotSpectrum]] = {}
    for kind in NULLS:
        found[kind] = []
        for seed in range(seeds):
            generator = torch.Generator().manual_seed(slot_seed(f"{module}#null-{kind}-{seed}"))
            drawn = null_deltas(deltas, kind, generator)
            tasks = [delta_task(f"null{i}", {module: d}) for i, d in enumerate(drawn)]

            def spectrum(_: str, basis: SlotBasis, slot: SlotDeltas) -> SlotSpectrum:
                return slot_spectrum(basis, list(slot()), settings.normalize)

            found[kind].append(SubspaceBasis(settings).fit_slots(tasks, visit=spectrum)[module])
    return found


def compare_to_null(zoo: SlotSpectrum, nulls: list[SlotSpectrum]) -> dict[str, Any]:
    """k for each energy level (zoo; null mean and spread), the capture gap at the zoo's k for 80%, and the
    verdict: the zoo beats this null when that gap exceeds 3 null standard deviations plus MIN_GAP."""
    width = min([len(zoo.capture)] + [len(s.capture) for s in nulls])
    curves = torch.stack([s.capture[:width] for s in nulls])
    mean, spread = (
        curves.mean(0),
        curves.std(0) if len(nulls) > 1 else torch.zeros(width, dtype=COMPUTE_DTYPE),
    )
    levels = {}
    for level in LEVELS:
        null_k = [k_for(s.capture, level) for s in nulls]
        known = [k for k in null_k if k is not None]
        levels[str(level)] = {
            "zoo": k_for(zoo.capture, level),
            "null_mean": sum(known) / len(known) if len(known) == len(null_k) else None,
            "null_min": min(known) if len(known) == len(null_k) else None,
            "null_max": max(known) if known and len(known) == len(null_k) else None,
        }
    k80 = k_for(zoo.capture[:width], 0.8)
    at = (k80 or width) - 1
    gap = float(zoo.capture[at] - mean[at])
    sd = float(spread[at])
    return {
        "levels": levels,
        "at_k": at + 1,
        "zoo_capture": float(zoo.capture[at]),
        "null_capture_mean": float(mean[at]),
        "null_capture_std": sd,
        "beyond_null": gap > 3 * sd + MIN_GAP,
        "curve_mean": _floats(mean),
        "curve_std": _floats(spread),
        "stats_out": _mean_stats([spectrum_stats(s.out, s.total) for s in nulls]),
        "stats_in": _mean_stats([spectrum_stats(s.in_, s.total) for s in nulls]),
    }


def _mean_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("ipr", "participation_ratio", "effective_rank")
    result: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in stats if s[key] is not None]
        result[key] = sum(values) / len(values) if values else None
        result[key + "_std"] = float(torch.tensor(values).std()) if len(values) > 1 else 0.0
    result["complete"] = all(s["complete"] for s in stats)
    return result


# ---- leverage and shared initialization ------------------------------------------------------------------------


def leverage(
    basis: SlotBasis, deltas: Sequence[LowRankDelta], weights: Sequence[float], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy of each task along each of the top k directions (k x N, left and right):
    w_i^2 ||u_j^T D_i||^2 and w_i^2 ||D_i v_j||^2, from U^T B_i, A_i A_i^T (r x r) and the like."""
    U, V = basis.U[:, :k].to(COMPUTE_DTYPE), basis.V[:, :k].to(COMPUTE_DTYPE)
    left, right = [], []
    for w, delta in zip(weights, deltas, strict=True):
        B, A = (t.cpu() for t in delta.factors())
        T, S = U.T @ B, A @ V
        left.append((w * w) * ((T @ (A @ A.T)) * T).sum(1))
        right.append((w * w) * (((B.T @ B) @ S) * S).sum(0))
    return torch.stack(left, 1), torch.stack(right, 1)


def owners(energy: torch.Tensor, names: list[str], spectrum: torch.Tensor, total: float) -> dict[str, Any]:
    """Per top direction its top owners and the effective number of owners; per task its share of the
    top directions' energy."""
    sums = energy.sum(1, keepdim=True).clamp_min(1e-300)
    shares = energy / sums
    directions = []
    for j in range(shares.shape[0]):
        order = torch.argsort(shares[j], descending=True)[:3]
        directions.append(
            {
                "energy": float(spectrum[j]) / total if total > 0 and j < len(spectrum) else None,
                "owners": [[names[int(i)], float(shares[j, i])] for i in order],
                "effective_owners": float(1.0 / shares[j].square().sum()),
            }
        )
    per_task = energy.sum(0) / energy.sum().clamp_min(1e-300)
    return {
        "directions": directions,
        "task_share": {name: float(per_task[i]) for i, name in enumerate(names)},
    }


def row_space_overlaps(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """N x N mean squared cosine of the principal angles between the row spaces of the A factors
    (||Q_i^T Q_j||_F^2 / min(r_i, r_j)): 1 for identical row spaces, about r / n for random ones."""
    bases = [torch.linalg.qr(A.to(COMPUTE_DTYPE).cpu().T, mode="reduced")[0] for A in factors]
    ranks = torch.tensor([q.shape[1] for q in bases], dtype=COMPUTE_DTYPE)
    owner = torch.repeat_interleave(torch.arange(len(bases)), ranks.long())
    indicator = torch.zeros(int(ranks.sum()), len(bases), dtype=COMPUTE_DTYPE)
    indicator[torch.arange(len(owner)), owner] = 1.0
    stacked = torch.cat(bases, 1)
    sums = torch.zeros(len(bases), len(bases), dtype=COMPUTE_DTYPE)
    step = 2048
    for start in range(0, stacked.shape[1], step):
        block = (stacked[:, start : start + step].T @ stacked).square() @ indicator
        sums += indicator[start : start + step].T @ block
    return sums / torch.minimum(ranks[:, None], ranks[None, :]).clamp_min(1)


# ---- the base model's principal directions ----------------------------------------------------------------------


def top_singular(
    W: torch.Tensor,
    delta: LowRankDelta | None,
    k: int,
    dense_limit: int = DENSE_LIMIT,
    start: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Top-k singular triplets (U, S, V) of W + D: a dense SVD when m * n <= dense_limit (W is dense anyway;
    the slot is small), else block Krylov iteration on x -> W x + B (A x) (Musco & Musco 2015) with
    Rayleigh-Ritz, warm-started from `start` (W's right vectors) when given."""
    m, n = W.shape
    k = min(k, m, n)
    B, A = delta.factors() if delta is not None else (W.new_zeros(m, 0), W.new_zeros(0, n))
    if m * n <= dense_limit:
        U, S, Vh = torch.linalg.svd(W + B @ A if delta is not None else W, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k].T, "dense"

    def forward(X: torch.Tensor) -> torch.Tensor:
        return W @ X + B @ (A @ X)

    def backward(Y: torch.Tensor) -> torch.Tensor:
        return W.T @ Y + A.T @ (B.T @ Y)

    width = min(n, k + OVERSAMPLE)
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randn(n, width, generator=generator, dtype=W.dtype)
    if start is not None:
        probe[:, : start.shape[1]] = start[:, :width]
    block = torch.linalg.qr(forward(probe), mode="reduced")[0]
    blocks = [block]
    for _ in range(KRYLOV_ITERS):
        block = torch.linalg.qr(forward(torch.linalg.qr(backward(block), mode="reduced")[0]), mode="reduced")[
            0
        ]
        blocks.append(block)
    Q = torch.linalg.qr(torch.cat(blocks, 1)[:, : min(m, width * len(blocks))], mode="reduced")[0]
    small_u, S, Vh = torch.linalg.svd(backward(Q).T, full_matrices=False)
    return Q @ small_u[:, :k], S[:k], Vh[:k].T, "block-krylov"


def principal_shares(U: torch.Tensor, V: torch.Tensor, delta: LowRankDelta) -> dict[str, float]:
    """Shares of ||D||_F^2 in the four orthogonal blocks P D Q, P D (I-Q), (I-P) D Q, (I-P) D (I-Q), with P, Q
    the projectors on the base's top-k left (U) and right (V) directions; from factors only. They sum to 1."""
    B, A = delta.factors()
    total = delta.norm_sq()
    if total <= 0:
        return {"on_on": 0.0, "on_off": 0.0, "off_on": 0.0, "off_off": 0.0, "left_on": 0.0, "right_on": 0.0}
    T, S = U.T @ B, A @ V
    gram_a, gram_b = A @ A.T, B.T @ B
    left_on = float(torch.sum((T.T @ T) * gram_a)) / total  # ||U^T D||^2
    right_on = float(torch.sum(gram_b * (S @ S.T))) / total  # ||D V||^2
    both = float((T @ S).square().sum()) / total
    return {
        "on_on": both,
        "on_off": left_on - both,
        "off_on": right_on - both,
        "off_off": 1.0 - left_on - right_on + both,
        "left_on": left_on,
        "right_on": right_on,
    }


def principal_metrics(
    base: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    moved: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> dict[str, float]:
    """Principal angles (degrees) between the top-k left and right singular subspaces of W and W + D, and the
    normalized spectral shift ||s_k(W + D) - s_k(W)|| / ||s_k(W)||."""
    (Uw, Sw, Vw), (Ud, Sd, Vd) = base, moved
    result: dict[str, float] = {}
    for side, first, second in (("left", Uw, Ud), ("right", Vw, Vd)):
        cosines = torch.linalg.svdvals(first.T @ second).clamp(0.0, 1.0)
        angles = torch.rad2deg(torch.arccos(cosines))
        result[f"{side}_angle_mean"] = float(angles.mean())
        result[f"{side}_angle_max"] = float(angles.max())
    result["spectral_shift"] = float(
        torch.linalg.vector_norm(Sd - Sw) / torch.linalg.vector_norm(Sw).clamp_min(1e-300)
    )
    return result


def base_weight(base: Checkpoint, module: str, shape: tuple[int, int], transposed: bool) -> torch.Tensor:
    """The slot's base weight in (out, in) orientation, float64; refuses one whose shape does not fit."""
    key = base.resolve_module(module)
    if key is None:
        raise SubspaceError(f"module '{module}' does not exist in the base model", base.folder)
    W = base.tensor(key).to(COMPUTE_DTYPE)
    if transposed:
        W = W.T
    if tuple(W.shape) != tuple(shape):
        raise SubspaceError(
            f"shapes do not fit the zoo: '{key}' is {tuple(W.shape)} (out, in), the slot '{module}' is {tuple(shape)}",
            base.folder,
        )
    return W


LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_of(module: str) -> str:
    """The layer index in a module path ('...layer.3.attention...' -> '3'), or the path when it has none."""
    found = LAYER.search(module)
    return found.group(1) if found else module


# ---- the analysis ----------------------------------------------------------------------------------------------


def _floats(values: torch.Tensor | Sequence[float], digits: int = 6) -> list[float]:
    return [float(f"{float(x):.{digits}g}") for x in values]


def analyze_zoo(
    zoo: Zoo, base: Checkpoint | None = None, options: AnalyzeOptions | None = None
) -> dict[str, Any]:
    """Per slot and over the zoo: scree beside the nulls, IPR and effective rank, leverage, shared-init pairs,
    and with `base` the principal-direction measures per task. Returns JSON-able data."""
    options = options or AnalyzeOptions()
    if options.k < 1 or options.seeds < 1 or options.leverage_k < 1 or options.base_k < 1:
        raise SubspaceError("k, seeds, leverage_k and base_k must be at least 1")
    settings = analysis_settings(zoo.settings, options.k)
    check_pairs = zoo.kind != "store"

    def visit(module: str, basis: SlotBasis, slot: SlotDeltas) -> dict[str, Any]:
        names = [t.name for t in slot.tasks]
        deltas = list(slot())
        spectrum = slot_spectrum(basis, deltas, settings.normalize)
        record: dict[str, Any] = {
            "shape": list(slot.shape),
            "tasks": len(names),
            "total_rank": sum(slot.ranks),
            "capture": _floats(spectrum.capture),
            "spectrum_out": _floats(spectrum.out[: options.k] / max(spectrum.total, 1e-300)),
            "stats_out": spectrum_stats(spectrum.out, spectrum.total),
            "stats_in": spectrum_stats(spectrum.in_, spectrum.total),
        }
        nulls = null_spectra(module, deltas, settings, options.seeds)
        record["null"] = {kind: compare_to_null(spectrum, found) for kind, found in nulls.items()}
        weights = task_weights(deltas, settings.normalize)
        top = min(options.leverage_k, basis.k_out, basis.k_in)
        left, right = leverage(basis, deltas, weights, top)
        record["leverage_out"] = owners(left, names, spectrum.out, spectrum.total)
        record["leverage_in"] = owners(right, names, spectrum.in_, spectrum.total)
        lora = [(t.name, d) for t, d in zip(slot.tasks, deltas, strict=True) if t.kind == "lora"]
        if check_pairs and len(lora) > 1:
            overlaps = row_space_overlaps([d.A for _, d in lora])
            rows, cols = torch.triu_indices(len(lora), len(lora), 1)
            values = overlaps[rows, cols]
            record["shared_init"] = {
                "median_overlap": float(values.median()),
                "chance_overlap": max(d.rank for _, d in lora) / slot.shape[1],
                "pairs": [
                    [lora[int(i)][0], lora[int(j)][0], float(v)]
                    for i, j, v in zip(rows, cols, values, strict=True)
                    if v >= options.overlap_threshold
                ],
            }
        if base is not None:
            record["base"] = _base_slot(base, module, slot, deltas, names, options)
        return record

    fitted = SubspaceBasis(settings, progress=options.progress)
    per_slot = fitted.fit_slots(zoo.tasks, visit=visit, base=base)
    return {
        "source": {
            "kind": zoo.kind,
            "path": zoo.path,
            "tasks": [t.name for t in zoo.tasks],
            "slots": len(per_slot),
        },
        "options": {key: value for key, value in asdict(options).items() if key != "progress"},
        "fit": {"normalize": settings.normalize, "solver": fitted.solver_},
        "base_model": str(base.folder) if base is not None else None,
        "notes": zoo.notes,
        "definitions": DEFINITIONS,
        "zoo": summarize(per_slot, [t.name for t in zoo.tasks], options),
        "slots": per_slot,
    }


def _base_slot(
    base: Checkpoint,
    module: str,
    slot: SlotDeltas,
    deltas: list[LowRankDelta],
    names: list[str],
    options: AnalyzeOptions,
) -> dict[str, Any]:
    m, n = slot.shape
    W = base_weight(base, module, slot.shape, slot.tasks[0].fan_in_fan_out)
    seed = slot_seed(f"{module}#base")
    Uw, Sw, Vw, method = top_singular(W, None, options.base_k, options.dense_limit, seed=seed)
    k = Uw.shape[1]
    per_task = {}
    for name, delta in zip(names, deltas, strict=True):
        delta = LowRankDelta(B=delta.B.cpu(), A=delta.A.cpu(), scale=delta.scale)
        moved = top_singular(W, delta, k, options.dense_limit, start=Vw, seed=seed)[:3]
        entry = principal_metrics((Uw, Sw, Vw), moved)
        entry |= principal_shares(Uw, Vw, delta)
        entry["update_norm_ratio"] = math.sqrt(delta.norm_sq()) / float(torch.linalg.matrix_norm(W))
        per_task[name] = entry
    return {
        "k": k,
        "method": method,
        "chance_left_on": k / m,
        "chance_right_on": k / n,
        "chance_on_on": k * k / (m * n),
        "tasks": per_task,
    }


def _median(values: list[float]) -> float | None:
    return float(torch.tensor(values, dtype=COMPUTE_DTYPE).median()) if values else None


def summarize(
    per_slot: dict[str, dict[str, Any]], names: list[str], options: AnalyzeOptions
) -> dict[str, Any]:
    """Zoo-wide figures: medians over slots, the share of slots beyond each null, the mean scree, top owners,
    shared-init pairs and the base measures per layer."""
    slots = list(per_slot.values())
    width = max(len(s["capture"]) for s in slots)

    def padded(curve: list[float]) -> list[float]:
        return curve + [curve[-1]] * (width - len(curve))

    mean_curve = torch.tensor([padded(s["capture"]) for s in slots]).mean(0)
    result: dict[str, Any] = {"scree_mean": _floats(mean_curve), "nulls": {}}
    for kind in NULLS:
        entries = [s["null"][kind] for s in slots]
        levels = {}
        for level in LEVELS:
            zoo_k = [e["levels"][str(level)]["zoo"] for e in entries]
            null_k = [e["levels"][str(level)]["null_mean"] for e in entries]
            levels[str(level)] = {
                "zoo_median": _median([k for k in zoo_k if k is not None]),
                "null_median": _median([k for k in null_k if k is not None]),
                "zoo_unreached": sum(k is None for k in zoo_k),
                "null_unreached": sum(k is None for k in null_k),
            }
        result["nulls"][kind] = {
            "slots_beyond_null": sum(e["beyond_null"] for e in entries),
            "levels": levels,
            "scree_mean": _floats(torch.tensor([padded(e["curve_mean"]) for e in entries]).mean(0)),
            "effective_rank_out_median": _median(
                [e["stats_out"]["effective_rank"] for e in entries if e["stats_out"]["effective_rank"]]
            ),
            "participation_out_median": _median(
                [
                    e["stats_out"]["participation_ratio"]
                    for e in entries
                    if e["stats_out"]["participation_ratio"]
                ]
            ),
        }
    result["effective_rank_out_median"] = _median(
        [s["stats_out"]["effective_rank"] for s in slots if s["stats_out"]["effective_rank"]]
    )
    result["effective_rank_in_median"] = _median(
        [s["stats_in"]["effective_rank"] for s in slots if s["stats_in"]["effective_rank"]]
    )
    result["participation_out_median"] = _median(
        [s["stats_out"]["participation_ratio"] for s in slots if s["stats_out"]["participation_ratio"]]
    )
    result["ipr_out_median"] = _median([s["stats_out"]["ipr"] for s in slots if s["stats_out"]["ipr"]])
    result["leverage"] = _zoo_leverage(per_slot, names)
    result["shared_init"] = _zoo_pairs(per_slot)
    if any("base" in s for s in slots):
        result["base"] = _zoo_base(per_slot, names)
    return result


def _zoo_leverage(per_slot: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per task: its mean share of the top directions' energy over the slots it touches, beside the share it
    would have if every task of those slots owned as much (1 / tasks in the slot), and their ratio."""
    shares: dict[str, list[float]] = {name: [] for name in names}
    uniform: dict[str, list[float]] = {name: [] for name in names}
    first: dict[str, int] = {name: 0 for name in names}
    for record in per_slot.values():
        lev = record["leverage_out"]
        for name, share in lev["task_share"].items():
            shares[name].append(share)
            uniform[name].append(1.0 / record["tasks"])
        first[lev["directions"][0]["owners"][0][0]] += 1
    mean_share = {name: sum(v) / len(v) for name, v in shares.items() if v}
    even = {name: sum(uniform[name]) / len(uniform[name]) for name in mean_share}
    ratio = {name: mean_share[name] / even[name] for name in mean_share}
    ranked = sorted(mean_share, key=lambda name: -ratio[name])
    return {
        "mean_share_of_top_directions": mean_share,
        "uniform_share": even,
        "share_over_uniform": ratio,
        "owns_first_direction": first,
        "slots": {name: len(v) for name, v in shares.items()},
        "top_owners": [
            {
                "task": name,
                "share": mean_share[name],
                "uniform": even[name],
                "ratio": ratio[name],
                "owns_first": first[name],
            }
            for name in ranked[:10]
        ],
    }


def _zoo_pairs(per_slot: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    checked = [r for r in per_slot.values() if "shared_init" in r]
    if not checked:
        return None
    pairs: dict[tuple[str, str], list[float]] = {}
    for record in checked:
        for a, b, value in record["shared_init"]["pairs"]:
            pairs.setdefault((a, b), []).append(value)
    affected = sum(bool(r["shared_init"]["pairs"]) for r in checked)
    listed = sorted(pairs.items(), key=lambda item: (-len(item[1]), item[0]))
    return {
        "slots_checked": len(checked),
        "slots_affected": affected,
        "fraction_affected": affected / len(checked),
        "median_overlap": _median([r["shared_init"]["median_overlap"] for r in checked]),
        "chance_overlap_median": _median([r["shared_init"]["chance_overlap"] for r in checked]),
        "pairs": [
            {"tasks": list(key), "slots": len(v), "mean_overlap": sum(v) / len(v)} for key, v in listed
        ],
    }


BASE_KEYS = (
    "left_on",
    "right_on",
    "on_on",
    "off_off",
    "left_angle_mean",
    "right_angle_mean",
    "spectral_shift",
    "update_norm_ratio",
)


def _zoo_base(per_slot: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    layers: dict[str, dict[str, list[float]]] = {}
    tasks: dict[str, dict[str, list[float]]] = {name: {key: [] for key in BASE_KEYS} for name in names}
    chance: dict[str, list[float]] = {"left_on": [], "right_on": [], "on_on": []}
    for module, record in per_slot.items():
        if "base" not in record:
            continue
        layer = layers.setdefault(layer_of(module), {key: [] for key in BASE_KEYS})
        for key in chance:
            chance[key].append(record["base"][f"chance_{key}"])
        for name, entry in record["base"]["tasks"].items():
            for key in BASE_KEYS:
                layer[key].append(entry[key])
                tasks[name][key].append(entry[key])

    def means(values: dict[str, list[float]]) -> dict[str, float | None]:
        return {key: (sum(v) / len(v) if v else None) for key, v in values.items()}

    ordered = sorted(layers, key=lambda name: (not name.isdigit(), int(name) if name.isdigit() else 0, name))
    return {
        "per_layer": {name: means(layers[name]) for name in ordered},
        "per_task": {name: means(values) for name, values in tasks.items() if any(values.values())},
        "overall": means({key: [x for layer in layers.values() for x in layer[key]] for key in BASE_KEYS}),
        "chance": means(chance),
        "methods": sorted({r["base"]["method"] for r in per_slot.values() if "base" in r}),
    }


DEFINITIONS = {
    "capture": "two-sided captured energy sum_i w_i^2 ||U_k^T D_i V_k||_F^2 / sum_i w_i^2 ||D_i||_F^2 for k = 1.., "
    "w_i = 1/||D_i|| when the fit normalizes (as compress does)",
    "null.spectrum": "random adapters keeping each task's shape, rank, norm and singular values; singular vectors drawn "
    "uniformly (Haar)",
    "null.gaussian": "random adapters with i.i.d. Gaussian B and A of each task's shape and rank, scaled to its norm",
    "beyond_null": "capture at the zoo's k for 80% exceeds the null's mean capture there by more than 3 null standard "
    f"deviations + {MIN_GAP}",
    "ipr": "sum_j p_j^2 over the left spectrum's energy shares p_j (eigenvalues of sum_i w_i^2 D_i D_i^T); "
    "participation_ratio = 1/ipr",
    "effective_rank": "Roy & Vetterli 2007: exp(entropy of sigma_j / sum sigma), sigma_j = sqrt(eigenvalue)",
    "leverage": "share of top direction j's energy owned by task i: w_i^2 ||u_j^T D_i||^2 / sum over tasks; task_share: "
    "its share of the top directions' energy together",
    "shared_init.overlap": "mean squared cosine of the principal angles between two adapters' lora_A row spaces, "
    "||Q_i^T Q_j||_F^2 / min(r_i, r_j); pairs at or above overlap_threshold are listed",
    "base.left_on / right_on": "share of ||D||_F^2 inside the base W's top-k left (right) singular directions; "
    "on_on: inside both, off_off: outside both (the four blocks sum to 1); chance: k/m, k/n, k^2/(mn)",
    "base.angles": "principal angles (degrees) between the top-k singular subspaces of W and W + D",
    "base.spectral_shift": "||s_1..k(W + D) - s_1..k(W)||_2 / ||s_1..k(W)||_2",
}


def run_analyze(
    source: str | Path,
    out: str | Path,
    base: str | Path | None = None,
    overwrite: bool = False,
    options: AnalyzeOptions | None = None,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Analyze a store or a recipe and write OUT/analysis.json, OUT/summary.md and PNG plots, atomically."""
    from mergekit_subspace.analyze_report import write_analysis
    from mergekit_subspace.io.files import check_output

    options = options or AnalyzeOptions()
    out = Path(out)
    empty = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
    if out.is_dir() and not empty and not overwrite:
        raise SubspaceError("already exists and is not empty; choose another folder or pass --overwrite", out)
    check_output(out, overwrite=True, inputs=[source, base])
    checkpoint = Checkpoint(base, allow_pickle=allow_pickle) if base is not None else None
    zoo = open_zoo(source, allow_pickle=allow_pickle, progress=options.progress)
    if zoo.kind == "recipe":  # nor may it lie inside an adapter the recipe reads
        check_output(out, overwrite=True, inputs=[source, base, *(t.source for t in zoo.tasks)])
    results = analyze_zoo(zoo, checkpoint, options)
    write_analysis(results, out, overwrite=overwrite or empty)
    return results


__all__ = ["AnalyzeOptions", "Zoo", "analyze_zoo", "open_zoo", "run_analyze"]
