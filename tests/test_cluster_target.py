"""Targets with clusters: one byte budget spent over every cluster's slots, and the cluster count chosen."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_clusters
from test_clusters import _compress, _group_lora

from mergekit_subspace.subspace import SubspaceStore
from mergekit_subspace.target import mean_rel_error


@pytest.fixture(scope="module")
def four_dim_groups(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two groups whose deltas span 4 dimensions each: a target's k steps (1, 4, 8, ...) can hold one group
    in k = 4 and both only in k = 8."""
    zoo = tmp_path_factory.mktemp("four-dim-groups")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(test_clusters, "GROUP_DIM", 4)
        return [_group_lora(tiny_bert, zoo / f"g{i % 2}-{i}", group=i % 2, seed=i) for i in range(8)]


def test_error_target_with_auto_clusters_splits_the_groups_at_fewer_bytes(
    tiny_bert: Path,
    four_dim_groups: list[Path],
    tmp_path: Path,
) -> None:
    one = SubspaceStore(
        _compress(tmp_path, tiny_bert, four_dim_groups, "  target: {max_rel_error: 0.05}", "one")
    )
    auto = SubspaceStore(
        _compress(
            tmp_path, tiny_bert, four_dim_groups, "  target: {max_rel_error: 0.05}\n  clusters: auto", "auto"
        )
    )
    chosen = auto.manifest["settings"]["target"]["chosen"]
    assert chosen["clusters"] == 2 and set(chosen["cluster_counts"]) == {"1", "2", "3", "4"}
    assert auto.manifest["settings"]["clusters"] == 2
    groups: dict[int, set[str]] = {}
    for name, entry in auto.manifest["tasks"].items():
        groups.setdefault(entry["cluster"], set()).add(name.split("-")[0])
    assert sorted(map(sorted, groups.values())) == [["g0"], ["g1"]]
    assert mean_rel_error(auto) <= 0.05 and mean_rel_error(one) <= 0.05
    assert auto.stored_numbers() < one.stored_numbers()  # the bases and cores; heads are the same in both
    for name in auto.tasks:  # every task reads back through its own cluster's columns
        factors = auto.task_factors(name)
        assert factors and all(B.shape[1] == A.shape[0] for B, A in factors.values())


def test_ratio_target_with_a_cluster_count_meets_its_bytes(
    tiny_bert: Path,
    four_dim_groups: list[Path],
    tmp_path: Path,
) -> None:
    store = SubspaceStore(
        _compress(tmp_path, tiny_bert, four_dim_groups, "  target: {ratio: 2}\n  clusters: 2", "ratio")
    )
    info = store.info()
    assert info["ratio"] >= 2
    assert store.manifest["settings"]["target"]["chosen"]["clusters"] == 2
    assert {e["cluster"] for e in store.manifest["tasks"].values()} == {0, 1}
