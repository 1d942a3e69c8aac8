"""`subspace: {clusters: C}`: a zoo pooled from unrelated groups gets one basis per group.

The zoo here is built so the answer is known: two groups of adapters, each group's deltas inside its own
two-dimensional input and output subspaces per slot. One basis of k = 2 cannot hold both groups; two
clusters of k = 2 hold every task exactly, at about the same bytes as one basis of k = 3.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_lora, peft_logits, write_recipe
from safetensors.torch import load_file, save_file
from test_store import dense_deltas

from mergekit_subspace.cli import main
from mergekit_subspace.clusters import kmeans, orthonormal_union
from mergekit_subspace.subspace import SubspaceStore

GROUP_DIM = 2


def _group_lora(
    base: Path,
    out: Path,
    group: int,
    seed: int,
    r: int = 3,
    in_group: int | None = None,
    targets: tuple[str, ...] = ("query", "value"),
) -> Path:
    """A real PEFT folder whose every delta lies in its group's fixed (output, input) subspaces (the input
    subspace of `in_group` where given: a task a cluster holds on one side only)."""
    make_lora(base, out, seed=seed, r=r, targets=targets)
    path = out / "adapter_model.safetensors"
    tensors = load_file(path)
    own = torch.Generator().manual_seed(1000 + seed)
    for key, value in tensors.items():
        if ".lora_" not in key:
            continue
        module_seed = sum(map(ord, key.split(".lora_")[0])) * 10 + group
        shared = torch.Generator().manual_seed(module_seed)
        if ".lora_A." in key:  # (r, in): rows inside the group's input subspace
            if in_group is not None:
                shared = torch.Generator().manual_seed(module_seed - group + in_group)
            basis = torch.randn(GROUP_DIM, value.shape[1], generator=shared)
            tensors[key] = torch.randn(value.shape[0], GROUP_DIM, generator=own) @ basis * 0.3
        else:  # (out, r): columns inside the group's output subspace
            basis = torch.randn(value.shape[0], GROUP_DIM, generator=shared)
            tensors[key] = basis @ torch.randn(GROUP_DIM, value.shape[1], generator=own) * 0.3
    save_file(tensors, path)
    return out


@pytest.fixture(scope="module")
def two_group_zoo(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    zoo = tmp_path_factory.mktemp("two-group-zoo")
    return [_group_lora(tiny_bert, zoo / f"g{i % 2}-{i}", group=i % 2, seed=i) for i in range(8)]


@pytest.fixture(scope="module")
def clustered(tiny_bert: Path, two_group_zoo: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zoo in two clusters of k = 2 (read-only: tests that change it work on a copy)."""
    return _compress(
        tmp_path_factory.mktemp("clustered"), tiny_bert, two_group_zoo, "  k: 2\n  clusters: 2", "two"
    )


def _compress(tmp_path: Path, base: Path, adapters: list[Path], settings: str, name: str) -> Path:
    listed = "\n".join(f"  - {p}" for p in adapters)
    recipe = write_recipe(
        tmp_path / f"{name}.yaml",
        f"base_model: {base}\nadapters:\n{listed}\nsubspace:\n{settings}\noutput: {tmp_path / name}\n",
    )
    result = CliRunner().invoke(main, ["compress", str(recipe)])
    assert result.exit_code == 0, result.output
    return tmp_path / name


def test_kmeans_separates_directions() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 20, generator=gen, dtype=torch.float64), dim=1)
    rows = torch.cat(
        [centres[i] + 0.05 * torch.randn(5, 20, generator=gen, dtype=torch.float64) for i in range(3)]
    )
    labels = kmeans(torch.nn.functional.normalize(rows, dim=1), 3)
    groups = [labels[5 * i : 5 * i + 5] for i in range(3)]
    assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 3


