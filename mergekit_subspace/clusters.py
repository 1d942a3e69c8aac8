"""Several bases for a mixed zoo, as Compress-then-Serve clusters its LoRAs.

One shared basis per slot serves a homogeneous zoo well; a zoo pooled from unrelated sources spends its k on
directions that only some of its tasks use. With `subspace: {clusters: C}` the tasks are split into C groups
and each group gets its own k per slot:

1. one joint fit of the whole zoo (at least FEATURE_K wide), and every task's cores on it;
2. k-means (cosine, k-means++ seeding, several starts) on how each task's energy spreads over the joint
   directions (the root of its cores' row and column energies, unit norm), so that tasks group by the
   directions they use, not by size, and not by their coefficients inside a shared subspace;
3. alternate: fit one basis per cluster on its members, then move every task to the cluster whose basis
   reconstructs it best (relative Frobenius error over its slots), until no task moves.

On disk a clustered store is an ordinary store whose slot bases are the clusters' bases side by side:
U = [U_1 | U_2 | ...], V likewise, with each cluster's column range in the slot's manifest entry
(`clusters`). A task's core covers its own cluster's columns only (its offsets `o_out`/`o_in` in the slot
table) and reads as zero on the others, so reconstruct, serve and bench need nothing new: U C V^T is the
task's delta as before. What differs is that U is no longer orthonormal across clusters; the merge turns it
into an orthonormal basis first (`orthonormal_union`), and `add` projects a new task on each cluster's
columns and keeps the best; when no cluster holds it within the guard (`--policy auto`, or always with
`grow`), it grows the block of the cluster that holds it best (`grow.grow_blocks`).

`clusters: auto` tries a few counts at the bytes of one basis at the recipe's k (each count's k per
cluster is the largest that fits those bytes) and keeps the count with the lowest mean task error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergekit_subspace import parallel
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.fit import SlotDeltas, SubspaceBasis
from mergekit_subspace.grow import GrowingBases, grow_blocks, slot_block
from mergekit_subspace.io.checkpoint import Checkpoint
from mergekit_subspace.io.codec import store_dtypes
from mergekit_subspace.io.store import basis_tensors
from mergekit_subspace.lowrank import COMPUTE_DTYPE, LowRankDelta, SlotProjector, stored_error_sq
from mergekit_subspace.recipe import SubspaceSettings
from mergekit_subspace.sources import TaskSource, slot_shapes

MAX_ITERS = 10  # fit / reassign rounds; mixed zoos settle in two or three
KMEANS_STARTS = 8
FEATURE_K = (
    32  # the joint basis the tasks are grouped on is at least this wide, so every group has directions
)
AUTO_COUNTS = (1, 2, 3, 4, 6, 8)  # cluster counts `clusters: auto` tries (at most one per two tasks)


@dataclass
class ClusterFit:
    """The clusters of a zoo: each task's cluster, one fitted basis per cluster, and how well it fits."""

    labels: dict[str, int]  # task name -> cluster
    fits: list[SubspaceBasis]
    rel_errors: dict[str, list[float]]  # task name -> its relative error on every cluster's basis
    iterations: int
    moved: list[int] = field(default_factory=list)  # tasks that changed cluster in each round

    @property
    def count(self) -> int:
        return len(self.fits)

    def mean_error(self) -> float:
        """Mean relative error of the tasks on their own cluster's basis."""
        errors = [self.rel_errors[name][c] for name, c in self.labels.items()]
        return sum(errors) / len(errors)


def check_clusters(count: int, tasks: Sequence[TaskSource], where: str | Path | None = None) -> None:
    """Refuse a cluster count the zoo cannot fill, before anything is fit."""
    if count > len(tasks):
        raise SubspaceError(
            f"subspace.clusters = {count} is more than the zoo's {len(tasks)} tasks; every cluster needs one",
            where,
        )
    if parallel.current("cpu").world > 1:
        raise SubspaceError("subspace.clusters runs in one process for now; run compress without torchrun")


