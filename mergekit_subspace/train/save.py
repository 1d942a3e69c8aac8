"""Write a trained task into its store as any other task: cores encoded in the store's core dtype, heads kept
verbatim, the task file then the manifest (the store's own atomic write path), then read back and checked."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.io.codec import encode_core, store_dtypes
from mergekit_subspace.io.files import sha256_bytes
from mergekit_subspace.io.store import basis_file, task_file
from mergekit_subspace.lowrank import COMPUTE_DTYPE
from mergekit_subspace.sources import TaskSource
from mergekit_subspace.subspace import EncodedSlot, SubspaceStore, _task_file_and_entry

READBACK_ATOL = 1e-6  # a float32 core read back from disk equals what was encoded, to float rounding


def _frobenius_sq(U: torch.Tensor, core: torch.Tensor, V: torch.Tensor) -> float:
    """||U C V^T||_F^2 from the small Gram matrices (low-precision bases need not be orthonormal)."""
    gram_u, gram_v = U.T @ U, V.T @ V
    return float(torch.trace(gram_u @ core @ gram_v @ core.T))


def encode_trained_slot(
    module: str, core: torch.Tensor, U: torch.Tensor, V: torch.Tensor, dtype: str
) -> tuple[EncodedSlot, torch.Tensor]:
    """The trained core as the store keeps it, with the error the store's dtype adds; and the core as it
    reads back."""
    core = core.to(COMPUTE_DTYPE)
    U, V = U.to(COMPUTE_DTYPE), V.to(COMPUTE_DTYPE)
    rank = int(torch.linalg.matrix_rank(core)) or 1
    encoded, readback = encode_core(module, core, rank, dtype)
    norm_sq = _frobenius_sq(U, core, V)
    err_sq = _frobenius_sq(U, core - readback, V)
    stats = {
        "rank": rank,
        "rho": encoded.layout.rho,
        "norm": math.sqrt(norm_sq),
        "rel_error": 0.0 if norm_sq == 0 else math.sqrt(err_sq / norm_sq),
    }
    return EncodedSlot(encoded, stats, err_sq, norm_sq), readback


def save_trained_task(
    store: SubspaceStore,
    basis_sha256: str,
    source: TaskSource,
    cores: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """Add `source` (its extras, config and notes) with `cores` to the store; returns its manifest entry.

    The store is reopened first: a basis that changed since training started (a grow, a refit) or a name
    taken meanwhile is refused, and nothing is written.
    """
    current = SubspaceStore(store.path)
    if current.manifest["files"].get(basis_file(current.manifest)) != basis_sha256:
        raise SubspaceError(
            "its basis changed while the task was being trained (an add grew it, or a refit ran); train again",
            current.path,
        )
    if source.name in current.manifest["tasks"]:
        raise SubspaceError(
            f"task name '{source.name}' is already in the store; pick another name", current.path
        )
    dtypes = store_dtypes(current.manifest["settings"])
    encoded = {m: encode_trained_slot(m, cores[m], *current.basis(m), dtypes.cores) for m in sorted(cores)}
    slots = {m: slot for m, (slot, _) in encoded.items()}
    data, entry = _task_file_and_entry(source, slots, dtypes, added=True)
    manifest = copy.deepcopy(current.manifest)
    manifest["tasks"][source.name] = entry
    manifest["files"][task_file(source.name)] = sha256_bytes(data)
    current.files.write_task_and_manifest(source.name, data, manifest)
    _check_readback(Path(current.path), source.name, {m: readback for m, (_, readback) in encoded.items()})
    return SubspaceStore(current.path).manifest["tasks"][source.name]


def _check_readback(path: Path, name: str, expected: dict[str, torch.Tensor]) -> None:
    """Reopen the store and read the new task back (its sha256 is checked on read): every core must be what
    was encoded."""
    stored = SubspaceStore(path).cores(name)
    for module, core in expected.items():
        got = stored[module].to(COMPUTE_DTYPE)
        if got.shape != core.shape or not torch.allclose(got, core, atol=READBACK_ATOL, rtol=1e-5):
            raise SubspaceError(f"task '{name}' slot '{module}' does not read back as it was written", path)
