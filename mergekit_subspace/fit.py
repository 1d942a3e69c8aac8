"""SubspaceBasis: the per-slot shared bases of a zoo as one fitted object, shaped like scikit-learn's PCA.

`SubspaceBasis(k=16).fit(tasks)` walks the zoo slot by slot (slot-major): for one slot it reads only that
slot's factors from every task that touches it (LoRA folders are lazy handles), fits U and V, lets a caller
use the slot's deltas while they are at hand (`fit_slots`: the store projects and encodes every task there),
and drops them before the next slot. Peak memory is one slot of the zoo, never the zoo; a slot larger than
`slot_memory` is not even held, but read again for each pass of the randomized solver.

Every fit in the project goes through here: compress, add (transform), merge from adapters, the bench's
leave-one-out baseline, the byte budget and the benchmarks. Under torchrun the slots are shared out over
the ranks (`parallel.py`) and the fitted attributes are set on rank 0.

Fitted attributes (trailing underscore, as scikit-learn): `bases_` {slot: (U, V)}, `k_` {slot: (k_out,
k_in)}, `captured_energy_`, `spectrum_` (squared singular values of the weighted stacked factors, leading
ones), `total_energy_`, `members_` (task names per slot), `shapes_`, `capped_`, `solver_`,
`transfer_weights_` (the prior's weight in each slot pulled toward `settings.transfer_from`).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_subspace import parallel, transfer
from mergekit_subspace.basis import (
    FactorBlock,
    SlotBasis,
    captured_energy,
    hooi_step,
    randomized_fit,
    slot_seed,
    smallest_k_for_capture,
    stack_blocks,
    task_weights,
    weighted_capture,
)
from mergekit_subspace.budget import SlotCurve, allocate, curve_sizes, slot_curve
from mergekit_subspace.calibration import output_shares
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.io.checkpoint import Checkpoint
from mergekit_subspace.io.codec import ITEM_BYTES, store_dtypes
from mergekit_subspace.lowrank import COMPUTE_DTYPE, LowRankDelta, core_to_factors, stored_error_sq
from mergekit_subspace.recipe import SubspaceSettings
from mergekit_subspace.sources import TaskSource, check_unique_names, slot_shapes

EXACT_FLOPS = 1e9  # below this estimated cost a slot always takes the exact SVD (about a tenth of a second)
ENERGY_MAX_K = 256  # widest basis an energy target may pick on the randomized solver
SLOT_MEMORY = 64 << 20  # bytes of one slot's factors (as read) held between passes; larger slots are re-read

Visit = Callable[[str, SlotBasis, "SlotDeltas"], Any]


class SlotDeltas:
    """One slot's deltas across the zoo, yielded one task at a time. When their factors fit `hold_bytes`
    they are kept after the first pass (as read, or stacked in float32 blocks for the randomized solver);
    otherwise every pass reads them again from the files. `tasks` lists the tasks in yield order."""

    def __init__(
        self, module: str, tasks: Sequence[TaskSource], hold_bytes: int, device: str = "cpu"
    ) -> None:
        self.module = module
        self.tasks = [t for t in tasks if module in t.shapes]
        self.shape = self.tasks[0].shapes[module]
        self.ranks = [t.ranks[module] for t in self.tasks]
        self.nbytes = sum(self.ranks) * sum(self.shape) * 4  # as float32 blocks
        self._hold = self.nbytes <= hold_bytes
        self._held: list[LowRankDelta] | None = None
        self._blocks: list[FactorBlock] | None = None
        self._as_blocks = False
        self.device = device

    def _read(self, task: TaskSource) -> LowRankDelta:
        delta = task.slots[self.module]  # shapes come from the header the read itself is checked against
        if self.device != "cpu":
            delta = LowRankDelta(B=delta.B.to(self.device), A=delta.A.to(self.device), scale=delta.scale)
        return delta

    def __call__(self) -> Iterator[LowRankDelta]:
        """The deltas, one task at a time; once the slot has been read as blocks, views of the blocks (so
        every later pass sees the same numbers whether the slot is held or read again)."""
        if self._as_blocks:
            for block in self.blocks():
                yield from block.deltas()
            return
        yield from self._deltas(keep=self._hold)

    def _deltas(self, keep: bool) -> Iterator[LowRankDelta]:
        if self._held is not None:
            yield from self._held
            return
        kept: list[LowRankDelta] | None = [] if keep else None
        for task in self.tasks:
            delta = self._read(task)
            if kept is not None:
                kept.append(delta)
            yield delta
        if kept is not None:
            self._held = kept

    def blocks(self) -> Iterator[FactorBlock]:
        """The deltas stacked in float32 blocks (kept after the first pass when the slot is held)."""
        self._as_blocks = True
        if self._blocks is not None:
            yield from self._blocks
            return
        kept: list[FactorBlock] | None = [] if self._hold else None
        for block in stack_blocks(
            self._deltas(keep=False), reuse=kept is None
        ):  # the blocks are what is kept
            if kept is not None:
                kept.append(block)
            yield block
        if kept is not None:
            self._blocks, self._held = kept, None

    def with_tasks(self) -> Iterable[tuple[TaskSource, LowRankDelta]]:
        return zip(self.tasks, self(), strict=True)


@dataclass
class SlotFit:
    """One slot's fitted basis, the captured share, and the capture of any prefix (for the byte budget)."""

    basis: SlotBasis
    captured: float
    total_energy: float  # sum_i w_i^2 ||D_i||^2
    spectrum_total: float  # what the spectrum is divided by for scree plots (the full spectrum's sum)
    solver: str
    capture: Callable[[int, int], float]
    transfer_weight: float | None = None  # the prior's weight, where the slot was pulled toward another store


