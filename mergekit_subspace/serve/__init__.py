"""Serve many tasks from one basis: per-row task routing in Python (`attach`) and over HTTP (`serve`).

Names are imported on first use (they need torch); the HTTP stack (fastapi, uvicorn) is imported by `app` /
`command` only when a server starts.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"BASE_NAME": "inject", "MultiTaskModel": "inject", "attach": "inject", "load_served": "loading"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'mergekit_subspace.serve' has no attribute '{name}'")
    return getattr(importlib.import_module(f"mergekit_subspace.serve.{_WHERE[name]}"), name)
