"""`full` output: base weights + merged delta, as a Hugging Face folder with sharded safetensors.

Dense by nature (W_base + U C_m V^T per module), but streamed: one base tensor is read at a time (lazily,
through Checkpoint) and one shard is held in memory at a time. The base's config, tokenizer, sentence-
transformers modules and other small files are copied so the folder loads as the base does; the base's model
card is replaced by one that describes the merge.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mergekit_subspace import __version__
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.io.checkpoint import SAFE_INDEX, Checkpoint
from mergekit_subspace.io.files import read_json, tensors_to_bytes
from mergekit_subspace.io.peft import PEFT_PREFIX
from mergekit_subspace.manage import CARD, card_text, hub_model_id

WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".ot",
    ".tflite",
)
_SKIP_NAMES = {SAFE_INDEX, "pytorch_model.bin.index.json", CARD}
ST_MODULES = "modules.json"  # sentence-transformers: the modules (subfolders) after the transformer


def _module_folders(folder: Path) -> set[str]:
    """Subfolders that sentence-transformers' modules.json names (1_Pooling, 2_Dense, ...): part of the model."""
    path = folder / ST_MODULES
    if not path.is_file():
        return set()
    modules = read_json(path)
    if not isinstance(modules, list):
        raise SubspaceError("must be a list of modules", path)
    return {str(m["path"]) for m in modules if isinstance(m, dict) and m.get("path")}


def _holds_weights(folder: Path) -> bool:
    return any(p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) for p in folder.rglob("*"))


def copy_model_files(base: Checkpoint, out: Path) -> list[str]:
    """Everything of the base folder but its weights and its model card: configs, tokenizer, generation
    config and sentence-transformers modules (1_Pooling/, 2_Dense/ with their own weights, which no merge
    changes). Other subfolders holding weights (onnx/, openvino/: exports of the unmerged base) and hidden
    files are left out, since they would not match the merged weights. Returns the copied paths."""
    modules = _module_folders(base.folder)
    copied = []
    for item in sorted(base.folder.iterdir()):
        if item.name.startswith("."):
            continue
        if item.is_dir():
            if item.name in modules or not _holds_weights(item):
                shutil.copytree(item, out / item.name)
                copied += sorted(str(p.relative_to(base.folder)) for p in item.rglob("*") if p.is_file())
        elif item.is_file() and item.name not in _SKIP_NAMES and not item.name.endswith(WEIGHT_SUFFIXES):
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
            # float32 is exact enough for a rank-r sum added once (float64 doubles the time of a 7B merge);
            # a float64 base stays float64
            work = torch.float64 if tensor.dtype == torch.float64 else torch.float32
            merged = tensor.to(work, copy=True)
            if transpose:
                merged.addmm_(A.T.to(work), B.T.to(work))
            else:
                merged.addmm_(B.to(work), A.to(work))
            tensor = merged.to(tensor.dtype)
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
        "base_model": str(base.folder),
        "shards": final_names,
        "copied_files": copied,
        "merged_modules": sorted(deltas),
        "heads": sorted(heads),
        "added_keys": sorted(set(heads) - set(base.keys())),
        "bytes": total,
    }


def _load_lines(folder: Path) -> list[str]:
    """Python that loads the folder: sentence-transformers when it has modules.json, else the architecture
    class its config.json names (AutoModel when it names none)."""
    if (folder / ST_MODULES).is_file():
        return [
            "from sentence_transformers import SentenceTransformer",
            "",
            'model = SentenceTransformer("path/to/this/folder")',
        ]
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    names = config.get("architectures") if isinstance(config, dict) else None
    cls = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else "AutoModel"
    return [f"from transformers import {cls}", "", f'model = {cls}.from_pretrained("path/to/this/folder")']


def merged_model_card(report: dict[str, Any], label: str, folder: Path) -> str:
    """README.md of the full merged model `label` in `folder`, from the merge report: what was merged, how,
    with what, and how to load it."""
    details = report["full"][label]
    base = details["base_model"]
    hub_id = hub_model_id(base)
    front: dict[str, Any] = {"base_model": hub_id, "base_model_relation": "merge"} if hub_id else {}
    front |= {"library_name": "transformers", "tags": ["merge", "mergekit-subspace", report["method"]]}
    per_task = {
        name: ", ".join(f"{key} {json.dumps(value)}" for key, value in params.items())
        for name, params in report["task_parameters"].items()
    }
    head = label if label != "merged" else report["output"].get("heads")
    recipe = report.get("recipe")
    rows = [
        ("base model", f"`{base}`" + ("" if hub_id else " (a local folder)")),
        (
            "tasks merged",
            ", ".join(f"`{name}` ({per_task[name]})" for name in report["tasks"]),
        ),
        ("method", f"`{report['method']}` ({report['reference']})"),
        ("parameters", f"`{json.dumps(report['parameters'], sort_keys=True)}`"),
        ("lambda", f"{report['lambda']:g} ({report['lambda_source']})"),
        ("head", f"task `{head}`'s" if head not in (None, "none") else "the base's"),
        ("tasks from", f"`{report['source']}`"),
        ("made with", f"`mergekit-subspace merge {recipe}`" if recipe else "`merge(...)` from Python"),
        ("tool", f"mergekit-subspace {__version__}"),
        ("weights", f"{len(details['shards'])} safetensors file(s), {details['bytes']:,} bytes"),
    ]
    intro = (
        f"The base model with {len(report['tasks'])} task(s) merged into its weights by mergekit-subspace "
        f"(`{report['method']}` on each layer's cores in a shared low-rank basis), as a plain Hugging Face "
        "model folder: it loads as the base does, without PEFT or mergekit-subspace. merge_report.json "
        "beside it has every number of the merge."
    )
    title = f"Merge of {', '.join(report['tasks'])}"
    return card_text(front, title, intro, rows, {}, _load_lines(folder))


def write_model_card(folder: Path, report: dict[str, Any], label: str) -> None:
    """Write README.md of the full model `label` into its (temporary) folder, after its files."""
    (folder / CARD).write_text(merged_model_card(report, label, folder), encoding="utf-8")
