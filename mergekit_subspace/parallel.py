"""Many processes, one result: slots shared out across torch.distributed ranks, results gathered on rank 0.

Under `torchrun` (WORLD_SIZE > 1 in the environment) the process group is joined once, with gloo on the CPU
and nccl for CUDA. Slots are dealt to ranks by their cost (largest first, each to the least loaded rank), so
the assignment is the same on every rank and every run; each slot's numbers do not depend on which rank
computed them, so a store is byte-identical for any number of processes. A bad file met by any rank
becomes the same SubspaceError on every rank, so all stop with one line and nothing is written.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from mergekit_subspace.errors import SubspaceError

R = TypeVar("R")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list[str], costs: dict[str, float]) -> list[str]:
        """This rank's share of `items`: largest cost first, each to the least loaded rank (ties: lowest)."""
        if self.world == 1:
            return list(items)
        load = [0.0] * self.world
        owner: dict[str, int] = {}
        for item in sorted(items, key=lambda it: (-costs.get(it, 1.0), it)):
            target = min(range(self.world), key=lambda r: (load[r], r))
            owner[item] = target
            load[target] += costs.get(item, 1.0)
        return [item for item in items if owner[item] == self.rank]

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def current(device: str = "cpu") -> Ranks:
    """The ranks of this run; joins the torchrun process group on first use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size())


def map_shared(
    ranks: Ranks,
    items: list[str],
    costs: dict[str, float],
    work: Callable[[str], R],
    desc: str,
    progress: bool = True,
    everywhere: bool = False,
) -> dict[str, R]:
    """work(item) for every item (a slot, a task), shared out over the ranks; the results on rank 0 (on
    every rank when `everywhere`), {} on the others. The first bad input any rank meets (first in `items`
    order) is raised on all of them."""
    mine = ranks.shard(items, costs)
    results: dict[str, R] = {}
    error: tuple[int, str, str | None] | None = None
    bar = tqdm(mine, desc=desc, disable=None if progress and ranks.main else True, leave=False)
    for item in bar:
        try:
            results[item] = work(item)
        except SubspaceError as exc:
            error = (items.index(item), exc.problem, exc.path)
            break
    bar.close()
    if ranks.world > 1:
        errors = [e for e in ranks.all_gather(error) if e is not None]
        error = min(errors) if errors else None
    if error is not None:
        raise SubspaceError(error[1], error[2])
    parts = ranks.all_gather(results) if everywhere else ranks.gather(results)
    if parts is None:
        return {}
    merged: dict[str, R] = {}
    for part in parts:
        merged.update(part)
    return {item: merged[item] for item in items if item in merged}
