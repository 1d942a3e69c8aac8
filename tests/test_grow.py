"""`add --policy project|grow|auto`: a new task is never stored above the guard, growth keeps older tasks."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner
from conftest import make_lora, peft_logits
from test_store import compress_zoo, dense_deltas

from mergekit_subspace.add_policy import DEFAULT_MAX_REL_ERROR
from mergekit_subspace.cli import main
from mergekit_subspace.grow import plan_growth, slot_growth
from mergekit_subspace.io.peft import read_lora_adapter
from mergekit_subspace.lowrank import LowRankDelta
from mergekit_subspace.subspace import SubspaceStore


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_slot_growth_is_exact_with_all_directions() -> None:
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(20, 3, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(16, 2, generator=gen, dtype=torch.float64))
    delta = LowRankDelta(B=torch.randn(20, 4, generator=gen), A=torch.randn(4, 16, generator=gen), scale=0.5)
    growth = slot_growth("m", U, V, delta)
    assert growth.limits == (4, 4)
    X, Y = growth.X, growth.Y
    torch.testing.assert_close(V.T @ Y, torch.zeros(2, 4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(U.T @ X, torch.zeros(3, 4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(X.T @ X, torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=0)
    assert abs(growth.captured(4, 4) - delta.norm_sq()) < 1e-9 * delta.norm_sq()
    assert growth.captured(0, 0) < growth.captured(2, 2) < growth.captured(4, 4)
    # the plan stops as soon as the target is met, and adds nothing when it already is
    plan = plan_growth({"m": growth}, target_rel_error=0.3, item_bytes=2)
    a, b = plan["m"]
    assert 1 - growth.captured(a, b) / delta.norm_sq() <= 0.3**2
    assert plan_growth({"m": growth}, target_rel_error=1.0, item_bytes=2) == {"m": (0, 0)}


def test_project_refuses_a_task_the_basis_cannot_hold(
    tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path
) -> None:
    store_path = compress_zoo(tmp_path, tiny_bert, bert_zoo[:3], "k: 2")
    fresh = make_lora(tiny_bert, tmp_path / "fresh", seed=77, r=4)
    before = _snapshot(store_path)
    result = CliRunner().invoke(main, ["add", str(store_path), str(fresh), "--policy", "project"])
    assert result.exit_code == 2, result.output
    assert "relative error" in result.output and f"max_rel_error {DEFAULT_MAX_REL_ERROR:g}" in result.output
    assert "Traceback" not in result.output
    assert _snapshot(store_path) == before
    for bad in (["--max-rel-error", "0"], ["--max-rel-error", "nan"], ["--policy", "sideways"]):
        result = CliRunner().invoke(main, ["add", str(store_path), str(fresh), *bad])
        assert result.exit_code == 2, result.output
        assert _snapshot(store_path) == before


def test_auto_grows_and_keeps_older_tasks(tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path) -> None:
    store_path = compress_zoo(tmp_path, tiny_bert, bert_zoo[:3], "k: 2")
    store = SubspaceStore(store_path)
    old_out = tmp_path / "old-before"
    store.reconstruct("task1", old_out)
    old_logits = peft_logits(tiny_bert, old_out)
    old_cores = store.cores("task1")
    fresh = make_lora(tiny_bert, tmp_path / "fresh", seed=77, r=4)

    result = CliRunner().invoke(main, ["add", str(store_path), str(fresh)])
    assert result.exit_code == 0, result.output
    assert "grew the basis by" in result.output and "projection alone" in result.output

    store = SubspaceStore(store_path)
    entry = store.manifest["tasks"]["fresh"]
    assert entry["rel_error"] <= 0.25 < entry["grown_from_rel_error"]
    assert store.manifest["basis_file"] == "basis-1.safetensors"
    assert not (store_path / "basis.safetensors").exists()
    assert store.verify() == []
    # older cores read as zero on the new directions; their PEFT folders are unchanged
    for module, core in store.cores("task1").items():
        k_out, k_in = old_cores[module].shape
        torch.testing.assert_close(core[:k_out, :k_in], old_cores[module])
        assert core[k_out:].abs().sum() == 0 and core[:, k_in:].abs().sum() == 0
    old_after = tmp_path / "old-after"
    store.reconstruct("task1", old_after)
    torch.testing.assert_close(peft_logits(tiny_bert, old_after), old_logits, atol=1e-5, rtol=1e-4)
    # the grown task reconstructs to within its reported error
    new_out = tmp_path / "fresh-out"
    store.reconstruct("fresh", new_out)
    source, rebuilt = dense_deltas(fresh), dense_deltas(new_out)
    err = sum(float((rebuilt[m] - source[m]).square().sum()) for m in source)
    norm = sum(float(source[m].square().sum()) for m in source)
    assert abs((err / norm) ** 0.5 - entry["rel_error"]) < 1e-3
    # growing again writes the next basis name and removes the one before
    second = make_lora(tiny_bert, tmp_path / "second", seed=78, r=3, targets=("query", "key", "value"))
    grown = store.add(second, policy="grow")
    assert grown["action"] == "grew" and store.manifest["basis_file"] == "basis-2.safetensors"
    assert sorted(p.name for p in store_path.glob("basis*")) == ["basis-2.safetensors"]
    assert store.manifest["tasks"]["fresh"]["rel_error"] == entry["rel_error"]
    reopened = SubspaceStore(store_path)
    assert reopened.manifest == store.manifest and reopened.verify() == []
    assert read_lora_adapter(new_out).slots  # the written folder is a real PEFT LoRA


def test_orphan_basis_is_reported_and_cleaned(tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path) -> None:
    """What a kill between writing a grown basis and the manifest leaves: the old store plus a stray basis."""
    store_path = compress_zoo(tmp_path, tiny_bert, bert_zoo[:3], "k: 2")
    stray = store_path / "basis-1.safetensors"
    stray.write_bytes((store_path / "basis.safetensors").read_bytes())
    store = SubspaceStore(store_path)
    assert any("basis the manifest does not name" in p for p in store.verify())
    store.add(bert_zoo[3], policy="project", max_rel_error=10.0)
    assert not stray.exists() and store.verify() == []


def test_refit_from_the_store_alone(tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path) -> None:
    store_path = compress_zoo(tmp_path, tiny_bert, bert_zoo[:3], "k: 2")
    store = SubspaceStore(store_path)
    for seed in (77, 78):
        store.add(make_lora(tiny_bert, tmp_path / f"fresh{seed}", seed=seed, r=4), policy="grow")
    grown_bytes = store.files.bytes_on_disk()
    before = {}
    for name in store.tasks:
        store.reconstruct(name, tmp_path / "before" / name)
        before[name] = peft_logits(tiny_bert, tmp_path / "before" / name)
    runner = CliRunner()
    snapshot = _snapshot(store_path)
    # bad input first: nothing changes
    bad_settings = tmp_path / "bad.yaml"
    bad_settings.write_text("subspace:\n  k: -3\n")
    for args in (
        ["--settings", str(bad_settings)],
        ["--add", str(bert_zoo[0])],  # task0 is in the store already
        ["--add", str(tmp_path / "missing")],
    ):
        result = runner.invoke(main, ["refit", str(store_path), *args])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert _snapshot(store_path) == snapshot
    # a refit wide enough to hold every stored delta gives back every task as it was stored
    wide = tmp_path / "wide.yaml"
    wide.write_text("subspace:\n  k: 64\n")
    result = runner.invoke(main, ["refit", str(store_path), "--settings", str(wide)])
    assert result.exit_code == 0, result.output
    assert "refit 5 tasks" in result.output
    store = SubspaceStore(store_path)
    assert store.verify() == [] and "basis_file" not in store.manifest
    assert not any(e["added_after_fit"] for e in store.manifest["tasks"].values())
    for name, logits in before.items():
        out = tmp_path / "after" / name
        store.reconstruct(name, out)
        torch.testing.assert_close(peft_logits(tiny_bert, out), logits, atol=2e-4, rtol=1e-3)
    assert store.manifest["settings"]["k"] == 64
    # back to k 2 with a new adapter fitted in: compact again, and the store's settings are kept next time
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text("k: 2\n")
    result = runner.invoke(
        main, ["refit", str(store_path), "--add", str(bert_zoo[3]), "--settings", str(narrow)]
    )
    assert result.exit_code == 0, result.output
    store = SubspaceStore(store_path)
    assert len(store.tasks) == 6 and store.files.bytes_on_disk() < grown_bytes
    assert {m["k_out"] for m in store.manifest["slots"].values()} == {2}
    result = runner.invoke(main, ["refit", str(store_path)])
    assert result.exit_code == 0, result.output
    assert {m["k_out"] for m in SubspaceStore(store_path).manifest["slots"].values()} == {2}
    assert store.manifest["tasks"]["task0"]["source"] == str(bert_zoo[0])


def test_add_many_refuses_a_batch_with_a_task_above_the_guard(
    tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path
) -> None:
    store_path = compress_zoo(tmp_path, tiny_bert, bert_zoo[:3], "k: 2")
    fresh = make_lora(tiny_bert, tmp_path / "new" / "fresh", seed=77, r=4)
    before = _snapshot(store_path)
    result = CliRunner().invoke(
        main,
        ["add-many", str(store_path), str(bert_zoo[0].parent / "task3"), str(fresh), "--policy", "project"],
    )
    assert result.exit_code == 2, result.output
    assert "would be stored with relative error" in result.output and "--policy auto" in result.output
    assert _snapshot(store_path) == before
