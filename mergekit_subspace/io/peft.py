"""Read and write PEFT LoRA folders (adapter_config.json + adapter_model.safetensors) in their real format.

Reading keeps every tensor that is not a plain 2-D lora_A/lora_B pair (classifier heads from modules_to_save,
lora_B biases, embedding or conv LoRAs) verbatim, so nothing the user trained is lost.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.io.files import (
    atomic_directory,
    json_bytes,
    load_pickle_weights,
    load_safetensors,
    read_json,
    sha256_bytes,
    tensors_to_bytes,
)
from mergekit_subspace.lowrank import LowRankDelta

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_LORA_BIAS_KEY = re.compile(r"^(?P<module>.+)\.lora_B(?:\.[^.]+)?\.bias$")
# PEFT variants whose delta is not D = s * B @ A on the weight: refusing them beats a silently wrong store.
_REFUSED_FLAGS = {
    "use_dora": "DoRA (use_dora: true) rescales weight columns by a learned magnitude",
    "use_qalora": "QALoRA (use_qalora: true) pools inputs before lora_A",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens) only acts after its invocation tokens",
    "use_bdlora": "BD-LoRA (use_bdlora) uses block-diagonal factors",
}


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter as factored slots plus every other tensor kept as it was."""

    path: Path
    config: dict[str, Any]
    slots: dict[str, LowRankDelta]
    extras: dict[str, torch.Tensor]
    alphas: dict[str, float]
    dtype: str
    source_sha256: str
    source_bytes: int
    files: list[str] = field(default_factory=list)

    @property
    def ranks(self) -> dict[str, int]:
        return {module: delta.rank for module, delta in self.slots.items()}


def module_path(key_module: str) -> str:
    """Model-relative module path: PEFT saves keys under 'base_model.model.'."""
    return key_module[len(PEFT_PREFIX) :] if key_module.startswith(PEFT_PREFIX) else key_module


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """Look a module up in rank_pattern / alpha_pattern the way PEFT does (exact or '.'-suffix regex)."""
    for key in patterns:
        if key == module or re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _validate_config(config: Any, path: Path) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise SubspaceError("is not a JSON object", path)
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise SubspaceError("has no 'peft_type'; not a PEFT adapter config", path)
    if str(peft_type).upper() != "LORA":
        raise SubspaceError(
            f"is a {peft_type} adapter; only LoRA adapters (peft_type LORA) are supported", path
        )
    for flag, why in _REFUSED_FLAGS.items():
        if config.get(flag):
            raise SubspaceError(f"is not a plain LoRA: {why}, so it cannot be stored as B @ A", path)
    return config


def _read_weights(folder: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], Path]:
    safe = folder / WEIGHTS_NAME
    if safe.is_file():
        return load_safetensors(safe), safe
    pickled = folder / PICKLE_WEIGHTS_NAME
    if pickled.is_file():
        return load_pickle_weights(pickled, allow_pickle), pickled
    raise SubspaceError(f"no {WEIGHTS_NAME} (or {PICKLE_WEIGHTS_NAME}) in the adapter folder", folder)


def read_lora_adapter(folder: str | Path, allow_pickle: bool = False) -> LoraAdapter:
    """Parse a PEFT LoRA folder into factored slots with their true scales (rsLoRA and alpha_pattern applied)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SubspaceError("adapter folder not found", folder)
    config_path = folder / CONFIG_NAME
    config = _validate_config(read_json(config_path), config_path)
    tensors, weights_path = _read_weights(folder, allow_pickle)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None or tensor.ndim != 2:
            extras[key] = tensor
            continue
        pairs.setdefault(module_path(match["module"]), {})[match["side"]] = tensor
    if not pairs:
        raise SubspaceError("holds no lora_A / lora_B weights", weights_path)

    rslora = bool(config.get("use_rslora", False))
    default_alpha = float(config.get("lora_alpha", config.get("r", 8)))
    alpha_pattern = config.get("alpha_pattern") or {}
    slots: dict[str, LowRankDelta] = {}
    alphas: dict[str, float] = {}
    dtypes: set[torch.dtype] = set()
    for module in sorted(pairs):
        sides = pairs[module]
        if set(sides) != {"A", "B"}:
            missing = "lora_B" if "B" not in sides else "lora_A"
            raise SubspaceError(f"module '{module}' has no {missing} weight", weights_path)
        A, B = sides["A"], sides["B"]
        if A.shape[0] != B.shape[1]:
            raise SubspaceError(
                f"module '{module}': lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} have different ranks",
                weights_path,
            )
        alpha = float(pattern_value(alpha_pattern, module, default_alpha))
        alphas[module] = alpha
        slots[module] = LowRankDelta(B=B, A=A, scale=lora_scale(alpha, int(A.shape[0]), rslora))
        dtypes.update((A.dtype, B.dtype))

    # PEFT scales lora_B's bias with alpha / r like the rest of the branch; written back at scale 1, it must
    # carry that scale itself
    for key in list(extras):
        bias = _LORA_BIAS_KEY.match(key)
        if bias is not None and module_path(bias["module"]) in slots:
            extras[key] = extras[key] * slots[module_path(bias["module"])].scale

    config_bytes = config_path.read_bytes()
    weight_bytes = weights_path.read_bytes()
    return LoraAdapter(
        path=folder,
        config=config,
        slots=slots,
        extras=extras,
        alphas=alphas,
        dtype=str(sorted(dtypes, key=str)[0]).removeprefix("torch."),
        source_sha256=sha256_bytes(sha256_bytes(config_bytes).encode() + sha256_bytes(weight_bytes).encode()),
        source_bytes=len(config_bytes) + len(weight_bytes),
        files=[CONFIG_NAME, weights_path.name],
    )


def lora_state_key(module: str, side: str) -> str:
    return f"{PEFT_PREFIX}{module}.lora_{side}.weight"


def write_lora_adapter(
    out: str | Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    extras: dict[str, torch.Tensor],
    config: dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write a PEFT folder atomically: `factors` maps module path -> (B, A) with the scale already folded in.

    Ranks may differ by module; the most common rank becomes `r` and the others go to rank_pattern, with
    alpha equal to the rank everywhere so that PEFT's scale is exactly 1.
    """
    out = Path(out)
    ranks = {module: int(A.shape[0]) for module, (_, A) in factors.items()}
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    main_rank = max(sorted(counts), key=lambda r: counts[r]) if counts else 1
    pattern = {module: rank for module, rank in sorted(ranks.items()) if rank != main_rank}

    written = dict(config)
    written.update(
        r=main_rank,
        lora_alpha=main_rank,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        use_rslora=False,
        use_dora=False,
        target_modules=sorted(factors),
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
        peft_type="LORA",
    )
    tensors: dict[str, torch.Tensor] = dict(extras)
    for module, (B, A) in factors.items():
        tensors[lora_state_key(module, "A")] = A
        tensors[lora_state_key(module, "B")] = B
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / CONFIG_NAME).write_bytes(json_bytes(written))
        (tmp / WEIGHTS_NAME).write_bytes(tensors_to_bytes(tensors, metadata={"format": "pt"}))
    return out
