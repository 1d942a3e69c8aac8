"""Modules that let each row of one batch use its own task, without ever forming a task's m x n delta.

`SubspaceLinear` wraps a target layer (nn.Linear, GPT-2 Conv1D, bitsandbytes Linear8bitLt / Linear4bit) and adds
delta_y = ((x V) C_t^T) U^T: x V and the U^T product are single GEMMs over the whole batch; only the k_in x k_out
step is gathered per row. `PerTaskLinear` replaces a head from modules_to_save by stacked per-task weights.
Row index 0 is the plain base model in both (a zero core, the base head).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# A gathered per-row head weight above this many elements is computed task by task instead (an lm_head).
GATHER_LIMIT = 1 << 24


class TaskRouter:
    """The per-row task indices of the forward call in flight, shared by every wrapped module of a model.

    `single` is the task when every row uses the same one, so layers can skip the gather (or, for the base,
    all delta work).
    """

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None
        self.single: int | None = None
        self._expanded: dict[tuple[int, torch.device], torch.Tensor] = {}

    def set(self, index: torch.Tensor | None) -> None:
        self.index = index
        self._expanded = {}
        if index is None or index.numel() == 0:
            self.single = 0 if index is None else None
            return
        first = int(index[0])
        self.single = first if bool(torch.all(index == first)) else None

    def rows(self, batch: int, device: torch.device) -> torch.Tensor:
        """Indices for a batch of `batch` rows; beams and num_return_sequences repeat each row in place."""
        assert self.index is not None
        key = (batch, device)
        cached = self._expanded.get(key)
        if cached is not None:
            return cached
        n = self.index.numel()
        if batch == n:
            rows = self.index
        elif batch % n == 0:
            rows = self.index.repeat_interleave(batch // n)
        else:
            raise RuntimeError(f"batch of {batch} rows does not match {n} task indices")
        rows = rows.to(device)
        self._expanded[key] = rows
        return rows


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear-like layer, quantized or Conv1D (whose weight is in x out)."""
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return int(module.out_features), int(module.in_features)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return int(module.nf), int(module.weight.shape[0])
    raise TypeError(f"{type(module).__name__} is not a Linear-like layer")


class _Delegating(nn.Module):
    """Wrapper that answers attribute look-ups it lacks from the wrapped module (weight, in_features, ...)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(super().__getattr__("base_layer"), name)


class SubspaceLinear(_Delegating):
    """A target layer plus the shared-basis delta of whichever task each row asks for."""

    def __init__(self, base_layer: nn.Module, router: TaskRouter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.router = router
        self.out_features, self.in_features = linear_dims(base_layer)
        self.register_buffer("V", torch.zeros(self.in_features, 0), persistent=False)
        self.register_buffer("Ut", torch.zeros(0, self.out_features), persistent=False)
        self.register_buffer("cores_t", torch.zeros(1, 0, 0), persistent=False)
        self.register_buffer("biases", None, persistent=False)

    def load(
        self,
        U: torch.Tensor,
        V: torch.Tensor,
        cores_t: torch.Tensor,
        biases: torch.Tensor | None,
    ) -> None:
        """U (m x k_out), V (n x k_in), cores_t [T+1, k_in, k_out] (C^T, row 0 zero), biases [T+1, m] or None."""
        self.Ut = U.T.contiguous()
        self.V = V.contiguous()
        self.cores_t = cores_t.contiguous()
        self.biases = None if biases is None else biases.contiguous()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        single = self.router.single
        if self.router.index is None or single == 0:
            return y
        dtype = self.V.dtype
        h = x.to(dtype) @ self.V  # shared: [B, ..., k_in]
        if single is not None:
            g = h @ self.cores_t[single]
            bias = None if self.biases is None else self.biases[single]
        else:
            rows = self.router.rows(x.shape[0], x.device)
            flat = h.reshape(h.shape[0], -1, h.shape[-1])
            g = torch.bmm(flat, self.cores_t[rows]).reshape(*h.shape[:-1], -1)  # per row: k x k
            bias = (
                None
                if self.biases is None
                else self.biases[rows].reshape(-1, *[1] * (y.ndim - 2), y.shape[-1])
            )
        if bias is None and y.dtype == dtype and y.is_contiguous() and torch.is_inference_mode_enabled():
            y.view(-1, y.shape[-1]).addmm_(g.reshape(-1, g.shape[-1]), self.Ut)  # shared, fused into y
            return y
        delta = g @ self.Ut  # shared: [B, ..., m]
        if bias is not None:
            delta = delta + bias
        return y + delta.to(y.dtype)


class PerTaskLinear(_Delegating):
    """A head (modules_to_save) with one weight per task, stacked; each row is computed with its own."""

    def __init__(self, base_layer: nn.Linear, router: TaskRouter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.router = router
        self.register_buffer("weights", None, persistent=False)
        self.register_buffer("stacked_biases", None, persistent=False)

    def load(self, weights: torch.Tensor, biases: torch.Tensor) -> None:
        """weights [T+1, out, in] (row 0 the base head, padded with zeros), biases [T+1, out]."""
        self.weights = weights.contiguous()
        self.stacked_biases = biases.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.weights is not None and self.stacked_biases is not None
        x = x.to(self.weights.dtype)
        single = self.router.single
        if self.router.index is None or single is not None:
            task = single or 0
            return F.linear(x, self.weights[task], self.stacked_biases[task])
        rows = self.router.rows(x.shape[0], x.device)
        out, inp = self.weights.shape[1:]
        flat = x.reshape(x.shape[0], -1, inp)
        if rows.numel() * out * inp <= GATHER_LIMIT:
            y = torch.baddbmm(
                self.stacked_biases[rows].unsqueeze(1), flat, self.weights[rows].transpose(1, 2)
            )
        else:
            y = flat.new_empty(flat.shape[0], flat.shape[1], out)
            for task in torch.unique(rows).tolist():
                mask = rows == task
                y[mask] = F.linear(flat[mask], self.weights[task], self.stacked_biases[task])
        return y.reshape(*x.shape[:-1], out)