def _features(cores: dict[str, dict[str, torch.Tensor]], names: list[str]) -> torch.Tensor:
    """One row per task: how its energy spreads over the joint basis directions of every slot (the root of
    each core's row and column energies; zeros where it has no slot), unit norm. Two tasks in the same
    subspace share directions even when their cores, as vectors, are orthogonal, which random coefficients
    in one subspace almost always are."""
    slots = sorted({m for c in cores.values() for m in c})
    sizes = {m: next(sum(c[m].shape) for c in cores.values() if m in c) for m in slots}
    rows = []
    for name in names:
        parts = []
        for m in slots:
            core = cores[name].get(m)
            if core is None:
                parts.append(torch.zeros(sizes[m], dtype=COMPUTE_DTYPE))
                continue
            energy = core.to(COMPUTE_DTYPE) ** 2
            parts += [energy.sum(dim=1).sqrt(), energy.sum(dim=0).sqrt()]
        row = torch.cat(parts)
        rows.append(row / row.norm().clamp_min(1e-30))
    return torch.stack(rows)


def kmeans(features: torch.Tensor, count: int, seed: int = 0, starts: int = KMEANS_STARTS) -> list[int]:
    """Spherical k-means with k-means++ seeding; the best of `starts` runs by within-cluster cosine."""
    n = features.shape[0]
    generator = torch.Generator().manual_seed(seed)
    best: tuple[float, list[int]] | None = None
    for _ in range(starts):
        centres = [int(torch.randint(n, (1,), generator=generator))]
        while len(centres) < count:
            similarity = (features @ features[centres].T).max(dim=1).values
            weights = (1.0 - similarity).clamp_min(0.0)
            weights[centres] = 0.0
            if float(weights.sum()) <= 0:
                weights = torch.ones(n, dtype=features.dtype)
                weights[centres] = 0.0
            centres.append(int(torch.multinomial(weights, 1, generator=generator)))
        centroid = features[centres].clone()
        labels = torch.full((n,), -1, dtype=torch.long)
        for _ in range(100):
            new = (features @ centroid.T).argmax(dim=1)
            if torch.equal(new, labels):
                break
            labels = new
            for c in range(count):
                members = features[labels == c]
                if len(members) == 0:  # re-seed an empty cluster at the worst-placed task
                    worst = int((features * centroid[labels]).sum(dim=1).argmin())
                    labels[worst] = c
                    members = features[worst : worst + 1]
                mean = members.sum(dim=0)
                centroid[c] = mean / mean.norm().clamp_min(1e-30)
        cohesion = float((features * centroid[labels]).sum())
        if best is None or cohesion > best[0]:
            best = (cohesion, labels.tolist())
    assert best is not None
    return best[1]


def _task_errors(task: TaskSource, fit: SubspaceBasis) -> tuple[float, float]:
    """(||D - U U^T D V V^T||^2, ||D||^2) of a task on one cluster's bases; a slot the cluster has no basis
    for loses its whole delta."""
    err = norm = 0.0
    for module in sorted(task.shapes):
        delta = task.slots[module]
        delta_sq = delta.norm_sq()
        norm += delta_sq
        if module in fit.bases_:
            U, V = fit.bases_[module]
            err += stored_error_sq(delta, U, delta.project(U, V), V)
        else:
            err += delta_sq
    return err, norm


def _fit_each(
    tasks: list[TaskSource],
    labels: list[int],
    count: int,
    settings: SubspaceSettings,
    base: Checkpoint | None,
    device: str,
    sizes: Sequence[dict[str, tuple[int, int]]] | None = None,
) -> list[SubspaceBasis]:
    """One basis per cluster, fit on its members (at `sizes[cluster]` per slot where given)."""
    return [
        SubspaceBasis(settings, sizes=sizes[k] if sizes else None, device=device).fit(
            [t for t, c in zip(tasks, labels, strict=True) if c == k], base
        )
        for k in range(count)
    ]


def _plain(settings: SubspaceSettings) -> SubspaceSettings:
    return settings.model_copy(update={"clusters": None})


