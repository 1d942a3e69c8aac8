"""vLoRA (PyPI `vlora-dev`) as a peer: PCA of flattened A and B per layer, at bytes matched to our store.

vLoRA needs one rank and one layer set per subspace, so the zoo is split into such groups, each with its own
subspace; its number of components is the largest whose saved size fits the group's share of our bytes.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from mergekit_subspace.sources import TaskSource

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def available() -> bool:
    try:
        import vlora  # noqa: F401
    except ImportError:
        return False
    return True


def _weights(task: TaskSource):
    from vlora import LoRAWeights

    names = sorted(task.slots)
    return LoRAWeights(
        layer_names=names,
        lora_a={m: task.slots[m].A.float() for m in names},
        lora_b={m: task.slots[m].B.float() for m in names},
        rank=next(iter(task.slots.values())).rank,
    )


def _saved_bytes(subspace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        subspace.save(tmp)
        return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())


def vlora_at_bytes(tasks: list[TaskSource], byte_budget: float) -> tuple[dict[str, Factors], int, dict]:
    """Per-task factors (scale folded in) from vLoRA subspaces whose saved size totals at most `byte_budget`."""
    from vlora import SharedSubspace

    groups: dict[tuple, list[TaskSource]] = {}
    for task in tasks:
        ranks = {d.rank for d in task.slots.values()}
        groups.setdefault((tuple(sorted(ranks)), tuple(sorted(task.slots))), []).append(task)
    total_sources = sum(t.source_bytes for t in tasks)
    factors: dict[str, Factors] = {}
    spent = 0
    chosen: dict[str, int] = {}
    for key, members in sorted(groups.items(), key=lambda kv: kv[0]):
        if len(key[0]) > 1:  # rank_pattern inside one adapter: vLoRA has no way to hold it
            continue
        share = byte_budget * sum(t.source_bytes for t in members) / total_sources
        adapters = [_weights(t) for t in members]
        best = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for components in range(1, len(members) + 1):
                subspace = SharedSubspace.from_adapters(
                    adapters, task_ids=[t.name for t in members], num_components=components
                )
                size = _saved_bytes(subspace)
                if size > share and best is not None:
                    break
                best = (subspace, size, components)
        assert best is not None
        subspace, size, components = best
        spent += size
        chosen["/".join(map(str, key[0])) + f"x{len(key[1])}"] = components
        for task in members:
            rebuilt = subspace.reconstruct(task.name)
            factors[task.name] = {
                m: (rebuilt.lora_b[m].double() * task.slots[m].scale, rebuilt.lora_a[m].double())
                for m in task.slots
            }
    return factors, spent, {"components_per_group": chosen, "groups": len(groups)}
