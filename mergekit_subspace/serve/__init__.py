"""Serve many tasks from one basis: per-row task routing in Python (`attach`) and over HTTP (`serve`).

Importing this package loads only torch; the HTTP stack (fastapi, uvicorn) is imported by `app` / `command`.
"""

from mergekit_subspace.serve.inject import BASE_NAME, MultiTaskModel, attach
from mergekit_subspace.serve.loading import load_served

__all__ = ["BASE_NAME", "MultiTaskModel", "attach", "load_served"]
