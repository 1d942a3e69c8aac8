"""`full` output: base weights + merged delta, as a Hugging Face folder with sharded safetensors.

Dense by nature (W_base + U C_m V^T per module), but streamed: one base tensor is read at a time (lazily,
through Checkpoint) and one shard is held in memory at a time. The base's config, tokenizer and other small
files are copied so the folder loads with from_pretrained as it is.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.io.checkpoint import SAFE_INDEX, Checkpoint
from mergekit_subspace.io.files import tensors_to_bytes
from mergekit_subspace.io.peft import PEFT_PREFIX

_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_SKIP_NAMES = {SAFE_INDEX, "pytorch_model.bin.index.json"}


def copy_model_files(base: Checkpoint, out: Path) -> list[str]:
    """Config, tokenizer and generation files of the base (never its weights)."""
    copied = []
    for item in sorted(base.folder.iterdir()):
        if item.is_file() and item.name not in _SKIP_NAMES and not item.name.endswith(_SKIP_SUFFIXES):
            shutil.copy2(item, out / item.name)
            copied.append(item.name)
    return copied


def resolve_deltas(
    base: Checkpoint, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], fan_in_fan_out: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    """Checkpoint key -> (B, A, transpose) for each merged module; checked before anything is written."""
    resolved = {}
    for module, (B, A) in factors.items():
        key = base.resolve_module(module)
        if key is None:
            raise SubspaceError(f"module '{module}' does not exist in the base model", base.folder)
        shape = tuple(base.shapes[key])
        out_in = (int(B.shape[0]), int(A.shape[1]))
        transpose = fan_in_fan_out and shape == out_in[::-1]
        if shape != out_in[::-1] if transpose else shape != out_in:
            raise SubspaceError(
                f"merged delta of '{module}' is {out_in} (out, in) but the base weight '{key}' is {shape}",
                base.folder,
            )
        resolved[key] = (B, A, transpose)
    return resolved


def resolve_heads(base: Checkpoint, extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Head tensors (modules_to_save) under the base's key names; new keys keep their model path."""
    heads = {}
    for peft_key, tensor in extras.items():
        plain = peft_key[len(PEFT_PREFIX) :] if peft_key.startswith(PEFT_PREFIX) else peft_key
        plain = plain.replace(".modules_to_save.default.", ".")
        key = base.resolve_key(plain)
        if key is not None and tuple(base.shapes[key]) != tuple(tensor.shape):
            raise SubspaceError(
                f"head '{peft_key}' is {tuple(tensor.shape)} but the base's '{key}' is {tuple(base.shapes[key])}",
                base.folder,
            )
        heads[key or plain] = tensor
    return heads


def _merged_tensors(
    base: Checkpoint,
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor, bool]],
    heads: dict[str, torch.Tensor],
) -> Iterator[tuple[str, torch.Tensor]]:
    for key in base.keys():
        if key in heads:
            yield key, heads[key].to(base.tensor(key).dtype)
            continue
        tensor = base.tensor(key)
        if key in deltas:
            B, A, transpose = deltas[key]
            delta = B.to(torch.float64) @ A.to(torch.float64)
            tensor = (tensor.to(torch.float64) + (delta.T if transpose else delta)).to(tensor.dtype)
        yield key, tensor
    for key in sorted(set(heads) - set(base.keys())):
        yield key, heads[key]


def write_full_model(
    out: Path,
    base: Checkpoint,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    extras: dict[str, torch.Tensor],
    fan_in_fan_out: bool,
    max_shard_bytes: int,
) -> dict[str, object]:
    """Write the merged model into the (temporary) folder `out`; returns what the report records."""
    deltas = resolve_deltas(base, factors, fan_in_fan_out)
    heads = resolve_heads(base, extras)
    out.mkdir(parents=True, exist_ok=True)
    copied = copy_model_files(base, out)
    shards: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0
    names: list[str] = []
    total = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            temp = f"shard-{len(names):05d}.tmp"
            (out / temp).write_bytes(tensors_to_bytes(current, metadata={"format": "pt"}))
            names.append(temp)
            shards.append({key: torch.empty(0) for key in current})
            current, size = {}, 0

    for key, tensor in _merged_tensors(base, deltas, heads):
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[key] = tensor
        size += nbytes
        total += nbytes
    flush()
    weight_map = {}
    final_names = []
    for index, (temp, keys) in enumerate(zip(names, shards, strict=True), start=1):
        final = (
            "model.safetensors" if len(names) == 1 else f"model-{index:05d}-of-{len(names):05d}.safetensors"
        )
        (out / temp).rename(out / final)
        final_names.append(final)
        weight_map.update({key: final for key in keys})
    if len(names) > 1:
        index_doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / SAFE_INDEX).write_text(json.dumps(index_doc, indent=2) + "\n", encoding="utf-8")
    return {
        "shards": final_names,
        "copied_files": copied,
        "merged_modules": sorted(deltas),
        "heads": sorted(heads),
        "added_keys": sorted(set(heads) - set(base.keys())),
        "bytes": total,
    }
