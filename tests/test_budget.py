"""subspace.budget_bytes: k per slot chosen under one byte budget for the whole store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import peft_logits
from test_store import compress_zoo

from mergekit_subspace.budget import core_numbers
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.fit import SubspaceBasis
from mergekit_subspace.lowrank import LowRankDelta
from mergekit_subspace.recipe import SubspaceSettings
from mergekit_subspace.sources import delta_task
from mergekit_subspace.subspace import SubspaceStore


def _deltas(count: int, rank: int, m: int = 64, seed: int = 0) -> list[LowRankDelta]:
    gen = torch.Generator().manual_seed(seed)
    return [
        LowRankDelta(torch.randn(m, rank, generator=gen), torch.randn(rank, m, generator=gen))
        for _ in range(count)
    ]


def _sizes(slots: dict[str, list[LowRankDelta]], budget_numbers: int, **settings: object) -> dict:
    """(k_out, k_in) per slot that the fit chooses under a float32 budget of `budget_numbers` numbers."""
    tasks = [
        delta_task(f"t{i}", {m: deltas[i] for m, deltas in slots.items() if i < len(deltas)})
        for i in range(max(len(d) for d in slots.values()))
    ]
    return SubspaceBasis(budget_bytes=4 * budget_numbers, **settings).fit(tasks).k_


def test_budget_goes_where_energy_is_left_and_is_never_exceeded() -> None:
    slots = {"busy": _deltas(8, 4, seed=1), "done": _deltas(1, 2, seed=2)}
    budget = 6000
    sizes = _sizes(slots, budget, k=64)
    assert sizes["done"] == (2, 2)  # its whole rank fits in k = 2: more would buy nothing
    assert sizes["busy"][0] > 8
    spent = sum(
        ko * 64 + ki * 64 + sum(core_numbers(ko, ki, d.rank) for d in slots[m])
        for m, (ko, ki) in sizes.items()
    )
    assert spent <= budget
    # a bigger budget never gives a slot less
    more = _sizes(slots, 2 * budget, k=64)
    assert all(more[m][0] >= sizes[m][0] for m in slots)


def test_k_in_stays_fixed_when_given() -> None:
    sizes = _sizes({"s": _deltas(6, 4)}, 100_000, k=32, k_in=8)
    assert sizes["s"] == (24, 8)  # k_out capped by the slot's total rank (24), k_in as asked


def test_randomized_solver_sizes_slots_too() -> None:
    """The budget reads its curves off whichever solver fits the slot."""
    slots = {"busy": _deltas(40, 4, seed=3), "done": _deltas(2, 2, seed=4)}
    exact = _sizes(slots, 9000, k=48, solver="exact")
    randomized = _sizes(slots, 9000, k=48, solver="randomized", oversample=16)
    assert randomized["done"] == exact["done"] == (4, 4)
    assert abs(randomized["busy"][0] - exact["busy"][0]) <= 4  # one step of the greedy at most


def test_budgeted_store_fits_and_reconstructs(tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path) -> None:
    budget = 6000  # bytes of float32 numbers: 1500 numbers for every basis and core
    store = SubspaceStore(compress_zoo(tmp_path, tiny_bert, bert_zoo, f"k: 32\n  budget_bytes: {budget}"))
    assert store.stored_numbers() * 4 <= budget
    ks = {m: s["k_out"] for m, s in store.info()["slots"].items()}
    assert len(set(ks.values())) > 1  # slots got different k
    out = store.reconstruct("task0", tmp_path / "t0")
    assert peft_logits(tiny_bert, out).shape == peft_logits(tiny_bert, bert_zoo[0]).shape
    assert 0 < store.info()["per_task"]["task0"]["rel_error"] < 1


def test_too_small_budget_names_the_smallest_store(
    tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path
) -> None:
    from mergekit_subspace.recipe import CompressRecipe

    recipe = CompressRecipe(
        base_model=str(tiny_bert), adapters=[str(p) for p in bert_zoo], subspace={"budget_bytes": 100}
    )
    with pytest.raises(SubspaceError, match="too small: the smallest store"):
        SubspaceStore.compress(recipe, out=tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_budget_and_energy_do_not_mix() -> None:
    with pytest.raises(ValueError, match="budget_bytes or subspace.energy"):
        SubspaceSettings(energy=0.9, budget_bytes=1000)
    assert SubspaceSettings(budget_bytes=1000).k == 128  # k is then only the per-slot upper bound


def test_unknown_budget_key_is_a_clear_recipe_error(
    tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path
) -> None:
    with pytest.raises(SubspaceError):
        from mergekit_subspace.recipe import parse_compress_recipe

        recipe = tmp_path / "r.yaml"
        recipe.write_text(
            f"base_model: {tiny_bert}\nadapters: [{bert_zoo[0]}]\nsubspace: {{budget_bytes: -5}}\n"
        )
        parse_compress_recipe(recipe)
