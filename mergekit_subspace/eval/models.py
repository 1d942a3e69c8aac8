"""Load a base model, optionally with a PEFT folder on top, exactly as a user of the written adapter would."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def head_size(adapter_dir: str | Path) -> int | None:
    """Number of labels of a sequence-classification adapter, from its saved head."""
    from safetensors import safe_open

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
                return int(handle.get_slice(key).get_shape()[0])
    return None


def load_classifier(base: str | Path, adapter_dir: str | Path | None, num_labels: int | None = None):
    """Sequence classifier: base + PEFT adapter (its head comes from modules_to_save)."""
    from transformers import AutoModelForSequenceClassification

    labels = num_labels or (head_size(adapter_dir) if adapter_dir else None) or 2
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=labels)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


def load_causal_lm(base: str | Path, adapter_dir: str | Path | None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


def adapter_task_type(adapter_dir: str | Path) -> str | None:
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return config.get("task_type")