def test_two_clusters_hold_two_groups_exactly(
    tiny_bert: Path, two_group_zoo: list[Path], clustered: Path, tmp_path: Path
) -> None:
    one = SubspaceStore(_compress(tmp_path, tiny_bert, two_group_zoo, "  k: 2", "one"))
    two = SubspaceStore(clustered)
    manifest = two.manifest
    by_group = {}
    for name, entry in manifest["tasks"].items():
        by_group.setdefault(name.split("-")[0], set()).add(entry["cluster"])
    assert by_group["g0"] != by_group["g1"] and all(len(c) == 1 for c in by_group.values())
    for module, meta in manifest["slots"].items():
        assert meta["clusters"] == [[0, 2, 0, 2], [2, 2, 2, 2]], module
        assert (meta["k_out"], meta["k_in"]) == (4, 4)
    worst_one = max(e["rel_error"] for e in one.manifest["tasks"].values())
    worst_two = max(e["rel_error"] for e in manifest["tasks"].values())
    assert worst_one > 0.3 and worst_two < 1e-5
    adapter = two_group_zoo[3]
    out = two.reconstruct(adapter.name, tmp_path / "rebuilt")
    original, rebuilt = dense_deltas(adapter), dense_deltas(out)
    for module in original:
        torch.testing.assert_close(rebuilt[module], original[module], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        peft_logits(tiny_bert, out), peft_logits(tiny_bert, adapter), atol=1e-4, rtol=1e-4
    )
    assert two.verify() == []


def test_add_picks_the_cluster_that_holds_the_task(tiny_bert: Path, clustered: Path, tmp_path: Path) -> None:
    shutil.copytree(clustered, tmp_path / "store")
    store = SubspaceStore(tmp_path / "store")
    home = {name.split("-")[0]: entry["cluster"] for name, entry in store.manifest["tasks"].items()}
    fresh = _group_lora(tiny_bert, tmp_path / "new" / "g1-new", group=1, seed=99)
    result = store.add(fresh, policy="project")
    assert result["cluster"] == home["g1"] and result["rel_error"] < 1e-5
    out = SubspaceStore(store.path).reconstruct("g1-new", tmp_path / "rebuilt-new")
    for module, dense in dense_deltas(fresh).items():
        torch.testing.assert_close(dense_deltas(out)[module], dense, atol=1e-5, rtol=1e-4)


def test_merge_of_a_clustered_store_is_the_merge_of_its_deltas(
    two_group_zoo: list[Path], clustered: Path, tmp_path: Path
) -> None:
    store = clustered
    names = [p.name for p in two_group_zoo[:4]]
    listed = "\n".join(f"  - name: {n}" for n in names)
    recipe = write_recipe(
        tmp_path / "merge.yaml", f"store: {store}\nmerge_method: task_arithmetic\ntasks:\n{listed}\n"
    )
    result = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = dense_deltas(tmp_path / "merged" / names[0])  # one folder per task (each keeps its head)
    for module, dense in merged.items():
        expected = sum(dense_deltas(p)[module] for p in two_group_zoo[:4] if module in dense_deltas(p))
        torch.testing.assert_close(dense, expected, atol=1e-4, rtol=1e-4)


