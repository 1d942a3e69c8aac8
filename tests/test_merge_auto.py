"""merge_method: auto — every candidate method over the lambda grid, the best mean validation score wins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_lora
from test_merge import _bert_with_tokenizer, _head_centred_at, _predict, _texts, dense, make_store, run_recipe

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.merge import METHODS
from mergekit_subspace.merge.recipe import merge_recipe_from_dict

GRID = [0.5, 1.0, 2.0]


@pytest.fixture
def case(tiny_bert: Path, tmp_path: Path) -> dict:
    """Task ta's labels are its own predictions at lambda 1 through a large head centred there, and tb has
    weight 0: task_arithmetic then gives ta exactly (score 1 at lambda 1); mean mixes in tb at every lambda."""
    base = _bert_with_tokenizer(tiny_bert, tmp_path / "tiny-bert-tok")
    texts = _texts(48)
    plain = make_lora(tiny_bert, tmp_path / "plain" / "ta", seed=11)
    ta = _head_centred_at(base, plain, texts, 1.0, tmp_path / "zoo" / "ta")
    tb = make_lora(tiny_bert, tmp_path / "zoo" / "tb", seed=12)
    labels = _predict(base, ta, texts)
    assert len(set(labels)) > 1
    data = tmp_path / "val.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels, strict=True))
    )
    recipe = {
        "merge_method": "auto",
        "adapters": [str(ta), str(tb)],
        "base_model": str(base),
        "tasks": [{"name": "ta", "weight": 1.0, "validation": str(data)}, {"name": "tb", "weight": 0.0}],
        "validation": {"lambda_grid": GRID},
        "output": {"path": str(tmp_path / "out")},
    }
    return {"recipe": recipe, "ta": ta, "out": tmp_path / "out"}


def test_auto_picks_the_method_that_scores_best_and_records_the_table(case: dict, tmp_path: Path) -> None:
    recipe = case["recipe"] | {"auto_methods": ["mean", "task_arithmetic"]}  # the worse one listed first
    code, output = run_recipe(tmp_path, recipe)
    assert code == 0, output
    assert "with task_arithmetic (lambda 1, best of 2 methods on validation: mean score 1.0000)" in output
    report = json.loads((case["out"] / "merge_report.json").read_text())
    assert report["method"] == "task_arithmetic" and report["lambda"] == 1.0
    auto = report["auto"]
    assert auto["candidates"] == ["mean", "task_arithmetic"]
    assert auto["chosen"] == {"method": "task_arithmetic", "lambda": 1.0, "score": 1.0}
    table = {(row["method"], row["lambda"]): row["score"] for row in auto["table"]}
    assert set(table) == {(m, g) for m in ("mean", "task_arithmetic") for g in GRID}
    assert table[("task_arithmetic", 1.0)] == 1.0
    assert max(table[("mean", g)] for g in GRID) < 1.0  # the construction separates the two
    assert auto["best_scores"]["mean"] == max(table[("mean", g)] for g in GRID)
    assert all(row["task_scores"] == {"ta": row["score"]} for row in auto["table"])
    assert report["validation"]["mean_scores"] == [table[("task_arithmetic", g)] for g in GRID]
    seconds = report["seconds"]
    assert seconds["validation"] == pytest.approx(sum(t["validation"] for t in auto["seconds"].values()))
    assert seconds["total"] >= seconds["merge"] + seconds["validation"]
    written, original = dense(case["out"] / "ta"), dense(case["ta"])  # the chosen merge is what was written
    for module, delta in original.items():
        torch.testing.assert_close(written[module], delta, atol=1e-5, rtol=1e-5)


def test_auto_without_a_list_tries_every_registered_method(case: dict, tmp_path: Path) -> None:
    quick = {"lambda_grid": [1.0], "max_examples": 16}  # one point, few examples: this runs every method
    code, output = run_recipe(
        tmp_path, case["recipe"] | {"parameters": {"density": 0.5}, "validation": quick}
    )
    assert code == 0, output
    auto = json.loads((case["out"] / "merge_report.json").read_text())["auto"]
    assert auto["candidates"] == list(METHODS)
    assert [row["method"] for row in auto["table"]] == list(METHODS)
    best = max(auto["best_scores"].values())
    first_best = next(m for m in METHODS if auto["best_scores"][m] == best)  # ties: the first registered
    assert auto["chosen"]["method"] == first_best and auto["chosen"]["score"] == best == 1.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"auto_methods": ["ties", "slerp"]}, "unknown merge method 'slerp' (known: linear, task_arithmetic"),
        ({"auto_methods": []}, "the list is empty; name at least one method"),
        ({"auto_methods": ["ties", "ties"]}, "lists a method twice"),
        (
            {"merge_method": "ties", "auto_methods": ["ties"]},
            "`auto_methods:` only applies to merge_method: auto",
        ),
        ({"tasks": [{"name": "ta"}]}, "merge_method: auto needs validation data"),
        ({"parameters": {"gamma": 1.0}}, "method 'auto' takes no parameter 'gamma'"),
    ],
)
def test_bad_auto_recipes_fail_in_one_line_and_write_nothing(
    tiny_bert: Path, tmp_path: Path, change: dict, message: str
) -> None:
    store = make_store(tmp_path, None, [make_lora(tiny_bert, tmp_path / "zoo" / "ta", seed=1)])
    data = tmp_path / "val.jsonl"
    data.write_text(json.dumps({"text": "w1 w2", "label": 0}) + "\n")
    recipe = {
        "merge_method": "auto",
        "store": str(store),
        "tasks": [{"name": "ta", "validation": str(data)}],
        "output": {"path": str(tmp_path / "out")},
    } | change
    code, output = run_recipe(tmp_path, recipe)
    assert code == 2 and message in output and "Traceback" not in output, output
    assert len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / "out").exists()


def test_auto_candidates_and_parameters_from_python() -> None:
    """Parameters are accepted when some candidate takes them; each candidate uses only its own."""
    recipe = merge_recipe_from_dict(
        {
            "merge_method": "auto",
            "auto_methods": ["tsv", "ties"],
            "store": "s",
            "tasks": [{"name": "a", "validation": "a.jsonl", "parameters": {"density": 0.4}}],
        }
    )
    assert recipe.candidates == ["tsv", "ties"]
    assert merge_recipe_from_dict({"merge_method": "ties", "store": "s"}).candidates == ["ties"]


def test_task_weights_on_validation_turn_down_the_task_that_hurts(case: dict, tmp_path: Path) -> None:
    """tb at weight 1 mixes into ta's merge and lowers ta's score; the task-weight search finds tb x 0 (the
    merge is then ta alone, score 1), records every step, and writes that merge."""
    recipe = case["recipe"] | {
        "merge_method": "task_arithmetic",
        "tasks": [{"name": "ta", "validation": case["recipe"]["tasks"][0]["validation"]}, {"name": "tb"}],
        "validation": {"lambda_grid": [1.0], "task_weight_grid": [0.0, 1.0]},
    }
    code, output = run_recipe(tmp_path, recipe)
    assert code == 0, output
    assert "task weights on validation: 1.0000 (tb x0)" in output
    tuned = json.loads((case["out"] / "merge_report.json").read_text())["validation"]["task_weights"]
    assert tuned["scales"] == {"ta": 1.0, "tb": 0.0}
    assert tuned["start_score"] < 1.0 and tuned["score"] == 1.0 and tuned["task_scores"] == {"ta": 1.0}
    assert {(s["task"], s["scale"]) for s in tuned["steps"]} == {("ta", 0.0), ("tb", 0.0)}
    written, original = dense(case["out"] / "ta"), dense(case["ta"])
    for module, delta in original.items():
        torch.testing.assert_close(written[module], delta, atol=1e-5, rtol=1e-5)


def test_task_weight_grid_needs_validation_data_and_scales_in_range(case: dict) -> None:
    base = {k: v for k, v in case["recipe"].items() if k != "tasks"} | {"merge_method": "task_arithmetic"}
    with pytest.raises(SubspaceError, match="task_weight_grid needs validation data"):
        merge_recipe_from_dict(base | {"validation": {"task_weight_grid": [0, 1]}})
    with pytest.raises(SubspaceError, match=r"task weight scales lie in \[0, 1000\]"):
        merge_recipe_from_dict(case["recipe"] | {"validation": {"task_weight_grid": [-1, 1]}})
