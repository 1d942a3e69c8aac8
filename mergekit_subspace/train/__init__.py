"""Training a new task inside a store's bases: only its cores (and a classifier's head) are trained.

Names are imported on first use, so the `train` command's module loads without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "TrainRecipe": "recipe",
    "parse_train_recipe": "recipe",
    "TrainResult": "run",
    "train_task": "run",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'mergekit_subspace.train' has no attribute '{name}'")
    return getattr(importlib.import_module(f"mergekit_subspace.train.{_WHERE[name]}"), name)