def fit_clusters(
    tasks: Sequence[TaskSource],
    settings: SubspaceSettings,
    count: int,
    base: Checkpoint | None = None,
    device: str = "cpu",
    progress: bool = False,
    seed: int = 0,
) -> ClusterFit:
    """Cluster the zoo into `count` groups with one basis each (see the module docstring)."""
    tasks = list(tasks)
    check_clusters(count, tasks)
    plain = _plain(settings)
    names = [t.name for t in tasks]
    if count == 1:
        labels = [0] * len(tasks)
    else:
        wide = plain.model_copy(update={"k": max(plain.k or 1, FEATURE_K), "k_in": None, "energy": None})
        joint = SubspaceBasis(wide, device=device).fit_transform(tasks, base)
        labels = kmeans(_features(joint, names), count, seed)
    moved: list[int] = []
    bar = tqdm(
        total=MAX_ITERS, desc="fit clusters", unit="round", disable=None if progress else True, leave=False
    )
    for iteration in range(1, MAX_ITERS + 1):
        fits = _fit_each(tasks, labels, count, plain, base, device)
        table = [[_task_errors(t, f) for f in fits] for t in tasks]
        rel = [[math.sqrt(e / n) if n else 0.0 for e, n in row] for row in table]
        new = [min(range(count), key=lambda k, r=r: r[k]) for r in rel]
        for k in range(count):  # a cluster left empty takes the task its own cluster fits worst
            if k not in new:
                loose = [i for i in range(len(tasks)) if new.count(new[i]) > 1]
                worst = max(loose, key=lambda i: rel[i][new[i]])
                new[worst] = k
        moved.append(sum(a != b for a, b in zip(labels, new, strict=True)))
        bar.update(1)
        if new == labels or iteration == MAX_ITERS:
            break
        labels = new
    bar.close()
    if new != labels:  # out of rounds: the last move still needs its bases
        labels = new
        fits = _fit_each(tasks, labels, count, plain, base, device)
        rel = [[math.sqrt(e / n) if n else 0.0 for e, n in (_task_errors(t, f) for f in fits)] for t in tasks]
    return ClusterFit(
        labels=dict(zip(names, labels, strict=True)),
        fits=fits,
        rel_errors=dict(zip(names, rel, strict=True)),
        iterations=len(moved),
        moved=moved,
    )


def stored_numbers(
    tasks: Sequence[TaskSource], base: Checkpoint | None, k: int, k_in: int, clusters: int
) -> int:
    """Basis and core numbers of a store at (k, k_in) per cluster, every cluster on every slot (an upper
    bound: k is also capped at each slot's size and rank)."""
    total = 0
    for module, (m, n) in slot_shapes(list(tasks), base).items():
        members = sum(1 for t in tasks if module in t.shapes)
        total += clusters * (m * k + n * k_in) + members * k * k_in
    return total


def equal_bytes_k(
    tasks: Sequence[TaskSource], base: Checkpoint | None, settings: SubspaceSettings, clusters: int
) -> tuple[int, int | None]:
    """The largest (k, k_in) per cluster whose store holds no more numbers than one basis at the
    settings' k: how clusters are compared with one basis at equal bytes."""
    if settings.k is None:
        raise SubspaceError("subspace.clusters: auto needs subspace.k (the bytes it compares at)")
    k_in = settings.k_in or settings.k
    budget = stored_numbers(tasks, base, settings.k, k_in, 1)
    ratio = k_in / settings.k
    best = 1
    for k in range(1, settings.k + 1):
        if stored_numbers(tasks, base, k, max(1, round(k * ratio)), clusters) <= budget:
            best = k
    return best, (max(1, round(best * ratio)) if settings.k_in is not None else None)


