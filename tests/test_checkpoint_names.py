"""Base checkpoints whose module names transformers renames on load (ViT in transformers 5)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from test_store import compress_zoo

from mergekit_subspace.io.checkpoint import Checkpoint
from mergekit_subspace.subspace import SubspaceStore


def _tiny_vit(folder: Path) -> Path:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(folder)
    return folder


def test_vit_adapter_names_resolve_against_legacy_checkpoint_keys(tmp_path: Path) -> None:
    base = _tiny_vit(tmp_path / "vit")
    with safe_open(str(base / "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert any("attention.attention.query" in k for k in keys)  # saved under the old names
    from transformers import ViTForImageClassification

    model = get_peft_model(
        ViTForImageClassification.from_pretrained(base),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]),
    )
    adapters = []
    for i in range(2):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape) * 0.1)
        model.save_pretrained(tmp_path / f"a{i}")
        adapters.append(tmp_path / f"a{i}")
    checkpoint = Checkpoint(base)
    assert checkpoint.resolve_module("vit.layers.0.attention.q_proj") == (
        "vit.encoder.layer.0.attention.attention.query.weight"
    )
    store = SubspaceStore(compress_zoo(tmp_path / "s", base, adapters, "k: 4"))
    assert store.manifest["base_model"]["model_type"] == "vit"
    assert store.manifest["slots"]["vit.layers.1.attention.v_proj"]["shape"] == [16, 16]
