"""`bench` on tiny models: every method scored through PEFT, results keys, reports, and bad eval data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import WORDS, make_lora, write_recipe

from mergekit_subspace.bench.report import plots
from mergekit_subspace.cli import main

METHOD_KEYS = {
    "original",
    "reconstructed",
    "mean_adapter",
    "per_task_svd",
    "leave_one_out",
    "base_only",
    "vlora",
}


@pytest.fixture
def bench_setup(tiny_bert: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    zoo = [make_lora(tiny_bert, tmp_path / "zoo" / f"t{i}", seed=i, r=2) for i in range(3)]
    rng = random.Random(0)
    (tmp_path / "eval").mkdir()
    for adapter in zoo:
        lines = [
            json.dumps({"text": " ".join(rng.sample(WORDS, 5)), "label": rng.randrange(3)}) for _ in range(24)
        ]
        (tmp_path / "eval" / f"{adapter.name}.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path, zoo


def bench_recipe(root: Path, base: Path, body: str = "") -> Path:
    return write_recipe(
        root / "bench.yaml",
        f"base_model: {base}\nadapters: ['{root}/zoo/*']\n"
        f"eval: {{type: sequence_classification, data: '{root}/eval/{{task}}.jsonl', max_examples: 20}}\n"
        f"sweep: {{k: [1, 8]}}\n{body}",
    )


def test_bench_measures_every_method(tiny_bert: Path, bench_setup) -> None:
    root, zoo = bench_setup
    result = CliRunner().invoke(
        main, ["bench", str(bench_recipe(root, tiny_bert)), "--out", str(root / "out")]
    )
    assert result.exit_code == 0, result.output
    results = json.loads((root / "out" / "results.json").read_text())
    assert results["tasks"] == [p.name for p in zoo]
    for per_k in results["per_task"].values():
        assert set(per_k) == {"1", "8"}
        for row in per_k.values():
            assert set(row) >= METHOD_KEYS
            assert all(row[m] is None or 0.0 <= row[m] <= 1.0 for m in METHOD_KEYS)
        # k=8 >= the slot's total rank (3 x 2): the reconstruction is exact, so the accuracy is the original's
        assert per_k["8"]["reconstructed"] == per_k["8"]["original"]
        assert per_k["8"]["rel_error"] < 1e-5 < per_k["1"]["rel_error"]
        assert per_k["8"]["vlora"] is not None
    per_k_bytes = results["bytes"]["per_k"]
    assert per_k_bytes["1"]["store"] < per_k_bytes["8"]["store"]
    assert results["bytes"]["sources"] > 0 and results["bytes"]["sources_cast_to_store_dtype"] > 0
    assert results["timing"]["8"]["fit_seconds"] >= 0 and results["peak_rss_mib"] > 0
    timing = results["timing"]  # the total covers every phase the user waited for
    phases = ["load_seconds", "baselines_seconds", "plot_seconds"]
    per_k = [timing[k]["fit_seconds"] + timing[k]["eval_seconds"] for k in ("1", "8")]
    parts = sum(timing[p] for p in phases) + sum(per_k)
    assert 0 < parts <= timing["total_seconds"]
    assert results["summary"]["8"]["reconstructed"]["mean_normalized"] == pytest.approx(1.0)
    for name in ("report.md", "scree.png", "accuracy_vs_bytes.png", "coefficient_spectrum.png"):
        assert (root / "out" / name).stat().st_size > 0
    assert "per_task_svd" in (root / "out" / "report.md").read_text()
    (root / "again").mkdir()  # the plots are drawn again from results.json alone, without the stores
    assert all(p.stat().st_size > 0 for p in plots(results, root / "again"))
    assert not (root / "out" / "work").exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.unlink(), "evaluation data not found"),
        (lambda p: p.write_text('{"text": "w1", "label": 0}\n{oops\n'), "line 2 is not valid JSON"),
        (lambda p: p.write_text('{"text": "w1", "label": 7}\n'), "label 7 is outside the head's range 0..2"),
        (lambda p: p.write_text('{"text": "w1"}\n'), "line 1 has no 'label' field"),
        (lambda p: p.write_text("\n"), "evaluation set is empty"),
    ],
)
def test_bad_eval_data_fails_before_fitting(tiny_bert: Path, bench_setup, damage, message: str) -> None:
    root, zoo = bench_setup
    target = root / "eval" / f"{zoo[1].name}.jsonl"
    damage(target)
    result = CliRunner().invoke(
        main, ["bench", str(bench_recipe(root, tiny_bert)), "--out", str(root / "out")]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and target.name in result.output
    assert not (root / "out").exists()


def test_bench_recipe_errors(tiny_bert: Path, bench_setup) -> None:
    root, _ = bench_setup
    recipe = bench_recipe(root, tiny_bert, body="surprise: true\n")
    result = CliRunner().invoke(main, ["bench", str(recipe), "--out", str(root / "out")])
    assert result.exit_code == 2 and "surprise: unknown key" in result.output
    recipe = write_recipe(
        root / "no-task.yaml",
        f"base_model: {tiny_bert}\nadapters: ['{root}/zoo/*']\neval: {{type: sequence_classification, data: x.jsonl}}\n",
    )
    result = CliRunner().invoke(main, ["bench", str(recipe), "--out", str(root / "out")])
    assert result.exit_code == 2 and "{task}" in result.output
