"""mergekit-subspace: keep one shared low-rank basis per layer and a few numbers per task."""

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.lowrank import LowRankDelta
from mergekit_subspace.subspace import SubspaceStore

__all__ = ["LowRankDelta", "SubspaceError", "SubspaceStore"]
__version__ = "0.1.0"
