"""Stores sized by a target (`subspace: {target: ...}`): a ratio, a size in bytes, or a mean relative error.

Each slot is fit once at its largest size; that fit gives the captured energy of every prefix of its
directions (the curves `budget.allocate` spends bytes on) and, encoding the slot's bases and cores in each
candidate dtype, the quantization error that dtype adds (measured on this zoo, as the store would write it).
The predicted mean relative error of a store is then sqrt(sum_s [(T_s - G_s) + q_s^2 G_s] / sum_s T_s), with
T_s a slot's weighted energy, G_s what its chosen k captures and q_s the dtype's measured relative error.
A candidate is a pair of dtypes (`StoreDtypes`): one for the bases and heads, one as fine or finer for the
cores. Where a few tasks share each basis the bases hold most of the bytes, and int8 cores beside int4
bases cost little and remove much of the rounding error; with thousands of tasks on one basis the cores
hold the bytes and int4 cores may win. Each pair is priced at its own widths.

- ratio / bytes: per pair, the byte budget left after heads, headers and the manifest is spent by
  `allocate`; the pair with the lowest predicted error wins.
- max_rel_error: per pair, the smallest budget whose allocation is predicted to meet it (bisection on
  `allocate`); the pair giving the fewest bytes wins.

The store is then written and measured; when its bytes on disk or its measured mean error miss the target
(the overhead and the error are predictions), the budget is corrected by what was missed and the store
written again (at most MAX_TRIES times).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mergekit_subspace import parallel
from mergekit_subspace.budget import SlotCurve, allocate, core_numbers
from mergekit_subspace.calibration import store_output_error
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.fit import SlotDeltas, SubspaceBasis
from mergekit_subspace.io.codec import (
    INT_DTYPES,
    ITEM_BYTES,
    StoreDtypes,
    encode_core,
    extra_bytes,
    store_dtypes,
)
from mergekit_subspace.lowrank import SlotProjector
from mergekit_subspace.recipe import SubspaceSettings
from mergekit_subspace.sources import TaskSource, slot_shapes

if TYPE_CHECKING:
    from mergekit_subspace.io.checkpoint import Checkpoint
    from mergekit_subspace.subspace import SubspaceStore

CANDIDATES = ("float16", "int8", "int4")
ASSIGN_K = 16  # a clustered target assigns tasks at the bytes of one basis of this k, then sizes each slot
SEP = "|"  # between cluster and slot in a clustered plan's profile keys
MAX_TRIES = 4
Sizes = dict[str, tuple[int, int]]


@dataclass
class SlotProfile:
    """One slot's curve (gains and costs per step), its weighted energy, and each dtype's measured q^2."""

    curve: SlotCurve
    total: float
    quant_sq: dict[str, float]  # by StoreDtypes.label


def candidates(settings: SubspaceSettings) -> tuple[StoreDtypes, ...]:
    """The dtype pairs a target may choose: the recipe's own when it names `dtype` (cores in `core_dtype`,
    else the same); otherwise float16 / int8 / int4 bases, with the recipe's `core_dtype` or any of those
    as fine or finer for the cores."""
    if "dtype" in settings.model_fields_set:
        return (store_dtypes(settings),)
    if settings.core_dtype is not None:
        return tuple(StoreDtypes(basis, settings.core_dtype) for basis in CANDIDATES)
    return tuple(
        StoreDtypes(basis, cores) for i, basis in enumerate(CANDIDATES) for cores in CANDIDATES[: i + 1]
    )


def overhead_bytes(tasks: list[TaskSource], dtypes: StoreDtypes) -> int:
    """Bytes a store holds beside its basis and core numbers: heads, scales of int8 bases and cores, the
    safetensors headers and the manifest (an estimate; the written store is measured and the budget
    corrected)."""
    heads = sum(extra_bytes(x, dtypes.basis) for t in tasks for x in t.extras.values())
    slots = {m for t in tasks for m in t.shapes}
    task_slots = sum(len(t.shapes) for t in tasks)
    scales = (8 * len(slots) if dtypes.basis in INT_DTYPES else 0) + (
        8 * task_slots if dtypes.cores in INT_DTYPES else 0
    )
    headers = 150 * (len(tasks) + 1) + 100 * len(slots) + 70 * sum(len(t.extras) for t in tasks)
    ranks: dict[str, int] = {}
    for t in tasks:
        for module in t.shapes:
            ranks[module] = ranks.get(module, 0) + t.ranks[module]
    configs = {json.dumps(t.peft_config, sort_keys=True, default=str) for t in tasks}
    manifest = (
        1500  # format, base model, settings with this target's record
        + sum(200 + 8 * min(64, r) for r in ranks.values())  # slot entries with their spectra
        + sum(600 + len(str(t.source)) + 45 * len(t.shapes) + 60 * len(t.extras) for t in tasks)
        + sum(len(c) + 20 for c in configs)
    )
    return heads + scales + headers + manifest


def smallest_numbers(tasks: list[TaskSource], base: Checkpoint | None = None) -> tuple[int, int]:
    """(basis, core) numbers of the smallest store (k = 1 in every slot), from shapes and ranks alone."""
    basis = cores = 0
    for module, (m, n) in slot_shapes(tasks, base).items():
        basis += m + n
        cores += sum(core_numbers(1, 1, t.ranks[module]) for t in tasks if module in t.shapes)
    return basis, cores


def payload_bytes(basis: int, cores: int, dtypes: StoreDtypes) -> int:
    """Bytes of `basis` and `cores` numbers in their dtypes (int4 counting its group scales)."""
    return math.ceil(basis * ITEM_BYTES[dtypes.basis] + cores * ITEM_BYTES[dtypes.cores])


def target_bytes(tasks: list[TaskSource], settings: SubspaceSettings) -> int | None:
    """The bytes on disk a ratio or bytes target allows (None for an error target)."""
    target = settings.target
    assert target is not None
    if target.bytes is not None:
        return target.bytes
    if target.ratio is not None:
        return int(sum(t.source_bytes for t in tasks) / target.ratio)
    return None


class TargetError(SubspaceError):
    """A target no store can meet: a problem of the recipe that states it (see `naming`)."""


@contextlib.contextmanager
def naming(recipe: str | Path | None) -> Iterator[None]:
    """Name the recipe in a TargetError raised inside (the fit that finds it does not know the file)."""
    try:
        yield
    except TargetError as exc:
        if exc.path is not None or recipe is None:
            raise
        raise TargetError(exc.problem, recipe) from None


def check_target(tasks: list[TaskSource], settings: SubspaceSettings, base: Checkpoint | None) -> None:
    """Refuse, before any fit, a ratio or bytes target below the smallest store any allowed dtype makes."""
    if settings.target is None:
        return
    allowed = target_bytes(tasks, settings)
    if allowed is None:
        return
    numbers = smallest_numbers(tasks, base)
    need = min(payload_bytes(*numbers, d) + overhead_bytes(tasks, d) for d in candidates(settings))
    if need > allowed:
        target = settings.target
        assert target is not None
        asked = f"ratio {target.ratio:g}" if target.ratio is not None else f"bytes {allowed:,}"
        raise TargetError(
            f"subspace.target {asked} cannot be met: the store is {allowed:,} bytes at most, the smallest "
            f"possible (k = 1 in every slot) needs about {need:,}"
        )


def profile_slots(
    tasks: list[TaskSource],
    settings: SubspaceSettings,
    base: Checkpoint | None,
    device: str,
    progress: bool,
    inputs: dict[str, torch.Tensor] | None = None,
) -> dict[str, SlotProfile]:
    """Each slot fit at its largest size: its curve (by output energy on `inputs` when given), weighted
    energy and every candidate's measured q^2."""
    fitter = SubspaceBasis(settings, device=device, inputs=inputs)
    shapes = slot_shapes(tasks, base)
    costs = {m: sum(sum(t.ranks[m] for t in tasks if m in t.shapes) * s for s in shapes[m]) for m in shapes}
    dtypes = candidates(settings)
    cap = settings.k or 1

    def profile(module: str) -> SlotProfile:
        slot = SlotDeltas(module, tasks, fitter.slot_memory, fitter.device)
        fit, curve, (cap_out, cap_in) = fitter.fit_largest(slot, cap)
        captured = fit.total_energy * fit.capture(cap_out, cap_in)
        quant = {
            d.label: _quant_sq(module, slot, fit.basis.U, fit.basis.V, d, settings.normalize) for d in dtypes
        }
        truncated = fit.total_energy - captured
        return SlotProfile(
            curve,
            curve.total,
            {d: 0.0 if captured <= 0 else max(0.0, err - truncated) / captured for d, err in quant.items()},
        )

    return parallel.map_shared(
        parallel.current(device), sorted(shapes), costs, profile, "size slots", progress, everywhere=True
    )