def choose_clusters(
    tasks: Sequence[TaskSource],
    settings: SubspaceSettings,
    base: Checkpoint | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> tuple[ClusterFit, SubspaceSettings, list[dict[str, Any]]]:
    """`clusters: auto`: each count of AUTO_COUNTS that leaves two tasks per cluster, at the bytes of one
    basis; the fit with the lowest mean task error, its settings, and the table of every count tried."""
    tried = []
    best: tuple[float, ClusterFit, SubspaceSettings] | None = None
    for count in (c for c in AUTO_COUNTS if c == 1 or 2 * c <= len(tasks)):
        k, k_in = equal_bytes_k(tasks, base, settings, count)
        at = settings.model_copy(update={"k": k, "k_in": k_in, "clusters": count})
        fit = fit_clusters(tasks, at, count, base, device, progress)
        error = fit.mean_error()
        tried.append({"clusters": count, "k": k, "k_in": k_in, "mean_rel_error": error})
        if best is None or error < best[0] - 1e-12:
            best = (error, fit, at)
    assert best is not None
    return best[1], best[2], tried


@dataclass
class UnionSlot:
    """One slot of a clustered store: the clusters' bases side by side and each cluster's columns."""

    U: torch.Tensor
    V: torch.Tensor
    blocks: list[list[int] | None]  # per cluster: [o_out, k_out, o_in, k_in], None where it has no basis


def union_slot(fit: ClusterFit, module: str) -> UnionSlot:
    Us, Vs, blocks = [], [], []
    o_out = o_in = 0
    for cluster in fit.fits:
        if module not in cluster.bases_:
            blocks.append(None)
            continue
        U, V = cluster.bases_[module]
        blocks.append([o_out, int(U.shape[1]), o_in, int(V.shape[1])])
        Us.append(U.cpu())
        Vs.append(V.cpu())
        o_out += int(U.shape[1])
        o_in += int(V.shape[1])
    return UnionSlot(torch.cat(Us, dim=1), torch.cat(Vs, dim=1), blocks)


def block_projector(U: torch.Tensor, V: torch.Tensor, block: list[int]) -> SlotProjector:
    """The projector of one cluster's columns of a slot's (stored) bases."""
    o_out, k_out, o_in, k_in = block
    return SlotProjector(U[:, o_out : o_out + k_out], V[:, o_in : o_in + k_in])


def compress_clustered(
    store_cls: Any,
    tasks: list[TaskSource],
    settings: SubspaceSettings,
    out: Path,
    base: Checkpoint | None,
    overwrite: bool,
    progress: bool,
    device: str,
    base_identity: dict[str, Any] | None,
    assigned: tuple[dict[str, int], list[dict[str, tuple[int, int]]]] | None = None,
) -> Any:
    """Fit the clusters, then write the store slot by slot: the union basis, and every task's core on its
    own cluster's columns of it, encoded as stored. `assigned` gives each task's cluster and each cluster's
    (k_out, k_in) per slot, as a target chose them (mergekit_subspace.target)."""
    from mergekit_subspace.subspace import _hash_sources, encode_slot

    if assigned is not None:
        by_task, sizes = assigned
        labels = [by_task[t.name] for t in tasks]
        fits = _fit_each(tasks, labels, len(sizes), _plain(settings), base, device, sizes)
        fit = ClusterFit(dict(by_task), fits, {}, 0)  # the target's line reports it; no rounds to describe
        tried: list[dict[str, Any]] = []
    elif settings.clusters == "auto":
        fit, settings, tried = choose_clusters(tasks, settings, base, device, progress)
        if fit.count == 1:  # one basis won: an ordinary store, no cluster bookkeeping
            plain = settings.model_copy(update={"clusters": None})
            store = store_cls.from_tasks(
                tasks, plain, out, base, overwrite, progress, device, base_identity=base_identity
            )
            store.cluster_choices = tried
            return store
    else:
        assert isinstance(settings.clusters, int)
        fit = fit_clusters(tasks, settings, settings.clusters, base, device, progress)
        tried = []
    dtypes = store_dtypes(settings)
    shapes = slot_shapes(tasks, base)
    per_slot: dict[str, tuple[dict, dict]] = {}
    slot_notes: dict[str, dict[str, Any]] = {}
    captured: dict[str, float] = {}
    unions: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in tqdm(sorted(shapes), desc="encode slots", disable=None if progress else True, leave=False):
        union = union_slot(fit, module)
        file_tensors, readback = basis_tensors({module: (union.U, union.V)}, dtypes.basis)
        U, V = readback[module]
        encoded = {}
        err = norm = 0.0
        for task, delta in SlotDeltas(module, tasks, 0, device="cpu").with_tasks():
            block = union.blocks[fit.labels[task.name]]
            assert block is not None  # a cluster's fit covers every slot its members touch
            slot = encode_slot(task, module, delta, block_projector(U, V, block), dtypes.cores)
            slot.stats.update(o_out=block[0], k_out=block[1], o_in=block[2], k_in=block[3])
            encoded[task.name] = slot
            err += slot.err_sq
            norm += slot.norm_sq
        per_slot[module] = (file_tensors, encoded)
        unions[module] = (union.U, union.V)
        slot_notes[module] = {"clusters": union.blocks}
        captured[module] = 1.0 - err / norm if norm else 1.0
    union_fit = _union_fitted(fit, unions, shapes, per_slot, captured, settings)
    ranks = parallel.current(device)
    _hash_sources(tasks, ranks, progress)
    task_notes = {name: {"cluster": c} for name, c in fit.labels.items()}
    identity = base.identity() if base is not None else base_identity
    store_cls._write(
        out, tasks, union_fit, per_slot, settings, identity, overwrite, progress, slot_notes, task_notes
    )
    store = store_cls(out)
    if assigned is None:
        store.cluster_fit = fit  # what compress reports: rounds, moves, the auto table
    store.cluster_choices = tried
    return store


def _union_fitted(
    fit: ClusterFit,
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]],
    shapes: dict[str, tuple[int, int]],
    per_slot: dict[str, tuple[dict, dict]],
    captured: dict[str, float],
    settings: SubspaceSettings,
) -> SubspaceBasis:
    """The store's per-slot statistics as a fitted SubspaceBasis over the union bases (what the store
    writer reads): widths, members, captured energy as stored, and the clusters' spectra concatenated."""
    fitted = SubspaceBasis.from_bases(bases, shapes, settings)
    fitted.members_ = {m: sorted(per_slot[m][1]) for m in shapes}
    fitted.captured_energy_ = captured
    fitted.capped_ = {m: any(f.capped_.get(m, False) for f in fit.fits) for m in shapes}
    fitted.solver_ = {m: next(f.solver_[m] for f in fit.fits if m in f.solver_) for m in shapes}
    fitted.spectrum_ = {}
    fitted.spectrum_total_ = {}
    for module in shapes:
        parts = [f.spectrum_[module] for f in fit.fits if module in f.spectrum_]
        totals = [f.spectrum_total_[module] for f in fit.fits if module in f.spectrum_total_]
        fitted.spectrum_[module] = torch.sort(torch.cat(parts), descending=True).values
        fitted.spectrum_total_[module] = sum(totals)
    return fitted


