"""The ViT scale zoo on real Fashion-MNIST, at a tiny budget: real PEFT folders, honest scores, caching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.zoos import vit
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.eval.image import image_classification_accuracy, load_image_eval

pytestmark = pytest.mark.skipif(
    not vit.fashion_mnist_available(),
    reason="Fashion-MNIST missing (apt-get install -y dataset-fashion-mnist)",
)

TINY = dict(steps=3, n_train=16, n_test=8, batch_size=16, sources=("fmnist",), progress=False)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[dict]]:
    root = tmp_path_factory.mktemp("vit-zoo")
    base = vit.pretrain_vit(root, steps=4, progress=False, n_test=64)
    entries = vit.build_vit_zoo(root, 2, base_dir=base, **TINY)
    return root, base, entries


def test_pretrain_writes_a_loadable_hf_folder(tiny_zoo: tuple[Path, str, list[dict]]) -> None:
    from transformers import ViTForImageClassification

    _, base, _ = tiny_zoo
    assert (Path(base) / "model.safetensors").is_file()
    info = vit.pretrain_info(base)
    assert info["steps"] == 4 and info["n_test"] == 64 and 0.0 <= info["test_accuracy"] <= 1.0
    model = ViTForImageClassification.from_pretrained(base)
    assert model.config.num_labels == 10 and model.config.num_channels == 1
    mtime = (Path(base) / "model.safetensors").stat().st_mtime_ns
    assert vit.pretrain_vit(Path(base).parent, steps=4, progress=False, n_test=64) == base
    assert (Path(base) / "model.safetensors").stat().st_mtime_ns == mtime  # cached, not retrained


def test_adapters_are_real_peft_folders_scored_through_peft(tiny_zoo: tuple[Path, str, list[dict]]) -> None:
    from peft import PeftModel
    from transformers import ViTForImageClassification

    root, base, entries = tiny_zoo
    assert len(entries) == 2 and len({e["name"] for e in entries}) == 2
    summary = json.loads((root / "zoo.json").read_text())
    assert [e["name"] for e in summary["entries"]] == [e["name"] for e in entries]
    for entry in entries:
        folder = root / entry["path"]
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == entry["r"]
        assert set(config["target_modules"]) == set(entry["targets"]) and config["modules_to_save"] == [
            "classifier"
        ]
        data = load_image_eval(root / entry["eval"])
        k = len(entry["classes"])
        assert data["pixel_values"].shape == (8 * k, 1, 28, 28)
        assert data["labels"].max() == k - 1 and data["base_label_ids"].tolist() == entry["classes"]
        base_model = ViTForImageClassification.from_pretrained(
            base, num_labels=k, ignore_mismatched_sizes=True
        )
        model = PeftModel.from_pretrained(base_model, str(folder)).eval()
        with torch.no_grad():
            logits = model(pixel_values=data["pixel_values"]).logits
        assert logits.shape == (8 * k, k)
        assert entry["accuracy"] == image_classification_accuracy(base, folder, data)
        assert entry["base_accuracy"] == image_classification_accuracy(base, None, data)
    assert not [p for p in (root / "adapters").iterdir() if p.name.startswith(".")]  # no temp folders left


def test_rebuild_reuses_cache_and_extends(
    tiny_zoo: tuple[Path, str, list[dict]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, base, entries = tiny_zoo

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached adapter was retrained")

    monkeypatch.setattr(vit, "train_lora", no_training)
    again = vit.build_vit_zoo(root, 2, base_dir=base, **TINY)
    assert [e["cache_key"] for e in again] == [e["cache_key"] for e in entries]
    assert [t.name for t in vit.make_tasks(3, sources=("fmnist",))][:2] == [e["name"] for e in entries]


def test_tasks_are_deterministic_and_distinct() -> None:
    tasks = vit.make_tasks(200)
    assert [t.name for t in tasks[:50]] == [t.name for t in vit.make_tasks(50)]
    assert len({t.name for t in tasks}) == 200
    assert {t.source for t in tasks} == {"fmnist", "mnist"} and len({t.transform for t in tasks}) == 5
    assert all(2 <= len(t.classes) <= 4 for t in tasks)


def test_pixel_scale_is_lossless_in_float16() -> None:
    images = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    pixels = vit.to_pixel_values(images)
    assert torch.equal(pixels.half().float(), pixels)
    assert torch.equal(vit.apply_transform(vit.apply_transform(images, "hflip"), "hflip"), images)


def test_load_image_eval_rejects_bad_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"pixel_values": torch.zeros(2, 1, 4, 4)}, tmp_path / "nolabels.safetensors")
    with pytest.raises(SubspaceError, match="labels"):
        load_image_eval(tmp_path / "nolabels.safetensors")
    save_file(
        {"pixel_values": torch.zeros(2, 1, 4, 4), "labels": torch.zeros(3, dtype=torch.long)},
        tmp_path / "n.st",
    )
    with pytest.raises(SubspaceError, match="2 images but 3 labels"):
        load_image_eval(tmp_path / "n.st")
    with pytest.raises(SubspaceError, match="not found"):
        load_image_eval(tmp_path / "missing.safetensors")