@dataclass
class SlotOutcome:
    """What one slot's fit sends back to rank 0: its basis (on the CPU), statistics and the visit result."""

    U: torch.Tensor
    V: torch.Tensor
    spectrum_out: torch.Tensor
    captured: float
    total_energy: float
    spectrum_total: float
    capped: bool
    solver: str
    members: list[str]
    result: Any
    transfer_weight: float | None = None


def choose_solver(
    shape: tuple[int, int], total_rank: int, width_out: int, width_in: int, power_iters: int, solver: str
) -> str:
    """ "exact" when the slot's dense SVD costs no more than the randomized passes (or under EXACT_FLOPS),
    else "randomized"; an explicit choice is kept."""
    if solver != "auto":
        return solver
    m, n = shape
    if width_out >= min(m, total_rank) and width_in >= min(n, total_rank):
        return "exact"  # the sketch would be as wide as the problem
    exact = 4.0 * total_rank * (m * min(m, total_rank) + n * min(n, total_rank))
    randomized = 4.0 * (3 + power_iters) * total_rank * (m * width_out + n * width_in)
    return "exact" if exact <= max(randomized, EXACT_FLOPS) else "randomized"


class SubspaceBasis:
    """Per-slot shared bases fit on a zoo of tasks: fit / transform / inverse_transform / score.

    Settings are a `SubspaceSettings` (the recipe's `subspace:` block, where every constraint is declared)
    or its fields as keywords. `sizes` fixes (k_out, k_in) per slot (as a store chose them); `device` runs the
    fit and projections there ("cuda" where there is one); `slot_memory` bounds the bytes of one slot's
    factors that are held between passes; `inputs` holds sampled input rows per slot (calibration.py), by
    whose output energy a byte budget or target sizes the slots.
    """

    def __init__(
        self,
        settings: SubspaceSettings | None = None,
        *,
        sizes: dict[str, tuple[int, int]] | None = None,
        device: str = "cpu",
        slot_memory: int = SLOT_MEMORY,
        progress: bool = False,
        inputs: dict[str, torch.Tensor] | None = None,
        **params: Any,
    ) -> None:
        if settings is not None and params:
            raise TypeError("give settings or keyword parameters, not both")
        self.settings = settings if settings is not None else SubspaceSettings(**params)
        self.sizes = dict(sizes) if sizes else None
        self.device = check_device(device)
        self.slot_memory = slot_memory
        self.progress = progress
        self.inputs = inputs

    # ---- fitting --------------------------------------------------------------------------------------
    def fit(
        self,
        tasks: Sequence[TaskSource],
        base: Checkpoint | None = None,
        modules: Sequence[str] | None = None,
    ) -> SubspaceBasis:
        """Fit every slot's U and V (or only those of `modules`) on the tasks that touch it."""
        self.fit_slots(tasks, base=base, modules=modules)
        return self

    def fit_transform(
        self, tasks: Sequence[TaskSource], base: Checkpoint | None = None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Fit, and project every task in the same pass over its slots: {task: {slot: core (float64)}}."""

        def project(module: str, basis: SlotBasis, slot: SlotDeltas) -> dict[str, torch.Tensor]:
            return {t.name: d.project(basis.U, basis.V).cpu() for t, d in slot.with_tasks()}

        per_slot = self.fit_slots(tasks, visit=project, base=base)
        cores: dict[str, dict[str, torch.Tensor]] = {t.name: {} for t in tasks}
        for module, by_task in per_slot.items():
            for name, core in by_task.items():
                cores[name][module] = core
        return cores

    def fit_slots(
        self,
        tasks: Sequence[TaskSource],
        visit: Visit | None = None,
        base: Checkpoint | None = None,
        modules: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """The one fit loop. For each slot (of `modules`, default all): fit, then `visit(slot, basis, deltas)`
        while its deltas are at hand. Returns {slot: visit result} (on rank 0; {} on the other ranks) and
        sets the fitted attributes."""
        tasks = list(tasks)
        if not tasks:
            raise SubspaceError("the zoo is empty: nothing to fit")
        check_unique_names(tasks)
        shapes = slot_shapes(tasks, base)
        if modules is not None:
            wanted = set(modules)
            shapes = {m: shapes[m] for m in shapes if m in wanted}
        ranks = parallel.current(self.device)
        costs = {
            m: sum(sum(t.ranks[m] for t in tasks if m in t.shapes) * s for s in shapes[m]) for m in shapes
        }
        transfer.check_source(self.transfer_source, shapes, base.identity() if base is not None else None)
        sizes = self.sizes or {}
        if self.settings.budget_bytes is not None and self.sizes is None:
            sizes = self._budget_sizes(tasks, list(shapes), costs, ranks)

        def work(module: str) -> SlotOutcome:
            slot = SlotDeltas(module, tasks, self.slot_memory, self.device)
            fit = self._fit_slot(slot, sizes.get(module), self.settings.refine)
            outcome = SlotOutcome(
                U=fit.basis.U.cpu(),
                V=fit.basis.V.cpu(),
                spectrum_out=fit.basis.spectrum_out.cpu(),
                captured=fit.captured,
                total_energy=fit.total_energy,
                spectrum_total=fit.spectrum_total,
                capped=fit.basis.capped,
                solver=fit.solver,
                members=[t.name for t in slot.tasks],
                result=visit(module, fit.basis, slot) if visit is not None else None,
                transfer_weight=fit.transfer_weight,
            )
            del slot, fit  # the slot's factors go before the next slot is read
            release_freed_memory()
            return outcome

        outcomes = parallel.map_shared(ranks, sorted(shapes), costs, work, "fit slots", self.progress)
        self.ranks_ = ranks
        self.shapes_ = {m: shapes[m] for m in sorted(shapes)}
        self.bases_ = {m: (o.U, o.V) for m, o in outcomes.items()}
        self.k_ = {m: (int(o.U.shape[1]), int(o.V.shape[1])) for m, o in outcomes.items()}
        self.captured_energy_ = {m: o.captured for m, o in outcomes.items()}
        self.spectrum_ = {m: o.spectrum_out for m, o in outcomes.items()}
        self.total_energy_ = {m: o.total_energy for m, o in outcomes.items()}
        self.spectrum_total_ = {m: o.spectrum_total for m, o in outcomes.items()}
        self.capped_ = {m: o.capped for m, o in outcomes.items()}
        self.solver_ = {m: o.solver for m, o in outcomes.items()}
        self.members_ = {m: o.members for m, o in outcomes.items()}
        self.transfer_weights_ = {
            m: o.transfer_weight for m, o in outcomes.items() if o.transfer_weight is not None
        }
        return {m: o.result for m, o in outcomes.items()}

    @functools.cached_property
    def transfer_source(self) -> transfer.TransferSource | None:
        """The store `settings.transfer_from` names, opened once (None without one)."""
        return transfer.open_source(self.settings)

    def _budget_sizes(
        self, tasks: list[TaskSource], modules: list[str], costs: dict[str, float], ranks: parallel.Ranks
    ) -> dict[str, tuple[int, int]]:
        """(k_out, k_in) per slot under `budget_bytes`, from one fit of each slot at its largest size."""
        settings = self.settings
        assert settings.k is not None and settings.budget_bytes is not None

        def curve(module: str) -> SlotCurve:
            slot = SlotDeltas(module, tasks, self.slot_memory, self.device)
            return self.fit_largest(slot, settings.k)[1]

        curves = parallel.map_shared(
            ranks, modules, costs, curve, "size slots", self.progress, everywhere=True
        )
        try:
            dtypes = store_dtypes(settings)
            item = ITEM_BYTES[dtypes.basis], ITEM_BYTES[dtypes.cores]
            return allocate({m: c.priced(*item) for m, c in curves.items()}, settings.budget_bytes)
        except ValueError as exc:
            raise SubspaceError(
                f"subspace.budget_bytes = {settings.budget_bytes:,} is too small: {exc}"
            ) from None

    def fit_largest(self, slot: SlotDeltas, k_cap: int) -> tuple[SlotFit, SlotCurve, tuple[int, int]]:
        """One fit of a slot at the largest size any allocation may give it (k_cap, or k_in on the right),
        and the captured-energy curve over every smaller (k_out, k_in): what byte budgets and targets
        spend bytes by."""
        total_rank = sum(slot.ranks)
        k_in = self.settings.k_in
        cap_out = min(slot.shape[0], total_rank, k_cap)
        cap_in = min(slot.shape[1], total_rank, k_in if k_in is not None else k_cap)
        fit = self._fit_slot(slot, (cap_out, cap_in), refine=0)
        capture, total = fit.capture, fit.total_energy
        if self.inputs is not None and slot.module in self.inputs:  # sized by output energy on real inputs
            shares, total = output_shares(
                slot(),
                fit.basis.U,
                fit.basis.V,
                self.inputs[slot.module],
                curve_sizes(cap_out, cap_in, k_in),
                self.settings.normalize,
            )
            capture = lambda k_out, k_in_: shares[(k_out, k_in_)]  # noqa: E731
        curve = slot_curve(capture, total, slot.shape, slot.ranks, cap_out, cap_in, k_in)
        return fit, curve, (cap_out, cap_in)

    def _fit_slot(self, slot: SlotDeltas, size: tuple[int, int] | None, refine: int) -> SlotFit:
        s = self.settings
        m, n = slot.shape
        total_rank = sum(slot.ranks)
        k, k_in, energy = (s.k, s.k_in, s.energy) if size is None else (size[0], size[1], None)
        want_out = ENERGY_MAX_K if energy is not None else k
        want_in = ENERGY_MAX_K if energy is not None else (k_in if k_in is not None else k)
        assert want_out is not None and want_in is not None
        width_out = min(m, total_rank, want_out + s.oversample)
        width_in = min(n, total_rank, want_in + s.oversample)
        solver = choose_solver(slot.shape, total_rank, width_out, width_in, s.power_iters, s.solver)
        prior = self.transfer_source.prior(slot.module, slot.shape) if self.transfer_source else None
        if solver == "exact" or prior is not None:
            deltas = list(slot())
            basis, weight = transfer.fit_slot(deltas, prior, s, k, energy, refine, k_in)
            weights = task_weights(deltas, s.normalize)

            def exact_capture(k_out: int, k_in_: int) -> float:
                return weighted_capture(deltas, weights, basis.U[:, :k_out], basis.V[:, :k_in_])

            return SlotFit(
                basis=basis,
                captured=captured_energy(deltas, basis, s.normalize),
                total_energy=sum(w * w * d.norm_sq() for w, d in zip(weights, deltas, strict=True)),
                spectrum_total=float(basis.spectrum_out.sum()),
                solver="exact",
                capture=exact_capture,
                transfer_weight=weight,
            )

        fit = randomized_fit(
            slot.blocks,
            slot.shape,
            width_out,
            width_in,
            s.normalize,
            s.power_iters,
            slot_seed(slot.module),
            self.device,
        )
        weights = [float(w) for w in fit.weights]
        total = float(torch.sum(fit.weights**2 * fit.norms_sq))
        if energy is None:
            k_out, k_in_ = min(want_out, width_out), min(want_in, width_in)
            capped = want_out > min(m, total_rank) or want_in > min(n, total_rank)
        else:
            k_out, k_in_ = smallest_k_for_capture(fit.capture, energy, width_out, width_in)
            capped = fit.capture(k_out, k_in_) < energy - 1e-12
        U, V = fit.U[:, :k_out], fit.V[:, :k_in_]
        for step in range(refine):
            seed = slot_seed(f"{slot.module}#refine{step}")
            U = hooi_step(
                slot, weights, V, min(m, total_rank, k_out + s.oversample), True, s.power_iters, seed
            )
            U = U[:, :k_out]
            V = hooi_step(
                slot, weights, U, min(n, total_rank, k_in_ + s.oversample), False, s.power_iters, seed
            )
            V = V[:, :k_in_]
        basis = SlotBasis(
            U=U.contiguous(),
            V=V.contiguous(),
            spectrum_out=fit.spectrum_out,
            spectrum_in=fit.spectrum_in,
            k_requested=k,
            capped=capped,
        )
        if refine:
            kept = sum(
                w * w * float(torch.sum(d.project(U, V) ** 2)) for w, d in zip(weights, slot(), strict=True)
            )
            captured = 1.0 if total == 0 else kept / total
        else:
            captured = fit.capture(k_out, k_in_)
        return SlotFit(
            basis=basis,
            captured=captured,
            total_energy=total,
            spectrum_total=total,
            solver="randomized",
            capture=fit.capture,
        )

    # ---- using the fit --------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "bases_"):
            raise RuntimeError("this SubspaceBasis is not fitted yet: call fit first")

    def check_task(self, task: TaskSource) -> None:
        """Refuse a task whose slots the fit has no basis for, or whose shapes differ."""
        self._check_fitted()
        missing = sorted(set(task.shapes) - set(self.shapes_))
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise SubspaceError(
                f"targets {len(missing)} module(s) the store has no basis for ({shown}); recompress with this "
                "adapter in the recipe",
                task.source,
            )
        for module, shape in task.shapes.items():
            expected = tuple(self.shapes_[module])
            if tuple(shape) != expected:
                raise SubspaceError(
                    f"shapes do not fit the store: module '{module}' is {tuple(shape)}, the store's slot is "
                    f"{expected}",
                    task.source,
                )

    def transform(self, task: TaskSource) -> dict[str, torch.Tensor]:
        """The task's cores C = U^T D V per slot (float64), read one slot at a time."""
        self.check_task(task)
        return {module: task.slots[module].project(*self.bases_[module]) for module in sorted(task.shapes)}

    def inverse_transform(
        self, cores: dict[str, torch.Tensor], ranks: dict[str, int] | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """PEFT factors (B, A) of U C V^T per slot, keeping `ranks[slot]` directions (default: all)."""
        self._check_fitted()
        factors = {}
        for module, core in cores.items():
            U, V = self.bases_[module]
            rank = min(core.shape) if ranks is None else ranks[module]
            factors[module] = core_to_factors(U, core, V, rank)
        return factors

    def score(self, task: TaskSource) -> float:
        """Relative Frobenius error ||D - U C V^T|| / ||D|| of the task over all its slots."""
        self.check_task(task)
        err = norm = 0.0
        for module in sorted(task.shapes):
            delta = task.slots[module]
            U, V = self.bases_[module]
            err += stored_error_sq(delta, U, delta.project(U, V), V)
            norm += delta.norm_sq()
        return (err / norm) ** 0.5 if norm else 0.0

    @classmethod
    def from_bases(
        cls,
        bases: dict[str, tuple[torch.Tensor, torch.Tensor]],
        shapes: dict[str, tuple[int, int]],
        settings: SubspaceSettings | None = None,
    ) -> SubspaceBasis:
        """A fitted object from stored bases (a store's `basis.safetensors`), for transform and friends."""
        fitted = cls(settings or SubspaceSettings())
        fitted.bases_ = {m: (U.to(COMPUTE_DTYPE), V.to(COMPUTE_DTYPE)) for m, (U, V) in bases.items()}
        fitted.shapes_ = dict(shapes)
        fitted.k_ = {m: (int(U.shape[1]), int(V.shape[1])) for m, (U, V) in bases.items()}
        return fitted


def release_freed_memory() -> None:
    """Hand the slot's freed heap back to the OS (glibc keeps it otherwise, and RSS creeps up slot after
    slot: measured 374 -> 560 MiB over 32 slots of a 256-adapter zoo, 283 -> 336 MiB with this)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    """glibc, told to serve allocations of 1 MiB and more by mmap: freed blocks then go straight back to the
    OS (its default raises that threshold after each large free, and a slot's freed buffers stay resident:
    measured 581 -> 417 MiB peak for one slot of a 1,000-adapter zoo)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    return libc


M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_LIBC = _load_libc()


def check_device(device: str) -> str:
    """A usable torch device name; a clear error when CUDA is asked for and there is none."""
    name = str(device)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SubspaceError(f"--device {name}: no CUDA device is available here (torch {torch.__version__})")
    try:
        torch.device(name)
    except RuntimeError as exc:
        raise SubspaceError(f"--device {name}: not a torch device ({exc})") from None
    return name