def orthonormal_union(
    U: torch.Tensor, V: torch.Tensor, cores: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Bases with orthonormal columns spanning U and V, and the cores in them: U C V^T = Q_u (R_u C R_v^T)
    Q_v^T exactly. What the merge methods need (they assume orthonormal bases) from a clustered store,
    whose clusters' bases overlap."""
    Q_u, R_u = torch.linalg.qr(U.to(COMPUTE_DTYPE))
    Q_v, R_v = torch.linalg.qr(V.to(COMPUTE_DTYPE))
    return Q_u, Q_v, [R_u @ c.to(COMPUTE_DTYPE) @ R_v.T for c in cores]


def is_clustered(manifest: dict[str, Any]) -> bool:
    return any(meta.get("clusters") for meta in manifest["slots"].values())


def encode_on_cluster(
    store: Any, source: TaskSource, cluster: int | None, device: str = "cpu"
) -> dict[str, Any]:
    """A task's slots encoded on one cluster's columns of each slot's bases (cluster None: a plain store's
    whole basis), skipping the slots where the cluster has none. `store` is anything with the store's
    `manifest` and `basis(module)`: the store, or the bases a batch of adds is growing."""
    from mergekit_subspace.subspace import encode_slot

    core_dtype = store_dtypes(store.manifest["settings"]).cores
    encoded = {}
    for module in sorted(source.shapes):
        block = slot_block(store.manifest["slots"][module], cluster)
        if block is None:
            continue
        U, V = (t.to(device) for t in store.basis(module))
        delta = source.slots[module]
        delta = LowRankDelta(B=delta.B.to(device), A=delta.A.to(device), scale=delta.scale)
        slot = encode_slot(source, module, delta, block_projector(U, V, block), core_dtype)
        if cluster is not None:
            slot.stats.update(o_out=block[0], k_out=block[1], o_in=block[2], k_in=block[3])
        encoded[module] = slot
    return encoded


def encode_on_clusters(
    store: Any, source: TaskSource, device: str = "cpu", required: bool = True
) -> tuple[int | None, dict[str, Any], list[float]]:
    """A new task's slots encoded on every cluster of a clustered store: the cluster that covers all of them
    and stores the task with the least error, its encoded slots, and each cluster's relative error (a slot
    the cluster has no columns in counts as lost whole). No cluster covering every slot is refused, or, when
    not `required` (growth may add the missing blocks), gives (None, {}, errors)."""
    count = max(len(meta.get("clusters") or []) for meta in store.manifest["slots"].values())
    norms = {m: source.slots[m].norm_sq() for m in source.shapes}
    total = sum(norms.values())
    errors: list[float] = []
    best: tuple[float, int, dict[str, Any]] | None = None
    for cluster in range(count):
        encoded = encode_on_cluster(store, source, cluster, device)
        err = sum(s.err_sq for s in encoded.values()) + sum(norms[m] for m in norms if m not in encoded)
        error = math.sqrt(err / total) if total else 0.0
        errors.append(error)
        if len(encoded) == len(norms) and (best is None or error < best[0]):
            best = (error, cluster, encoded)
    if best is None:
        if not required:
            return None, {}, errors
        raise SubspaceError(
            "touches slots that no single cluster of the store has a basis for; add it with --policy auto "
            "(which grows a cluster) or `refit --add` (which fits the clusters again)",
            source.source,
        )
    return best[1], best[2], errors


def place_on_clusters(
    bases: GrowingBases, source: TaskSource, policy: str, max_rel_error: float, device: str = "cpu"
) -> tuple[int, dict[str, Any], float, dict[str, tuple[int, int]]]:
    """Where a new task goes in a clustered store: the cluster, its slots encoded there, its error on the
    bases as they were, and the columns grown per slot. It is projected on the cluster that holds it best
    when that is within the guard (always with --policy project); otherwise the cluster with the least error
    grows its blocks for it (see `grow.grow_blocks`)."""
    cluster, slots, errors = encode_on_clusters(bases, source, device, required=policy == "project")
    fits = cluster is not None and errors[cluster] <= max_rel_error
    if cluster is not None and (policy == "project" or (policy == "auto" and fits)):
        return cluster, slots, errors[cluster], {}
    cluster = min(range(len(errors)), key=errors.__getitem__)
    grown = grow_blocks(bases, source, cluster, max_rel_error, device)
    return cluster, encode_on_cluster(bases, source, cluster, device), errors[cluster], grown


def describe(store: Any) -> str | None:
    """One line for `compress`: how the clusters were found, and what `clusters: auto` compared."""
    fit: ClusterFit | None = getattr(store, "cluster_fit", None)
    tried = getattr(store, "cluster_choices", [])
    if fit is None and not tried:
        return None
    if fit is None:
        line = "clusters: auto kept one basis"
    else:
        line = (
            f"clusters: {fit.count} after {fit.iterations} fit/reassign round(s) (tasks moved per round: "
            f"{', '.join(map(str, fit.moved))}); mean relative error on own cluster {fit.mean_error():.4f}"
        )
    if tried:
        line += "; auto compared at equal bytes: " + ", ".join(
            f"{t['clusters']} x k={t['k']} -> {t['mean_rel_error']:.4f}" for t in tried
        )
    return line
