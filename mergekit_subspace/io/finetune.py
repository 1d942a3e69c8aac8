"""Full fine-tunes as tasks: per-module deltas against the base, truncated to low rank, the rest kept verbatim.

Matrices become LowRankDelta slots (truncated SVD to `max_rank`, energy dropped reported). Biases of those
matrices become PEFT `lora_B.bias` tensors (lora_bias=True); any other changed or new module (norms, heads,
embeddings) is kept whole and restored through PEFT's modules_to_save, so the reconstructed adapter is a real
PEFT folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.io.checkpoint import Checkpoint
from mergekit_subspace.io.files import sha256_bytes, sha256_file
from mergekit_subspace.io.peft import PEFT_PREFIX
from mergekit_subspace.lowrank import LowRankDelta


@dataclass
class FinetuneDelta:
    """A fine-tune expressed as factored slots plus PEFT-keyed extras."""

    path: Path
    slots: dict[str, LowRankDelta]
    extras: dict[str, torch.Tensor]
    energy_dropped: float
    modules_to_save: list[str]
    lora_bias: bool
    source_sha256: str
    source_bytes: int
    dtype: str
    slot_energy_dropped: dict[str, float] = field(default_factory=dict)


def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else key


def _is_low_rank_candidate(key: str, tensor: torch.Tensor) -> bool:
    # Embeddings are looked up by row, not multiplied: PEFT's LoRA slot for them has another layout.
    return tensor.ndim == 2 and key.endswith(".weight") and "embed" not in key.lower()


def read_finetune(
    folder: str | Path, base: Checkpoint, max_rank: int, allow_pickle: bool = False, progress: bool = True
) -> FinetuneDelta:
    """Compare a fine-tuned model folder with the base, tensor by tensor, reading one pair at a time."""
    folder = Path(folder)
    tuned = Checkpoint(folder, allow_pickle=allow_pickle)
    slots: dict[str, LowRankDelta] = {}
    dropped: dict[str, float] = {}
    norms: dict[str, float] = {}
    changed_params: dict[str, str] = {}  # tuned key -> reason
    weight_dtype = torch.float32
    for key in tqdm(tuned.keys(), desc=f"fine-tune {folder.name}", disable=None if progress else True):
        tensor = tuned.tensor(key)
        if not tensor.is_floating_point():
            continue
        base_key = base.resolve_key(key)
        if base_key is None or base.shapes[base_key] != tuple(tensor.shape):
            changed_params[key] = "new"
            continue
        reference = base.tensor(base_key)
        if torch.equal(tensor, reference.to(tensor.dtype)):
            continue
        diff = tensor.to(torch.float64) - reference.to(torch.float64)
        if _is_low_rank_candidate(key, tensor):
            module = key[: -len(".weight")]
            slots[module], dropped[module] = LowRankDelta.from_dense(diff, max_rank)
            norms[module] = float(torch.sum(diff * diff))
            weight_dtype = tensor.dtype
        else:
            changed_params[key] = "changed"
    if not slots and not changed_params:
        raise SubspaceError("is identical to the base model: nothing to store", folder)

    extras: dict[str, torch.Tensor] = {}
    whole_modules: set[str] = set()
    lora_bias = False
    for key in changed_params:
        module = _module_of(key)
        if module in slots and key.endswith(".bias"):
            base_bias = base.tensor(base.resolve_key(key) or key)
            extras[f"{PEFT_PREFIX}{module}.lora_B.bias"] = tuned.tensor(key) - base_bias.to(
                tuned.tensor(key).dtype
            )
            lora_bias = True
        else:
            whole_modules.add(module)
    if (
        lora_bias
    ):  # PEFT gives every LoRA layer a bias then: write the zero ones too, so the folder is complete
        for module in slots:
            key = f"{PEFT_PREFIX}{module}.lora_B.bias"
            if key not in extras and f"{module}.bias" in tuned.shapes:
                extras[key] = torch.zeros(tuned.shapes[f"{module}.bias"], dtype=weight_dtype)
    for module in sorted(whole_modules):
        if module in slots:
            raise SubspaceError(
                f"module '{module}' has both a low-rank weight change and another changed parameter; "
                "this cannot be written as one PEFT adapter",
                folder,
            )
        for key in tuned.keys():
            if _module_of(key) == module:
                extras[f"{PEFT_PREFIX}{key}"] = tuned.tensor(key)

    total = sum(norms.values())
    energy_dropped = 0.0 if total == 0 else sum(dropped[m] * norms[m] for m in slots) / total
    digest = sha256_bytes("".join(sha256_file(f) for f in tuned.weight_files).encode())
    return FinetuneDelta(
        path=folder,
        slots=slots,
        extras=extras,
        energy_dropped=energy_dropped,
        modules_to_save=sorted(whole_modules),
        lora_bias=lora_bias,
        source_sha256=digest,
        source_bytes=tuned.bytes_on_disk(),
        dtype=str(weight_dtype).removeprefix("torch."),
        slot_energy_dropped=dropped,
    )
