"""A classifier's label names go through the store and come back where the source had them: config.json
beside the reconstructed (or exported) adapter, which transformers' AutoConfig and compress read again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_lora

from mergekit_subspace.io.checkpoint import Checkpoint
from mergekit_subspace.io.peft import read_labels
from mergekit_subspace.recipe import SubspaceSettings
from mergekit_subspace.sources import lora_task
from mergekit_subspace.subspace import SubspaceStore

NAMES = ["noun.animal", "noun.plant", "noun.artifact"]


@pytest.fixture(scope="module")
def store(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> SubspaceStore:
    """'named': an adapter beside which the classifier's config was saved (id2label); 'plain': none."""
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("labels-round-trip")
    named = make_lora(tiny_bert, root / "zoo" / "named", seed=0, r=2)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)}
    )
    model.config.save_pretrained(named)
    plain = make_lora(tiny_bert, root / "zoo" / "plain", seed=1, r=2)
    return SubspaceStore.from_tasks(
        [lora_task(named), lora_task(plain)],
        SubspaceSettings(k=8),
        root / "store",
        base=Checkpoint(tiny_bert),  # the base's model_type lets AutoConfig read the labels' config.json
        progress=False,
    )


def test_reconstruct_writes_the_labels_back(store: SubspaceStore, tmp_path: Path) -> None:
    from transformers import AutoConfig

    out = store.reconstruct("named", tmp_path / "named")
    config = AutoConfig.from_pretrained(out)  # as a transformers user reads it
    assert config.id2label == dict(enumerate(NAMES))
    assert config.label2id == {n: i for i, n in enumerate(NAMES)} and config.num_labels == 3
    assert config.model_type == "bert"
    assert read_labels(out) == NAMES


def test_a_task_without_labels_gets_no_config(store: SubspaceStore, tmp_path: Path) -> None:
    out = store.reconstruct("plain", tmp_path / "plain")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_labels_survive_a_second_store_and_load_through_peft(
    store: SubspaceStore, tiny_bert: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig

    out = store.reconstruct("named", tmp_path / "named")
    labels = AutoConfig.from_pretrained(out)
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, id2label=labels.id2label, label2id=labels.label2id
    )
    assert PeftModel.from_pretrained(base, out).config.id2label == dict(enumerate(NAMES))
    # a store fit without a base knows no model_type: config.json still names the classes
    again = SubspaceStore.from_tasks(
        [lora_task(out)], SubspaceSettings(k=8), tmp_path / "again", progress=False
    )
    assert again.manifest["tasks"]["named"]["labels"] == NAMES
    second = again.reconstruct("named", tmp_path / "second")
    assert read_labels(second) == NAMES
    assert PretrainedConfig.from_pretrained(second).id2label == dict(enumerate(NAMES))


def test_export_carries_the_labels(store: SubspaceStore, tmp_path: Path) -> None:
    out = store.export("named", tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["id2label"] == {
        str(i): n for i, n in enumerate(NAMES)
    }
    card = (out / "README.md").read_text()
    assert all(f"`{name}`" in card for name in NAMES)
