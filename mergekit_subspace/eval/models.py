"""Load a base model, optionally with a PEFT folder on top, exactly as a user of the written adapter would."""

from __future__ import annotations

import copy
import json
import os
from functools import lru_cache
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


@lru_cache(maxsize=2)
def _cached_base(kind: str, base: str, labels: int) -> torch.nn.Module:
    """One pristine copy of a base per process: evaluations deep-copy it instead of re-reading the weights."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind == "classifier":
        return AutoModelForSequenceClassification.from_pretrained(base, num_labels=labels).eval()
    return AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()


def _with_adapter(model: torch.nn.Module, adapter_dir: str | Path | None) -> torch.nn.Module:
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


def load_classifier(base: str | Path, adapter_dir: str | Path | None, num_labels: int | None = None):
    """Sequence classifier: a fresh copy of the base + the PEFT folder (its head comes from modules_to_save)."""
    labels = num_labels or (head_size(adapter_dir) if adapter_dir else None) or 2
    return _with_adapter(copy.deepcopy(_cached_base("classifier", str(base), labels)), adapter_dir)


def load_causal_lm(base: str | Path, adapter_dir: str | Path | None):
    """Causal LM: a fresh copy of the base + the PEFT folder."""
    return _with_adapter(copy.deepcopy(_cached_base("causal_lm", str(base), 0)), adapter_dir)


def adapter_task_type(adapter_dir: str | Path) -> str | None:
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return config.get("task_type")