def test_orthonormal_union_keeps_the_deltas() -> None:
    gen = torch.Generator().manual_seed(1)
    U, V = (
        torch.randn(12, 5, generator=gen, dtype=torch.float64),
        torch.randn(9, 4, generator=gen, dtype=torch.float64),
    )
    core = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    Q_u, Q_v, (moved,) = orthonormal_union(U, V, [core])
    torch.testing.assert_close(Q_u.T @ Q_u, torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(Q_u @ moved @ Q_v.T, U @ core @ V.T)


def test_bad_cluster_counts_are_refused_before_writing(
    tiny_bert: Path, two_group_zoo: list[Path], tmp_path: Path
) -> None:
    listed = "\n".join(f"  - {p}" for p in two_group_zoo[:3])
    for settings, expected in (
        ("  clusters: 5", "more than the zoo's 3 tasks"),
        ("  clusters: 0", "clusters"),
        ("  clusters: 2\n  budget_bytes: 4000", "for a byte budget give target: {bytes: N}"),
        ("  clusters: 5\n  target: {ratio: 2}", "more than the zoo's 3 tasks"),
    ):
        recipe = write_recipe(
            tmp_path / "bad.yaml",
            f"base_model: {tiny_bert}\nadapters:\n{listed}\nsubspace:\n{settings}\noutput: {tmp_path / 'bad'}\n",
        )
        result = CliRunner().invoke(main, ["compress", str(recipe)])
        assert result.exit_code == 2, result.output
        assert expected in result.output and "Traceback" not in result.output
        assert not (tmp_path / "bad").exists()


def test_a_manifest_with_columns_beyond_the_basis_is_refused(clustered: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(clustered, store)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest.pop("manifest_sha256", None)
    module = sorted(manifest["slots"])[0]
    manifest["slots"][module]["clusters"][1] = [3, 2, 2, 2]
    (store / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["info", str(store)])
    assert result.exit_code == 2 and "beyond its basis" in result.output, result.output


def test_refit_fits_the_clusters_again_from_the_store_alone(clustered: Path, tmp_path: Path) -> None:
    shutil.copytree(clustered, tmp_path / "store")
    before = SubspaceStore(tmp_path / "store").manifest["tasks"]
    refit = SubspaceStore(tmp_path / "store").refit(progress=False)
    after = refit.manifest
    assert after["settings"]["clusters"] == 2
    assert all(meta["clusters"] is not None for meta in after["slots"].values())
    groups = {}
    for name, entry in after["tasks"].items():
        groups.setdefault(name.split("-")[0], set()).add(entry["cluster"])
        assert entry["rel_error"] < 1e-4 and before[name]["rel_error"] < 1e-4
    assert all(len(c) == 1 for c in groups.values()) and groups["g0"] != groups["g1"]


def test_auto_keeps_the_best_count_at_the_bytes_of_one_basis(
    tiny_bert: Path, two_group_zoo: list[Path], tmp_path: Path
) -> None:
    one = SubspaceStore(_compress(tmp_path, tiny_bert, two_group_zoo, "  k: 3", "one"))
    auto = SubspaceStore.compress(
        write_recipe(
            tmp_path / "auto.yaml",
            f"base_model: {tiny_bert}\nadapters:\n"
            + "\n".join(f"  - {p}" for p in two_group_zoo)
            + f"\nsubspace:\n  k: 3\n  clusters: auto\noutput: {tmp_path / 'auto'}\n",
        ),
        progress=False,
    )
    tried = auto.cluster_choices
    assert [t["clusters"] for t in tried] == [1, 2, 3, 4]
    assert tried[0]["k"] == 3 and all(t["k"] <= 3 for t in tried)
    best = min(tried, key=lambda t: t["mean_rel_error"])
    assert auto.manifest["settings"].get("clusters", 1) == best["clusters"]
    assert auto.stored_numbers() <= one.stored_numbers()
    mean_error = sum(e["rel_error"] for e in auto.manifest["tasks"].values()) / len(two_group_zoo)
    assert abs(mean_error - best["mean_rel_error"]) < 1e-3


def _stored_deltas(store: SubspaceStore) -> dict[str, dict[str, torch.Tensor]]:
    """Every task's deltas as the store holds them (B A from its factors), per slot."""
    return {name: {m: B @ A for m, (B, A) in store.task_factors(name).items()} for name in store.tasks}


def _assert_same_deltas(before: dict, after: dict) -> None:
    for name, slots in before.items():
        for module, dense in slots.items():
            torch.testing.assert_close(after[name][module], dense, atol=1e-6, rtol=0)


def _first_and_last(store: SubspaceStore) -> tuple[int, int]:
    """The zoo groups whose clusters come first and last in every slot's columns."""
    home = {int(name[1]): entry["cluster"] for name, entry in store.manifest["tasks"].items()}
    by_cluster = {c: g for g, c in home.items()}
    return by_cluster[0], by_cluster[1]


def test_add_grows_the_cluster_that_holds_the_task_best(
    tiny_bert: Path, clustered: Path, tmp_path: Path
) -> None:
    """A task whose outputs lie in the first cluster's subspace and whose inputs in a third one: `add` grows
    the first cluster's blocks, the second cluster's columns move along, and every older task reads back
    as before."""
    shutil.copytree(clustered, tmp_path / "store")
    store = SubspaceStore(tmp_path / "store")
    first, _ = _first_and_last(store)
    before = _stored_deltas(store)
    fresh = _group_lora(tiny_bert, tmp_path / "new" / "mixed", group=first, in_group=2, seed=50)
    result = CliRunner().invoke(main, ["add", str(store.path), str(fresh), "--max-rel-error", "0.05"])
    assert result.exit_code == 0, result.output
    assert "grew cluster 0's basis" in result.output and "projection alone" in result.output
    store = SubspaceStore(store.path)  # reopened: the manifest validator passes
    assert store.verify() == []
    entry = store.manifest["tasks"]["mixed"]
    assert entry["cluster"] == 0 and entry["rel_error"] <= 0.05 and entry["grown_from_rel_error"] > 0.3
    for module, meta in store.manifest["slots"].items():
        (o0, k0, i0, j0), (o1, k1, i1, j1) = meta["clusters"]
        assert (o0, i0) == (0, 0) and (k0, j0) >= (2, 2) and (o1, i1) == (k0, j0) and (k1, j1) == (2, 2)
        assert (meta["k_out"], meta["k_in"]) == (k0 + 2, j0 + 2), module
        assert entry["slots"][module]["k_out"] == k0 and entry["slots"][module]["o_out"] == 0
    assert j0 > 2  # the inputs came from the third subspace: the right bases grew
    _assert_same_deltas(before, _stored_deltas(store))
    out = store.reconstruct("mixed", tmp_path / "rebuilt")
    original, rebuilt = dense_deltas(fresh), dense_deltas(out)
    error = sum((rebuilt[m] - original[m]).norm() ** 2 for m in original) ** 0.5
    assert error / sum(d.norm() ** 2 for d in original.values()) ** 0.5 <= 0.05
    torch.testing.assert_close(
        peft_logits(tiny_bert, out), peft_logits(tiny_bert, fresh), atol=1e-2, rtol=1e-2
    )


def test_add_many_grows_different_clusters_in_one_write(
    tiny_bert: Path, two_group_zoo: list[Path], clustered: Path, tmp_path: Path
) -> None:
    """Two tasks in one batch, each held by a different cluster on one side only: each grows its own
    cluster; the merge of every task is the sum of the deltas the store holds; older tasks are untouched."""
    shutil.copytree(clustered, tmp_path / "store")
    store = SubspaceStore(tmp_path / "store")
    first, last = _first_and_last(store)
    before = _stored_deltas(store)
    new = [
        _group_lora(tiny_bert, tmp_path / "new" / "a", group=first, in_group=2, seed=51),
        _group_lora(tiny_bert, tmp_path / "new" / "b", group=last, in_group=3, seed=52),
    ]
    result = CliRunner().invoke(
        main, ["add-many", str(store.path), *map(str, new), "--policy", "auto", "--max-rel-error", "0.05"]
    )
    assert result.exit_code == 0, result.output
    assert "grew cluster 0's basis" in result.output and "grew cluster 1's basis" in result.output
    store = SubspaceStore(store.path)
    assert store.verify() == [] and store.manifest["basis_file"] == "basis-1.safetensors"
    assert not (store.path / "basis.safetensors").exists()
    tasks = store.manifest["tasks"]
    assert (tasks["a"]["cluster"], tasks["b"]["cluster"]) == (0, 1)
    assert max(tasks["a"]["rel_error"], tasks["b"]["rel_error"]) <= 0.05
    for module, meta in store.manifest["slots"].items():
        (_, k0, _, j0), (o1, k1, i1, j1) = meta["clusters"]
        assert (o1, i1) == (k0, j0) and (meta["k_out"], meta["k_in"]) == (k0 + k1, j0 + j1), module
        for name, entry in tasks.items():  # the first task's core, encoded before the second grew, fits
            stats = entry["slots"][module]
            assert stats["o_out"] + stats["k_out"] <= meta["k_out"], (name, module)
    stored = _stored_deltas(store)
    _assert_same_deltas(before, stored)
    for adapter in new:
        original = dense_deltas(adapter)
        error = sum((stored[adapter.name][m] - original[m]).norm() ** 2 for m in original) ** 0.5
        assert error / sum(d.norm() ** 2 for d in original.values()) ** 0.5 <= 0.05
    names = store.tasks
    listed = "\n".join(f"  - name: {n}" for n in names)
    recipe = write_recipe(
        tmp_path / "merge.yaml", f"store: {store.path}\nmerge_method: task_arithmetic\ntasks:\n{listed}\n"
    )
    result = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = dense_deltas(tmp_path / "merged" / names[0])
    for module, dense in merged.items():
        expected = sum(stored[n][module] for n in names if module in stored[n])
        torch.testing.assert_close(dense, expected.to(dense.dtype), atol=1e-4, rtol=1e-4)


def test_a_cluster_new_to_a_slot_gets_a_block_there(tiny_bert: Path, tmp_path: Path) -> None:
    """A cluster whose tasks adapt only the query slots has no columns in the value slots; a task of its
    group that adapts the value slots too makes it a new block at the end of the value slots' columns. (Two
    tasks, one per cluster: the split is then certain.)"""
    zoo = tmp_path / "zoo"
    adapters = [
        _group_lora(tiny_bert, zoo / "g0-0", group=0, seed=0),
        _group_lora(tiny_bert, zoo / "g1-0", group=1, seed=1, targets=("query",)),
    ]
    store = SubspaceStore(_compress(tmp_path, tiny_bert, adapters, "  k: 2\n  clusters: 2", "partial"))
    query_only = store.manifest["tasks"]["g1-0"]["cluster"]
    value_slots = [m for m in store.slots if "value" in m]
    assert all(store.manifest["slots"][m]["clusters"][query_only] is None for m in value_slots)
    before = _stored_deltas(store)
    fresh = _group_lora(tiny_bert, tmp_path / "new" / "g1-both", group=1, seed=60)
    result = CliRunner().invoke(main, ["add", str(store.path), str(fresh), "--policy", "project"])
    assert result.exit_code == 2 and "--policy auto" in result.output, result.output  # the other cluster
    result = CliRunner().invoke(main, ["add", str(store.path), str(fresh), "--max-rel-error", "0.05"])
    assert result.exit_code == 0, result.output
    assert f"grew cluster {query_only}'s basis" in result.output
    store = SubspaceStore(store.path)
    assert store.verify() == [] and store.manifest["tasks"]["g1-both"]["cluster"] == query_only
    for module in value_slots:
        meta = store.manifest["slots"][module]
        other = meta["clusters"][1 - query_only]
        o_out, k_out, o_in, k_in = meta["clusters"][query_only]
        assert (o_out, o_in) == (other[1], other[3]) and (o_out + k_out, o_in + k_in) == (
            meta["k_out"],
            meta["k_in"],
        )
    _assert_same_deltas(before, _stored_deltas(store))
    assert store.manifest["tasks"]["g1-both"]["rel_error"] <= 0.05


def test_project_policy_still_refuses_a_task_no_cluster_holds(
    tiny_bert: Path, clustered: Path, tmp_path: Path
) -> None:
    shutil.copytree(clustered, tmp_path / "store")
    snapshot = {p: p.read_bytes() for p in sorted((tmp_path / "store").rglob("*")) if p.is_file()}
    fresh = _group_lora(tiny_bert, tmp_path / "new" / "third", group=2, seed=70)
    for command in (["add", "--policy", "project"], ["add-many", "--policy", "project"]):
        result = CliRunner().invoke(main, [command[0], str(tmp_path / "store"), str(fresh), *command[1:]])
        assert result.exit_code == 2 and "would be stored with relative error" in result.output, result.output
        assert "nothing was written" in result.output and "Traceback" not in result.output
    assert {p: p.read_bytes() for p in sorted((tmp_path / "store").rglob("*")) if p.is_file()} == snapshot


def test_groups_that_adapt_different_slots_split_exactly(tiny_bert: Path, tmp_path: Path) -> None:
    """Three query/value tasks of one group and three query-only tasks of another: the start must group them
    by the directions they use (the cores as vectors are near-orthogonal within a group), and two clusters of
    k = 2 then hold every task exactly."""
    from mergekit_subspace.clusters import fit_clusters
    from mergekit_subspace.recipe import SubspaceSettings
    from mergekit_subspace.sources import lora_task

    adapters = [_group_lora(tiny_bert, tmp_path / f"g0-{i}", group=0, seed=i) for i in range(3)] + [
        _group_lora(tiny_bert, tmp_path / f"g1-{i}", group=1, seed=10 + i, targets=("query",))
        for i in range(3)
    ]
    fit = fit_clusters([lora_task(p) for p in adapters], SubspaceSettings(k=2), 2)
    groups = {c: {n.split("-")[0] for n, k in fit.labels.items() if k == c} for c in (0, 1)}
    assert sorted(map(sorted, groups.values())) == [["g0"], ["g1"]]
    assert fit.mean_error() < 1e-6
