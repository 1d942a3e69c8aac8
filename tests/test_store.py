"""Compress / add / reconstruct / info / verify on tiny models with real-format PEFT adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_lora, peft_logits, write_recipe

from mergekit_subspace.cli import main
from mergekit_subspace.io.peft import read_lora_adapter
from mergekit_subspace.subspace import SubspaceStore


def compress_zoo(tmp_path: Path, base: Path, adapters: list[Path], extra: str = "k: 64") -> Path:
    listed = "\n".join(f"  - {p}" for p in adapters)
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        f"base_model: {base}\nadapters:\n{listed}\nsubspace:\n  {extra}\noutput: {tmp_path / 'store'}\n",
    )
    result = CliRunner().invoke(main, ["compress", str(recipe)])
    assert result.exit_code == 0, result.output
    return tmp_path / "store"


def dense_deltas(folder: Path) -> dict[str, torch.Tensor]:
    adapter = read_lora_adapter(folder)
    return {module: delta.to_dense() for module, delta in adapter.slots.items()}


def test_exact_reconstruction_and_same_logits(tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path) -> None:
    """With k >= each slot's total rank the written PEFT folder gives the original deltas and logits."""
    store = SubspaceStore(compress_zoo(tmp_path, tiny_bert, bert_zoo))
    assert store.tasks == sorted(p.name for p in bert_zoo)
    for adapter in bert_zoo:
        out = store.reconstruct(adapter.name, tmp_path / "rebuilt" / adapter.name)
        original, rebuilt = dense_deltas(adapter), dense_deltas(out)
        assert original.keys() == rebuilt.keys()
        for module in original:
            torch.testing.assert_close(rebuilt[module], original[module], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            peft_logits(tiny_bert, out), peft_logits(tiny_bert, adapter), atol=1e-5, rtol=1e-5
        )
        assert store.info()["per_task"][adapter.name]["rel_error"] < 1e-5
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(tiny_bert)
        assert "classifier" in config["modules_to_save"]


def test_rank_pattern_and_rslora_scales_are_read(bert_zoo: list[Path]) -> None:
    rslora = read_lora_adapter(bert_zoo[1])
    assert all(abs(d.scale - 16 / 2**0.5) < 1e-12 for d in rslora.slots.values())
    patterned = read_lora_adapter(bert_zoo[3])
    value1 = patterned.slots["bert.encoder.layer.1.attention.self.value"]
    assert value1.rank == 2 and value1.scale == 4 / 2
    query0 = patterned.slots["bert.encoder.layer.0.attention.self.query"]
    assert query0.scale == 32 / 4


def test_slots_only_from_adapters_that_touch_them(
    tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path
) -> None:
    store = SubspaceStore(compress_zoo(tmp_path, tiny_bert, bert_zoo))
    key_slot = store.manifest["slots"]["bert.encoder.layer.0.attention.self.key"]
    assert key_slot["tasks"] == ["task2"]
    assert key_slot["k_out"] == 8 and key_slot["k_capped"]
    assert sorted(store.cores("task4")) == [
        "bert.encoder.layer.0.attention.self.value",
        "bert.encoder.layer.1.attention.self.value",
    ]


def test_truncated_store_is_smaller_and_reports_error(
    tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path
) -> None:
    exact = SubspaceStore(compress_zoo(tmp_path / "a", tiny_bert, bert_zoo, "k: 64"))
    small = SubspaceStore(compress_zoo(tmp_path / "b", tiny_bert, bert_zoo, "k: 2"))
    assert small.info()["bytes"]["store"] < exact.info()["bytes"]["store"]
    errors = [t["rel_error"] for t in small.info()["per_task"].values()]
    assert all(0 < e < 1 for e in errors)
    # the reported error is the error of the written adapter
    out = small.reconstruct("task0", tmp_path / "t0")
    original, rebuilt = dense_deltas(bert_zoo[0]), dense_deltas(out)
    num = sum(float(((original[m] - rebuilt[m]) ** 2).sum()) for m in original)
    den = sum(float((original[m] ** 2).sum()) for m in original)
    assert abs((num / den) ** 0.5 - small.info()["per_task"]["task0"]["rel_error"]) < 1e-4


def test_energy_budget(tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path) -> None:
    store = SubspaceStore(compress_zoo(tmp_path, tiny_bert, bert_zoo, "energy: 0.9"))
    for slot in store.manifest["slots"].values():
        assert slot["captured_energy"] >= 0.9 - 1e-9 or slot["k_capped"]


def test_llama_style_and_different_target_sets(tiny_llama: Path, tmp_path: Path) -> None:
    zoo = [
        make_lora(tiny_llama, tmp_path / "z" / "qv", seed=1, targets=("q_proj", "v_proj")),
        make_lora(
            tiny_llama,
            tmp_path / "z" / "all",
            seed=2,
            r=2,
            targets=("q_proj", "k_proj", "o_proj", "down_proj"),
        ),
    ]
    store = SubspaceStore(compress_zoo(tmp_path, tiny_llama, zoo))
    for adapter in zoo:
        out = store.reconstruct(adapter.name, tmp_path / "out" / adapter.name)
        torch.testing.assert_close(
            peft_logits(tiny_llama, out), peft_logits(tiny_llama, adapter), atol=1e-5, rtol=1e-5
        )


def test_fan_in_fan_out_gpt2(tiny_gpt2: Path, tmp_path: Path) -> None:
    zoo = [
        make_lora(tiny_gpt2, tmp_path / "z" / f"g{i}", seed=i, targets=("c_attn",), fan_in_fan_out=True)
        for i in range(2)
    ]
    store = SubspaceStore(compress_zoo(tmp_path, tiny_gpt2, zoo))
    out = store.reconstruct("g1", tmp_path / "g1")
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    torch.testing.assert_close(
        peft_logits(tiny_gpt2, out), peft_logits(tiny_gpt2, zoo[1]), atol=1e-5, rtol=1e-5
    )


