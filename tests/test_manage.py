"""Managing a store: list, rm, rename, add-many, reconstruct-all, export (CLI and library) on the tiny BERT zoo."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import make_lora, peft_logits
from safetensors.torch import load_file, save_file
from test_store import compress_zoo

from mergekit_subspace.cli import main
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.manage import hub_model_id
from mergekit_subspace.subspace import SubspaceStore


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args: str) -> str:
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result.output


def refused(*args: str, fragment: str) -> str:
    """Exit 2 with one line 'error: ...' naming the problem, no traceback."""
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file (hidden ones too) under a folder, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_intact(store_path: Path) -> SubspaceStore:
    assert ok("verify", store_path).startswith("ok:")
    return SubspaceStore(store_path)


@pytest.fixture
def store_path(tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path) -> Path:
    """task0..task3 compressed (k 64: exact), task4 added after the fit by projection (basis unchanged)."""
    path = compress_zoo(tmp_path / "s", tiny_bert, bert_zoo[:4])
    ok("add", path, bert_zoo[4], "--policy", "project", "--max-rel-error", "1")
    return path


def test_help_of_each_command() -> None:
    for command, words in {
        "list": ["--json", "kind"],
        "rm": ["NAMES", "basis is unchanged", "atomic"],
        "rename": ["OLD", "NEW", "Atomic"],
        "add-many": ["ADAPTERS", "globs", "nothing is written"],
        "reconstruct-all": ["--out", "--match", "--overwrite", "OUT/<task>/"],
        "export": ["--out", "README.md", "base_model", "sha256"],
    }.items():
        text = " ".join(ok(command, "--help").split())
        for word in words:
            assert word in text, (command, word)
        assert command in ok("--help")


def test_list(store_path: Path, bert_zoo: list[Path]) -> None:
    rows = json.loads(ok("list", store_path, "--json"))
    assert [r["name"] for r in rows] == [f"task{i}" for i in range(5)]
    for row in rows:
        assert set(row) == {"name", "kind", "source", "rel_error", "added_after_fit", "bytes"}
        assert row["kind"] == "lora"
        assert (row["rel_error"] > 0.01) if row["name"] == "task4" else (row["rel_error"] < 1e-5)
        assert row["bytes"] == (store_path / "tasks" / f"{row['name']}.safetensors").stat().st_size
        assert row["source"] == str(bert_zoo[int(row["name"][-1])])
        assert row["added_after_fit"] == (row["name"] == "task4")
    text = ok("list", store_path).splitlines()
    assert text[0].split() == ["task", "kind", "rel_error", "added", "bytes", "source"]
    assert len(text) == 2 + 5 and text[-1].split()[:4] == [
        "task4",
        "lora",
        f"{rows[-1]['rel_error']:.4f}",
        "yes",
    ]
    refused("list", store_path.parent / "nope", fragment="store folder not found")


def test_rm(store_path: Path, tiny_bert: Path, tmp_path: Path) -> None:
    kept_before = SubspaceStore(store_path).reconstruct("task0", tmp_path / "before")
    basis = (store_path / "basis.safetensors").read_bytes()
    assert "removed 2 task(s)" in ok("rm", store_path, "task2", "task4")
    store = assert_intact(store_path)
    assert store.tasks == ["task0", "task1", "task3"]
    assert sorted(p.name for p in (store_path / "tasks").iterdir()) == [
        f"task{i}.safetensors" for i in (0, 1, 3)
    ]
    assert (store_path / "basis.safetensors").read_bytes() == basis
    key_slot = store.manifest["slots"]["bert.encoder.layer.0.attention.self.key"]
    assert key_slot["tasks"] == []  # only task2 touched it; the slot and its basis stay
    assert all(
        "task2" not in m["tasks"] and "task4" not in m["tasks"] for m in store.manifest["slots"].values()
    )
    assert store.info()["tasks"] == store.tasks
    kept = store.reconstruct("task0", tmp_path / "after")
    assert (kept / "adapter_model.safetensors").read_bytes() == (
        kept_before / "adapter_model.safetensors"
    ).read_bytes()
    torch.testing.assert_close(peft_logits(tiny_bert, kept), peft_logits(tiny_bert, kept_before))

    before = snapshot(store_path)
    refused("rm", store_path, "task0", "ghost", fragment="has no task 'ghost'")
    refused("rm", store_path, "task0", "task1", "task3", fragment="delete the store folder instead")
    assert run("rm", store_path).exit_code == 2  # no names: click's usage error
    assert snapshot(store_path) == before

    # the state a crash between the manifest write and the deletes leaves: the new store, which opens, and
    # the old task file, which verify reports as an orphan
    stale = (store_path / "tasks" / "task1.safetensors").read_bytes()
    SubspaceStore(store_path).remove("task1")
    (store_path / "tasks" / "task1.safetensors").write_bytes(stale)
    assert SubspaceStore(store_path).tasks == ["task0", "task3"]
    result = run("verify", store_path)
    assert result.exit_code == 1
    assert [line.split(": ")[0] for line in result.output.splitlines()] == [
        f"FAIL {store_path / 'tasks' / 'task1.safetensors'}"
    ]
    assert "orphan" in result.output
    ok("rename", store_path, "task3", "task3b")  # the next writer removes it, as add does
    assert_intact(store_path)


def test_rename(store_path: Path, tmp_path: Path) -> None:
    old = SubspaceStore(store_path)
    cores = old.cores("task1")
    entry = old.manifest["tasks"]["task1"]
    assert "renamed 'task1' to 'legal-v2'" in ok("rename", store_path, "task1", "legal-v2")
    store = assert_intact(store_path)
    assert store.tasks == ["legal-v2", "task0", "task2", "task3", "task4"]
    assert not (store_path / "tasks" / "task1.safetensors").exists()
    for module, core in store.cores("legal-v2").items():
        torch.testing.assert_close(core, cores[module])
    renamed = store.manifest["tasks"]["legal-v2"]
    assert renamed["file"] == "tasks/legal-v2.safetensors"
    assert {k: v for k, v in renamed.items() if k != "file"} == {
        k: v for k, v in entry.items() if k != "file"
    }
    assert "legal-v2" in store.manifest["slots"]["bert.encoder.layer.0.attention.self.query"]["tasks"]
    assert store.manifest == SubspaceStore(store_path).manifest
    store.reconstruct("legal-v2", tmp_path / "rebuilt")

    before = snapshot(store_path)
    refused("rename", store_path, "task0", "../evil", fragment="not a plain file name")
    refused("rename", store_path, "task0", "task2", fragment="already in the store")
    refused("rename", store_path, "ghost", "x", fragment="has no task 'ghost'")
    refused("rename", store_path, "task0", "task0", fragment="already has that name")
    assert snapshot(store_path) == before
    damaged = store_path / "tasks" / "task0.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\x00")
    refused("rename", store_path, "task0", "fresh", fragment="altered")
    assert not (store_path / "tasks" / "fresh.safetensors").exists()


def test_add_many_equals_add_one_by_one(tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path) -> None:
    batch = compress_zoo(tmp_path / "s", tiny_bert, bert_zoo[1:3])  # task2 has the key slots
    single = tmp_path / "single"
    shutil.copytree(batch, single)
    zoo = bert_zoo[0].parent
    output = ok("add-many", batch, zoo / "task[03]", zoo / "task4", "--max-rel-error", "1")
    assert "3 task(s) added" in output and "added 'task3'" in output
    for adapter in (bert_zoo[0], bert_zoo[3], bert_zoo[4]):
        ok("add", single, adapter, "--policy", "project", "--max-rel-error", "1")
    store = assert_intact(batch)
    assert store.tasks == [f"task{i}" for i in range(5)]
    assert snapshot(batch) == snapshot(single)  # the same task files and the same manifest, byte for byte
    assert all(store.manifest["tasks"][f"task{i}"]["added_after_fit"] for i in (0, 3, 4))


def test_add_many_bad_batch_writes_nothing(tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path) -> None:
    store_path = compress_zoo(tmp_path / "s", tiny_bert, bert_zoo[1:3])
    zoo = bert_zoo[0].parent
    # non-finite weights are only met while projecting, after good adapters of the batch were staged
    poisoned = tmp_path / "bad" / "zz-nan"
    shutil.copytree(bert_zoo[3], poisoned)
    weights = load_file(poisoned / "adapter_model.safetensors")
    key = sorted(k for k in weights if "lora_A" in k)[-1]
    weights[key][0, 0] = float("nan")
    save_file(weights, poisoned / "adapter_model.safetensors")
    wrong_shape = make_lora(tiny_bert, tmp_path / "bad" / "wide", seed=7, targets=("intermediate.dense",))
    before = snapshot(store_path)
    refused(
        "add-many",
        store_path,
        zoo / "task[034]",
        poisoned,
        "--max-rel-error",
        "1",
        fragment="contains NaN or Inf",
    )
    refused("add-many", store_path, zoo / "task3", zoo / "task[03]", fragment="two tasks are named 'task3'")
    refused("add-many", store_path, zoo / "task0", zoo / "task1", fragment="'task1' is already in the store")
    refused("add-many", store_path, zoo / "task0", wrong_shape, fragment="intermediate.dense")
    refused("add-many", store_path, zoo / "task0", tmp_path / "missing", fragment="adapter folder not found")
    refused("add-many", store_path, zoo / "nothing-*", fragment="matched no folder")
    assert snapshot(store_path) == before
    assert_intact(store_path)


def test_reconstruct_all(store_path: Path, tmp_path: Path) -> None:
    store = SubspaceStore(store_path)
    out = tmp_path / "all"
    assert "wrote 5 PEFT folder(s)" in ok("reconstruct-all", store_path, "--out", out)
    assert sorted(p.name for p in out.iterdir()) == store.tasks
    for name in store.tasks:
        single = store.reconstruct(name, tmp_path / "single" / name)
        assert snapshot(out / name) == snapshot(single)
    picked = tmp_path / "picked"
    ok("reconstruct-all", store_path, "--out", picked, "--match", "task[01]", "--match", "*4")
    assert sorted(p.name for p in picked.iterdir()) == ["task0", "task1", "task4"]

    (picked / "task1" / "adapter_config.json").write_text("{}")
    before = snapshot(picked)
    refused("reconstruct-all", store_path, "--out", picked, fragment="already holds task0, task1, task4")
    assert snapshot(picked) == before
    ok("reconstruct-all", store_path, "--out", picked, "--match", "task1", "--overwrite")
    assert snapshot(picked / "task1") == snapshot(out / "task1")
    refused(
        "reconstruct-all", store_path, "--out", tmp_path / "none", "--match", "x*", fragment="no task matches"
    )
    assert not (tmp_path / "none").exists()
    refused("reconstruct-all", store_path, "--out", store_path / "rebuilt", fragment="lies inside an input")
    assert not (store_path / "rebuilt").exists()


def test_export_loads_in_peft_with_a_model_card(store_path: Path, tiny_bert: Path, tmp_path: Path) -> None:
    store = SubspaceStore(store_path)
    out = tmp_path / "export" / "task3"
    assert "wrote" in ok("export", store_path, "task3", "--out", out)
    rebuilt = store.reconstruct("task3", tmp_path / "rebuilt")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    files = snapshot(out)
    card = files.pop("README.md").decode()
    assert files == snapshot(rebuilt)  # exactly what reconstruct writes, plus the card
    torch.testing.assert_close(peft_logits(tiny_bert, out), peft_logits(tiny_bert, rebuilt), atol=0, rtol=0)

    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta == {"library_name": "peft", "tags": ["lora", "mergekit-subspace"]}  # a local base: no hub id
    entry = store.manifest["tasks"]["task3"]
    for fact in (
        str(tiny_bert),
        "set `base_model:` above",
        entry["source"],
        entry["source_sha256"],
        f"{entry['rel_error']:.6f}",
        str(store_path),
        "mergekit-subspace/2",
        f"mergekit-subspace export {store_path} task3 --out {out}",
        "| k_out | k_in | slots |",
        "PeftModel.from_pretrained",
    ):
        assert fact in body, fact
    assert len(entry["source_sha256"]) == 64

    hub = tmp_path / "export" / "hub"
    ok("export", store_path, "task3", "--out", hub, "--base-model-id", "acme/tiny-bert")
    meta = yaml.safe_load((hub / "README.md").read_text().split("---\n")[1])
    assert meta["base_model"] == "acme/tiny-bert" and meta["library_name"] == "peft"

    before = snapshot(out)
    refused("export", store_path, "task3", "--out", out, fragment="already exists")
    refused("export", store_path, "ghost", "--out", tmp_path / "g", fragment="has no task 'ghost'")
    refused(
        "export",
        store_path,
        "task3",
        "--out",
        tmp_path / "g",
        "--base-model-id",
        "a/b/c",
        fragment="hub model id",
    )
    assert snapshot(out) == before and not (tmp_path / "g").exists()
    refused(
        "export", store_path, "task3", "--out", store_path / "tasks" / "x", fragment="lies inside an input"
    )
    ok("export", store_path, "task0", "--out", out, "--overwrite")
    assert "# task0" in (out / "README.md").read_text()


def test_hub_model_id(tmp_path: Path) -> None:
    snapshot_dir = (
        tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots" / "abc123"
    )
    snapshot_dir.mkdir(parents=True)
    assert hub_model_id(str(snapshot_dir)) == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_model_id("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert hub_model_id(str(tmp_path)) is None
    assert hub_model_id(None) is None


def test_add_many_refuses_a_store_changed_meanwhile(
    tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer between the start of add-many and its manifest write: the batch is refused whole, the
    other writer's change stays, and no staged file is left."""
    import mergekit_subspace.manage as manage

    store_path = compress_zoo(tmp_path / "s", tiny_bert, bert_zoo[1:3])
    real = manage.encode_on_cluster
    calls = []

    def meddling(*args, **kwargs):
        if not calls:
            SubspaceStore(store_path).rename("task1", "other")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(manage, "encode_on_cluster", meddling)
    with pytest.raises(SubspaceError, match="changed while this ran"):
        SubspaceStore(store_path).add_many([bert_zoo[0], bert_zoo[3]], progress=False, max_rel_error=1.0)
    store = assert_intact(store_path)
    assert store.tasks == ["other", "task2"]
    assert sorted(p.name for p in store_path.iterdir()) == ["basis.safetensors", "manifest.json", "tasks"]


def test_an_open_store_keeps_working_after_changes(store_path: Path, bert_zoo: list[Path]) -> None:
    store = SubspaceStore(store_path)
    store.remove("task4")
    store.rename("task3", "renamed")
    assert store.manifest == SubspaceStore(store_path).manifest
    store.add(bert_zoo[4])  # the same object, after rm and rename
    store.add_many([bert_zoo[3]], progress=False)
    assert store.tasks == ["renamed", "task0", "task1", "task2", "task3", "task4"]
    assert store.manifest == SubspaceStore(store_path).manifest
    assert_intact(store_path)