def _quant_sq(module: str, slot: SlotDeltas, U: Any, V: Any, dtypes: StoreDtypes, normalize: bool) -> float:
    """Weighted squared error of the slot's tasks stored in `dtypes` at the fit's size (bases and cores)."""
    from mergekit_subspace.io.store import basis_tensors

    _, readback = basis_tensors({module: (U.cpu(), V.cpu())}, dtypes.basis)
    bases = SlotProjector(*(t.to(U.device) for t in readback[module]))
    total = 0.0
    for delta in slot():
        norm_sq = delta.norm_sq()
        projected = bases.project(delta)
        _, stored = encode_core(module, bases.best_core(projected).cpu(), delta.rank, dtypes.cores)
        weight_sq = (0.0 if norm_sq == 0 else 1.0 / norm_sq) if normalize else 1.0
        total += weight_sq * bases.error_sq(norm_sq, projected, stored.to(projected.device))
    return total


def predicted_error(profiles: dict[str, SlotProfile], sizes: Sizes, dtypes: StoreDtypes) -> float:
    """Predicted mean relative error of a store of `sizes` in `dtypes` (see the module docstring)."""
    err = total = 0.0
    for module, prof in profiles.items():
        gain = prof.curve.gains[prof.curve.sizes.index(sizes[module])]
        err += (prof.total - gain) + prof.quant_sq[dtypes.label] * gain
        total += prof.total
    return 0.0 if total <= 0 else math.sqrt(max(err, 0.0) / total)


