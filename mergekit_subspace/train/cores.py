"""A base model with one trainable core per slot: each slot's layer computes base(x) + ((x V) C^T) U^T.

U and V are the store's bases as stored (frozen buffers); C (k_out x k_in, or its diagonal) is the only
trainable tensor of a slot. The core carries the delta's true scale, exactly as the store keeps cores (U C V^T
is the delta; reconstruct writes it as PEFT factors with scale 1), so the trained core is stored as it is.
"""

from __future__ import annotations

import torch
from torch import nn

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.serve.layers import _Delegating, linear_dims

CORE_MODES = ("full", "diagonal")


class CoreLinear(_Delegating):
    """A frozen target layer plus the delta U C V^T of a core being trained (zero at the start)."""

    def __init__(self, base_layer: nn.Module, U: torch.Tensor, V: torch.Tensor, mode: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.mode = mode
        self.register_buffer("U", U.detach().to(torch.float32).contiguous(), persistent=False)
        self.register_buffer("V", V.detach().to(torch.float32).contiguous(), persistent=False)
        k_out, k_in = U.shape[1], V.shape[1]
        shape = (k_out, k_in) if mode == "full" else (min(k_out, k_in),)
        self.core = nn.Parameter(torch.zeros(shape))

    def dense_core(self) -> torch.Tensor:
        """C as a k_out x k_in matrix (a diagonal core padded with zeros)."""
        if self.mode == "full":
            return self.core
        k_out, k_in = self.U.shape[1], self.V.shape[1]
        diagonal = torch.diag(self.core)
        return nn.functional.pad(diagonal, (0, k_in - diagonal.shape[1], 0, k_out - diagonal.shape[0]))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        h = x.to(self.V.dtype) @ self.V  # [..., k_in]
        if self.mode == "full":
            g = h @ self.core.T
        else:
            r = self.core.shape[0]
            g = nn.functional.pad(h[..., :r] * self.core, (0, self.U.shape[1] - r))
        return y + (g @ self.U.T).to(y.dtype)


def inject_cores(
    model: nn.Module, bases: dict[str, tuple[torch.Tensor, torch.Tensor]], mode: str
) -> dict[str, CoreLinear]:
    """Wrap each slot's layer of `model` (in place) in a CoreLinear on its (U, V); refuse a slot the model
    lacks or whose shape differs from the basis (not the store's base model)."""
    layers: dict[str, CoreLinear] = {}
    for slot, (U, V) in sorted(bases.items()):
        parent_path, _, child = slot.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
            layer = getattr(parent, child)
        except AttributeError:
            raise SubspaceError(
                f"slot '{slot}' is not a module of the loaded {type(model).__name__}; is this the store's base "
                "model?"
            ) from None
        try:
            dims = linear_dims(layer)
        except TypeError:
            raise SubspaceError(
                f"slot '{slot}' is a {type(layer).__name__}, not a Linear-like layer"
            ) from None
        if dims != (U.shape[0], V.shape[0]):
            raise SubspaceError(
                f"slot '{slot}' is {dims} (out, in) in the base model but {(U.shape[0], V.shape[0])} in the store"
            )
        wrapper = CoreLinear(layer, U, V, mode)
        setattr(parent, child, wrapper)
        layers[slot] = wrapper
    return layers