def test_deterministic_bytes(tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path) -> None:
    first = compress_zoo(tmp_path / "a", tiny_bert, bert_zoo, "k: 3")
    second = compress_zoo(tmp_path / "b", tiny_bert, bert_zoo, "k: 3")
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for rel in files:
        if rel.name == "manifest.json":  # holds the output path only through sources, which are equal here
            continue
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    manifest_a = json.loads((first / "manifest.json").read_text())
    manifest_b = json.loads((second / "manifest.json").read_text())
    assert manifest_a == manifest_b


def test_add_projects_without_refitting(tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path) -> None:
    store_path = compress_zoo(tmp_path, tiny_bert, bert_zoo[:4])
    basis_before = (store_path / "basis.safetensors").read_bytes()
    result = CliRunner().invoke(main, ["add", str(store_path), str(bert_zoo[0]), "--name", "again"])
    assert result.exit_code == 0, result.output
    store = SubspaceStore(store_path)
    assert "again" in store.tasks and (store_path / "basis.safetensors").read_bytes() == basis_before
    assert store.info()["per_task"]["again"]["rel_error"] < 1e-5  # its deltas are in the basis already
    for module, core in store.cores("again").items():
        torch.testing.assert_close(core, store.cores("task0")[module])
    assert store.verify() == []
    # a new adapter outside the span is stored with an honest, non-zero error
    fresh = make_lora(tiny_bert, tmp_path / "fresh", seed=99, r=2)
    entry = store.add(fresh)
    assert entry["rel_error"] > 0.01 and entry["added_after_fit"]
    # the open store sees the new task exactly as a reopened one does
    assert store.manifest == SubspaceStore(store_path).manifest
    assert "fresh" in store.manifest["slots"]["bert.encoder.layer.0.attention.self.query"]["tasks"]


def test_info_json_keys(tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path) -> None:
    store_path = compress_zoo(tmp_path, tiny_bert, bert_zoo, "k: 2")
    result = CliRunner().invoke(main, ["info", str(store_path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["tasks"] == sorted(p.name for p in bert_zoo)
    assert set(data["bytes"]) >= {"store", "sources"}
    assert data["ratio"] == pytest.approx(data["bytes"]["sources"] / data["bytes"]["store"])
    assert data["bytes"]["sources"] == sum(
        (p / f).stat().st_size for p in bert_zoo for f in ("adapter_config.json", "adapter_model.safetensors")
    )
    assert set(data["per_task"]) == set(data["tasks"])
    assert all(isinstance(v["rel_error"], float) for v in data["per_task"].values())
    text = CliRunner().invoke(main, ["info", str(store_path)])
    assert "rel_error" in text.output and "ratio" in text.output


def test_verify_names_missing_and_altered_files(
    tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path
) -> None:
    store_path = compress_zoo(tmp_path, tiny_bert, bert_zoo)
    runner = CliRunner()
    assert runner.invoke(main, ["verify", str(store_path)]).exit_code == 0
    task = store_path / "tasks" / "task1.safetensors"
    data = bytearray(task.read_bytes())
    data[-1] ^= 0xFF
    task.write_bytes(bytes(data))
    (store_path / "tasks" / "task2.safetensors").unlink()
    result = runner.invoke(main, ["verify", str(store_path)])
    assert result.exit_code == 1
    assert "task1.safetensors: altered" in result.output and "task2.safetensors: missing" in result.output


def test_python_api_round_trip(tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path) -> None:
    from mergekit_subspace.recipe import CompressRecipe

    recipe = CompressRecipe(
        base_model=str(tiny_bert), adapters=[str(p) for p in bert_zoo], subspace={"k": 64}
    )
    store = SubspaceStore.compress(recipe, out=tmp_path / "api", progress=False)
    cores = store.project(bert_zoo[2])
    for module, core in cores.items():
        torch.testing.assert_close(core.to(torch.float32), store.cores("task2")[module], atol=1e-6, rtol=1e-5)


def test_lora_bias_keeps_its_scale(tiny_bert: Path, tmp_path: Path) -> None:
    """PEFT scales lora_B.bias by alpha / r; the rebuilt adapter (scale 1) must carry that scale."""
    zoo = [
        make_lora(tiny_bert, tmp_path / "z" / f"b{i}", seed=i, r=2, alpha=8, lora_bias=True) for i in range(2)
    ]
    store = SubspaceStore(compress_zoo(tmp_path, tiny_bert, zoo))
    out = store.reconstruct("b1", tmp_path / "b1")
    torch.testing.assert_close(
        peft_logits(tiny_bert, out), peft_logits(tiny_bert, zoo[1]), atol=1e-5, rtol=1e-5
    )


def test_overwrite_names_the_added_tasks_it_drops(
    tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path
) -> None:
    store_path = compress_zoo(tmp_path, tiny_bert, bert_zoo[:3])
    SubspaceStore(store_path).add(bert_zoo[3])
    result = CliRunner().invoke(main, ["compress", str(tmp_path / "recipe.yaml"), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "added after its fit" in result.output and "dropped: task3" in result.output
    assert SubspaceStore(store_path).tasks == ["task0", "task1", "task2"]
    again = CliRunner().invoke(main, ["compress", str(tmp_path / "recipe.yaml"), "--overwrite"])
    assert again.exit_code == 0 and "dropped" not in again.output  # nothing added since: nothing to say