def _priced(profiles: dict[str, SlotProfile], dtypes: StoreDtypes) -> dict[str, SlotCurve]:
    """Every slot's curve with its costs in bytes of `dtypes`."""
    item = ITEM_BYTES[dtypes.basis], ITEM_BYTES[dtypes.cores]
    return {m: p.curve.priced(*item) for m, p in profiles.items()}


def _payload(curves: dict[str, SlotCurve], sizes: Sizes) -> int:
    return sum(c.costs[c.sizes.index(sizes[m])] for m, c in curves.items())


def _for_bytes(profiles: dict[str, SlotProfile], payload: float, dtypes: StoreDtypes) -> Sizes | None:
    try:
        return allocate(_priced(profiles, dtypes), int(payload))
    except ValueError:
        return None


def _for_error(profiles: dict[str, SlotProfile], goal: float, dtypes: StoreDtypes) -> Sizes | None:
    """The smallest allocation (bisection on its budget) predicted to meet `goal`; None when none does."""
    curves = _priced(profiles, dtypes)
    low = sum(c.costs[0] for c in curves.values())
    high = sum(c.costs[-1] for c in curves.values())
    if predicted_error(profiles, allocate(curves, high), dtypes) > goal:
        return None
    while high - low > max(1, low // 200):
        mid = (low + high) // 2
        if predicted_error(profiles, allocate(curves, mid), dtypes) <= goal:
            high = mid
        else:
            low = mid
    return allocate(curves, high)


def choose(
    profiles: dict[str, SlotProfile],
    settings: SubspaceSettings,
    overhead: dict[StoreDtypes, int],
    allowed: int | None,
    goal: float | None,
) -> tuple[StoreDtypes, Sizes, dict[str, Any]]:
    """(dtypes, sizes, record) for a target, from the profiles; raises SubspaceError when none meets it."""
    target = settings.target
    assert target is not None
    allowed_dtypes = candidates(settings)
    options: dict[StoreDtypes, tuple[Sizes, float, int]] = {}
    for dtypes in allowed_dtypes:
        if allowed is not None:
            sizes = _for_bytes(profiles, allowed - overhead[dtypes], dtypes)
        else:
            assert goal is not None
            sizes = _for_error(profiles, goal, dtypes)
        if sizes is not None:
            options[dtypes] = (
                sizes,
                predicted_error(profiles, sizes, dtypes),
                _payload(_priced(profiles, dtypes), sizes),
            )
    if not options:
        if allowed is not None:
            raise TargetError(
                f"subspace.target cannot be met: {allowed:,} bytes do not hold the smallest store (k = 1 in "
                "every slot) beside the heads and the manifest"
            )
        best = min(
            predicted_error(profiles, allocate(_priced(profiles, d), 1 << 62), d) for d in allowed_dtypes
        )
        raise TargetError(
            f"subspace.target max_rel_error {target.max_rel_error:g} cannot be met: the widest store "
            f"(k up to {settings.k}) is predicted to reach {best:.4g}"
        )
    if allowed is not None:
        dtypes = min(options, key=lambda d: (options[d][1], allowed_dtypes.index(d)))
    else:
        dtypes = min(options, key=lambda d: (options[d][2] + overhead[d], options[d][1]))
    sizes, error, payload = options[dtypes]
    record = {
        "dtype": dtypes.basis,
        "core_dtype": dtypes.cores,
        "why": "lowest predicted mean rel. error at the byte budget"
        if allowed is not None
        else "fewest bytes predicted to meet the error",
        "predicted_rel_error": round(error, 6),
        "payload_bytes": payload,
        "k_out": [min(s[0] for s in sizes.values()), max(s[0] for s in sizes.values())],
        "k_in": [min(s[1] for s in sizes.values()), max(s[1] for s in sizes.values())],
        "candidates": {
            d.label: {"predicted_rel_error": round(e, 6), "payload_bytes": b}
            for d, (_, e, b) in options.items()
        },
    }
    return dtypes, sizes, record


def _rows(inputs: dict[str, torch.Tensor]) -> str:
    counts = [int(x.shape[0]) for x in inputs.values()]
    return f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def mean_rel_error(store: SubspaceStore) -> float:
    entries = store.manifest["tasks"].values()
    return sum(float(e["rel_error"]) for e in entries) / max(len(entries), 1)


@dataclass
class Plan:
    """One way to split the zoo a target may choose: its cluster count, each task's cluster (None for one
    basis), and the profile of every (cluster, slot) it would store."""

    count: int
    labels: dict[str, int] | None
    profiles: dict[str, SlotProfile]  # "cluster|slot" keys for clusters, slot names for one basis
    extra_bytes: int = 0  # what the clusters add to the manifest: column ranges, offsets, each task's cluster


def plans(
    tasks: list[TaskSource],
    settings: SubspaceSettings,
    base: Checkpoint | None,
    device: str,
    progress: bool,
    inputs: dict[str, torch.Tensor] | None,
) -> list[Plan]:
    """The cluster counts the target chooses among (one basis unless `clusters` is given): for each, the
    tasks are clustered once at ASSIGN_K-equivalent bytes, then every cluster's slots are profiled, so one
    allocation spends the budget over all clusters' slots at once."""
    from mergekit_subspace.clusters import AUTO_COUNTS, check_clusters, equal_bytes_k, fit_clusters

    if settings.clusters is None:
        counts = [1]
    elif settings.clusters == "auto":
        counts = [c for c in AUTO_COUNTS if c == 1 or 2 * c <= len(tasks)]
    else:
        check_clusters(settings.clusters, tasks)
        counts = [settings.clusters]
    found = []
    for count in counts:
        if count == 1:
            found.append(Plan(1, None, profile_slots(tasks, settings, base, device, progress, inputs)))
            continue
        at = settings.model_copy(update={"k": ASSIGN_K, "k_in": None, "target": None, "clusters": count})
        k, _ = equal_bytes_k(tasks, base, at, count)
        fit = fit_clusters(tasks, at.model_copy(update={"k": k}), count, base, device, progress)
        profiles = {}
        for cluster in range(count):
            members = [t for t in tasks if fit.labels[t.name] == cluster]
            for module, profile in profile_slots(members, settings, base, device, progress, inputs).items():
                profiles[f"{cluster}{SEP}{module}"] = profile
        task_slots = sum(len(t.shapes) for t in tasks)
        extra = 14 * count * len({m for t in tasks for m in t.shapes}) + 8 * task_slots + 14 * len(tasks)
        found.append(Plan(count, fit.labels, profiles, extra))
    return found


def choose_plan(
    found: list[Plan],
    settings: SubspaceSettings,
    overhead: dict[StoreDtypes, int],
    allowed: int | None,
    goal: float | None,
) -> tuple[Plan, StoreDtypes, Sizes, dict[str, Any]]:
    """The plan, dtype and sizes a target takes: the lowest predicted error at a byte budget, the fewest
    bytes for an error; with several counts, the record lists each one's prediction."""
    options = []
    failure: TargetError | None = None
    for plan in found:
        try:
            spent = {d: b + plan.extra_bytes for d, b in overhead.items()}
            options.append((plan, *choose(plan.profiles, settings, spent, allowed, goal)))
        except TargetError as exc:
            failure = failure or exc
    if not options:
        assert failure is not None
        raise failure
    if allowed is not None:
        best = min(options, key=lambda o: o[3]["predicted_rel_error"])
    else:
        best = min(
            options, key=lambda o: (o[3]["payload_bytes"] + o[0].extra_bytes, o[3]["predicted_rel_error"])
        )
    plan, dtypes, sizes, record = best
    if len(found) > 1 or plan.count > 1:
        record["clusters"] = plan.count
        record["cluster_counts"] = {
            str(p.count): {k: r[k] for k in ("dtype", "core_dtype", "predicted_rel_error", "payload_bytes")}
            for p, _, _, r in options
        }
    return plan, dtypes, sizes, record


def compress_to_target(
    cls: type[SubspaceStore],
    tasks: list[TaskSource],
    settings: SubspaceSettings,
    out: str | Path,
    base: Checkpoint | None,
    overwrite: bool,
    progress: bool,
    device: str,
    inputs: dict[str, torch.Tensor] | None = None,
    **options: Any,
) -> SubspaceStore:
    """Resolve the target to a dtype and k per slot (and the clusters, when `clusters` is given), write the
    store, measure it, correct and rewrite while it misses (see the module docstring). With calibration
    `inputs` the error is the output error on them."""
    from mergekit_subspace.clusters import compress_clustered

    target = settings.target
    assert target is not None
    target = target.model_copy(update={"chosen": None})
    settings = settings.model_copy(update={"target": target})
    check_target(tasks, settings, base)
    allowed = target_bytes(tasks, settings)
    goal = target.max_rel_error
    found = plans(tasks, settings, base, device, progress, inputs)
    overhead = {d: overhead_bytes(tasks, d) for d in candidates(settings)}
    store = None
    for attempt in range(MAX_TRIES):
        plan, dtypes, sizes, record = choose_plan(found, settings, overhead, allowed, goal)
        record["tries"] = attempt + 1
        record["sized_by"] = (
            f"output energy on {_rows(inputs)} calibration rows per slot"
            if inputs
            else "captured weight energy"
        )
        chosen = settings.model_copy(
            update={
                "dtype": dtypes.basis,
                "core_dtype": None if dtypes.cores == dtypes.basis else dtypes.cores,
                "target": target.model_copy(update={"chosen": record}),
                "clusters": None if plan.labels is None else plan.count,
            }
        )
        if plan.labels is None:
            store = cls.from_tasks(
                tasks,
                chosen,
                out,
                base=base,
                overwrite=overwrite or attempt > 0,
                progress=progress,
                device=device,
                sizes=sizes,
                **options,
            )
        else:
            per_cluster: list[Sizes] = [{} for _ in range(plan.count)]
            for key, size in sizes.items():
                cluster, _, module = key.partition(SEP)
                per_cluster[int(cluster)][module] = size
            store = compress_clustered(
                cls,
                tasks,
                chosen,
                Path(out),
                base,
                overwrite or attempt > 0,
                progress,
                device,
                options.get("base_identity"),
                assigned=(plan.labels, per_cluster),
            )
        if allowed is not None:
            written = store.files.bytes_on_disk()
            if written <= allowed:
                return store
            overhead[dtypes] += written - allowed + max(64, (written - allowed) // 10)
        else:
            assert goal is not None
            measured = store_output_error(store, tasks, inputs) if inputs else mean_rel_error(store)
            if measured <= target.max_rel_error:  # type: ignore[operator]
                return store
            goal *= 0.97 * target.max_rel_error / measured  # type: ignore[operator]
    assert store is not None
    return store


def describe(store: SubspaceStore) -> str | None:
    """One line on what a target chose, for compress to print (None for a store without a target)."""
    target = store.manifest["settings"].get("target")
    if not target or not target.get("chosen"):
        return None
    chosen = target["chosen"]
    asked = ", ".join(f"{k} {v:g}" for k, v in target.items() if k != "chosen")
    label = store_dtypes(store.manifest["settings"]).label
    others = ", ".join(
        f"{d} {c['predicted_rel_error']:.3g}" for d, c in chosen["candidates"].items() if d != label
    )
    info = store.info()
    return (
        f"target {asked}: chose {label} ({chosen['why']}"
        + (f"; sized by {chosen['sized_by']}" if chosen.get("sized_by", "").startswith("output") else "")
        + ")"
        + (f", {chosen['clusters']} clusters" if chosen.get("clusters", 1) > 1 else "")
        + f", k_out {chosen['k_out'][0]}-"
        f"{chosen['k_out'][1]} per slot, predicted mean rel. error {chosen['predicted_rel_error']:.3g}"
        + (f" (others: {others})" if others else "")
        + f"; measured {mean_rel_error(store):.3g}, ratio {info['ratio']:.1f}x, {info['bytes']['store']:,} bytes"
    )
