"""The factored delta D = scale * B @ A and the operations on it that never form the m x n matrix.

Every LoRA slot, and every full fine-tune after truncated SVD, is one of these. Memory and time of everything
here grow with the rank, not with m * n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COMPUTE_DTYPE = torch.float64


@dataclass(frozen=True)
class LowRankDelta:
    """D = scale * B @ A with B (m x r) and A (r x n), in the nn.Linear (out x in) orientation."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.B.ndim != 2 or self.A.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(f"incompatible factors B {tuple(self.B.shape)} and A {tuple(self.A.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.B.shape[0]), int(self.A.shape[1]))

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) in float64 with the scale folded into B."""
        return self.B.to(COMPUTE_DTYPE) * self.scale, self.A.to(COMPUTE_DTYPE)

    def norm_sq(self) -> float:
        """||D||_F^2 = scale^2 tr((B^T B)(A A^T)): r x r work only."""
        B, A = self.factors()
        return float(torch.sum((B.T @ B) * (A @ A.T)))

    def left_gram_factor(self) -> torch.Tensor:
        """Y (m x r) with Y Y^T = D D^T, independent of how B and A split D (A^T = Q R, Y = B R^T)."""
        B, A = self.factors()
        _, R = torch.linalg.qr(A.T, mode="reduced")
        return B @ R.T

    def right_gram_factor(self) -> torch.Tensor:
        """Z (n x r) with Z Z^T = D^T D (B = P T, Z = A^T T^T)."""
        B, A = self.factors()
        _, T = torch.linalg.qr(B, mode="reduced")
        return A.T @ T.T

    def project(self, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Core C = U^T D V (k_out x k_in) for orthonormal U (m x k_out), V (n x k_in)."""
        B, A = self.factors()
        return (U.to(COMPUTE_DTYPE).T @ B) @ (A @ V.to(COMPUTE_DTYPE))

    def times_right(self, V: torch.Tensor) -> torch.Tensor:
        """D V (m x k), for the HOOI refinement of the left basis."""
        B, A = self.factors()
        return B @ (A @ V.to(COMPUTE_DTYPE))

    def transpose_times_left(self, U: torch.Tensor) -> torch.Tensor:
        """D^T U (n x k), for the HOOI refinement of the right basis."""
        B, A = self.factors()
        return A.T @ (B.T @ U.to(COMPUTE_DTYPE))

    def to_dense(self) -> torch.Tensor:
        """The m x n matrix. Only for tests and for small reference checks, never on the main paths."""
        B, A = self.factors()
        return B @ A

    @classmethod
    def from_dense(cls, delta: torch.Tensor, max_rank: int) -> tuple[LowRankDelta, float]:
        """Truncated SVD of a dense fine-tune delta; returns the delta and the fraction of energy dropped."""
        d = delta.to(COMPUTE_DTYPE)
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        total = float(torch.sum(S * S))
        keep = max(1, min(max_rank, S.numel()))
        kept = float(torch.sum(S[:keep] ** 2))
        dropped = 0.0 if total == 0.0 else max(0.0, 1.0 - kept / total)
        root = torch.sqrt(S[:keep])
        return cls(B=U[:, :keep] * root, A=root[:, None] * Vh[:keep], scale=1.0), dropped


def core_to_factors(
    U: torch.Tensor, core: torch.Tensor, V: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split U C V^T into PEFT factors: C = P S Q^T, B = U P S^1/2, A = S^1/2 Q^T V^T, keeping `rank` directions.

    Work is on the k_out x k_in core and the thin bases only.
    """
    C = core.to(COMPUTE_DTYPE)
    P, S, Qh = torch.linalg.svd(C, full_matrices=False)
    rank = max(1, min(rank, S.numel()))
    root = torch.sqrt(S[:rank])
    B = U.to(COMPUTE_DTYPE) @ (P[:, :rank] * root)
    A = (root[:, None] * Qh[:rank]) @ V.to(COMPUTE_DTYPE).T
    return B, A


class SlotProjector:
    """One slot's bases as stored, in float64 with their Gram matrices, for projecting many tasks onto them
    and scoring each against its core as stored (low precision bases need not be orthonormal)."""

    def __init__(self, U: torch.Tensor, V: torch.Tensor) -> None:
        self.U, self.V = U.to(COMPUTE_DTYPE), V.to(COMPUTE_DTYPE)
        self.gram_u, self.gram_v = self.U.T @ self.U, self.V.T @ self.V
        self._inverse_u = torch.linalg.pinv(self.gram_u, hermitian=True)
        self._inverse_v = torch.linalg.pinv(self.gram_v, hermitian=True)

    def project(self, delta: LowRankDelta) -> torch.Tensor:
        """U^T D V (k_out x k_in), from factors only."""
        B, A = delta.factors()
        return (self.U.T @ B) @ (A @ self.V)

    def best_core(self, projected: torch.Tensor) -> torch.Tensor:
        """The core C with the least ||D - U C V^T||_F for these bases, from the projection U^T D V:
        G_u^+ (U^T D V) G_v^+. For orthonormal bases it is the projection itself; for bases rounded to a low
        precision it also puts back the part of their rounding error that lies in their span."""
        return self._inverse_u @ projected @ self._inverse_v

    def error_sq(self, norm_sq: float, projected: torch.Tensor, core: torch.Tensor) -> float:
        """||D - U C V^T||_F^2 for a core C as stored, given ||D||^2 and the projection U^T D V."""
        C = core.to(COMPUTE_DTYPE)
        cross = float(torch.sum(projected * C))
        recon_sq = float(torch.sum((self.gram_u @ C) * (C @ self.gram_v)))
        return max(0.0, norm_sq - 2.0 * cross + recon_sq)


def stored_error_sq(delta: LowRankDelta, U: torch.Tensor, core: torch.Tensor, V: torch.Tensor) -> float:
    """||D - U C V^T||_F^2 for the bases and core exactly as stored (possibly low precision), from factors only."""
    projector = SlotProjector(U, V)
    return projector.error_sq(delta.norm_sq(), projector.project(delta), core)
