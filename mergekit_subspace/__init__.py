"""mergekit-subspace: keep one shared low-rank basis per layer and a few numbers per task.

The names below are imported on first use, so the command line answers `--help` and recipe errors without
waiting for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from mergekit_subspace.errors import SubspaceError

_WHERE = {
    "LowRankDelta": "lowrank",
    "SubspaceBasis": "fit",
    "SubspaceSettings": "recipe",
    "SubspaceStore": "subspace",
}

__all__ = ["LowRankDelta", "SubspaceBasis", "SubspaceError", "SubspaceSettings", "SubspaceStore"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'mergekit_subspace' has no attribute '{name}'")
    return getattr(importlib.import_module(f"mergekit_subspace.{_WHERE[name]}"), name)
