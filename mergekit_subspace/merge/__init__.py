"""Merging tasks in the shared subspace: one merged core per slot, exported as PEFT folder(s) or a full model.

Names are imported on first use, so the `merge` command's module loads without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "METHODS": "methods",
    "MergeMethod": "methods",
    "SlotInputs": "methods",
    "get_method": "methods",
    "MergeRecipe": "recipe",
    "parse_merge_recipe": "recipe",
    "MergeResult": "run",
    "merge": "run",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'mergekit_subspace.merge' has no attribute '{name}'")
    return getattr(importlib.import_module(f"mergekit_subspace.merge.{_WHERE[name]}"), name)
