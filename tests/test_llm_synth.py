"""The synthetic LLM-shaped zoo (benchmarks/zoos/llm_synth.py) and the measuring parts of llm_scale_bench."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import llm_scale_bench as bench
from benchmarks.zoos.llm_synth import CONFIG, WEIGHTS, LlmSynthSpec, build_llm_zoo
from mergekit_subspace.io.peft import read_lora_adapter

SPEC = LlmSynthSpec(layers=1, hidden=64)  # k/v out 16: the Mistral-7B ratio at a tiny width


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory):
    return build_llm_zoo(tmp_path_factory.mktemp("llm-synth"), 3, SPEC, progress=False)


def test_defaults_are_mistral_shapes() -> None:
    spec = LlmSynthSpec()
    assert (spec.layers, spec.hidden, spec.out_kv, spec.rank, spec.alpha) == (8, 4096, 1024, 16, 32)
    assert len(spec.modules()) == 32
    assert spec.tensor_bytes() == 8 * 2 * 16 * (4 * 4096 + 2 * 4096 + 2 * 1024)


def test_peft_reader_reads_the_zoo(zoo) -> None:
    assert [p.name for p in zoo.paths] == ["task-00000", "task-00001", "task-00002"]
    assert (zoo.built, zoo.reused) == (3, 0)
    for path in zoo.paths:
        adapter = read_lora_adapter(path)
        assert adapter.dtype == "bfloat16"
        prefix = "model.layers.0.self_attn."
        assert sorted(adapter.slots) == sorted(prefix + m for m in ("q_proj", "k_proj", "v_proj", "o_proj"))
        for module, delta in adapter.slots.items():
            out = 16 if module.endswith(("k_proj", "v_proj")) else 64
            assert tuple(delta.B.shape) == (out, 16) and tuple(delta.A.shape) == (16, 64)
            assert delta.scale == pytest.approx(32 / 16)
            assert delta.A.abs().max() <= 1 / 8 + 1e-3  # kaiming-uniform bound 1/sqrt(64)
        assert adapter.extras == {}
        config = json.loads((path / CONFIG).read_text())
        assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
        assert (config["r"], config["lora_alpha"]) == (16, 32)
        assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
        assert config["base_model_name_or_path"] == "mistralai/Mistral-7B-v0.1"
    # the zoo shares its output directions: rank-8 shared part plus noise, not independent B's
    import torch

    Bs = [read_lora_adapter(p).slots["model.layers.0.self_attn.q_proj"].B.float() for p in zoo.paths]
    energy = torch.linalg.svdvals(torch.cat(Bs, dim=1)) ** 2
    assert energy[: SPEC.shared_rank].sum() / energy.sum() > 0.8


def test_builds_are_byte_identical_and_cached(zoo, tmp_path: Path) -> None:
    again = build_llm_zoo(tmp_path, 3, SPEC, progress=False)
    assert again.root.name == zoo.root.name
    assert _files(again.root) == _files(zoo.root)
    mtimes = {p: (p / WEIGHTS).stat().st_mtime_ns for p in again.paths}
    reused = build_llm_zoo(tmp_path, 3, SPEC, progress=False)
    assert (reused.built, reused.reused) == (0, 3)
    assert {p: (p / WEIGHTS).stat().st_mtime_ns for p in reused.paths} == mtimes
    grown = build_llm_zoo(tmp_path, 4, SPEC, progress=False)
    assert (grown.built, grown.reused) == (1, 3)
    assert json.loads((grown.root / "zoo.json").read_text())["n"] == 4
    other = build_llm_zoo(tmp_path, 1, LlmSynthSpec(layers=1, hidden=64, seed=1), progress=False)
    assert other.root != grown.root
    assert (other.paths[0] / WEIGHTS).read_bytes() != (grown.paths[0] / WEIGHTS).read_bytes()
    # the bench's recipe names the first N explicitly once the zoo holds more
    assert bench.recipe_adapters(grown.root, grown.paths) == [str(grown.root / "adapters" / "*")]
    assert bench.recipe_adapters(grown.root, grown.paths[:2]) == [str(p) for p in grown.paths[:2]]


def test_read_floor_counts_match_the_zoo(zoo, tmp_path: Path) -> None:
    expected = {"files": 3, "tensors": 3 * 4 * 2, "tensor_bytes": 3 * SPEC.tensor_bytes()}
    local = bench.read_floor(zoo.paths)
    assert {key: local[key] for key in expected} == expected
    assert local["file_bytes"] == sum((p / WEIGHTS).stat().st_size for p in zoo.paths)
    child = bench.measure_read_floor(zoo.paths, tmp_path, cold=False, timeout=120)
    assert child["ok"], child
    assert {key: child[key] for key in expected} == expected
    assert child["import_s"] > 0 and child["read_s"] >= 0


def test_launcher_reports_the_child_peak(tmp_path: Path) -> None:
    big = bench.run_measured([sys.executable, "-c", "x = b'1' * (150 * 2**20)"], tmp_path, "big", timeout=60)
    assert big["ok"] and big["maxrss_bytes"] >= 150 * 2**20
    failed = bench.run_measured(
        [sys.executable, "-c", "raise SystemExit('boom')"], tmp_path, "bad", timeout=60
    )
    assert not failed["ok"] and "boom" in failed["error"]
    hashes = {"a": "1", "b": "2"}
    assert bench.compare_stores(hashes, dict(hashes))["identical"]
    assert bench.compare_stores(hashes, {"a": "1", "b": "3"})["differing"] == ["b"]
