"""Image-classification accuracy of a PEFT folder (or the base alone), loaded through PEFT as a user would.

Evaluation data is one safetensors file per task: ``pixel_values`` (N x C x H x W, already in the
model's input scale; float16 or float32) and ``labels`` (N, integer indices into the task's head).
An optional ``base_label_ids`` (K,) says which logits of the *base* model's own head correspond to
the task's K labels, so a base-only score is meaningful for tasks that are a subset of the base's
classes (without it, base-only needs a new, untrained head and scores about chance).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.eval.models import head_size

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ImageEval = dict[str, torch.Tensor]


def load_image_eval(path: str | Path, max_examples: int | None = None) -> ImageEval:
    """Read and check ``pixel_values`` / ``labels`` (and ``base_label_ids`` if present) before any model loads."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SubspaceError("evaluation data not found", path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SubspaceError(f"not a readable safetensors file ({exc})", path) from exc
    for name in ("pixel_values", "labels"):
        if name not in tensors:
            raise SubspaceError(f"no '{name}' tensor", path)
    pixels, labels = tensors["pixel_values"], tensors["labels"]
    if pixels.ndim != 4 or not pixels.is_floating_point():
        raise SubspaceError(
            f"'pixel_values' must be a float N x C x H x W tensor, got {tuple(pixels.shape)}", path
        )
    if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise SubspaceError("'labels' must be a 1-D integer tensor", path)
    if labels.shape[0] != pixels.shape[0]:
        raise SubspaceError(f"{pixels.shape[0]} images but {labels.shape[0]} labels", path)
    if labels.shape[0] == 0:
        raise SubspaceError("evaluation set is empty", path)
    if int(labels.min()) < 0:
        raise SubspaceError("labels must be >= 0", path)
    data: ImageEval = {"pixel_values": pixels.float(), "labels": labels.long()}
    if "base_label_ids" in tensors:
        ids = tensors["base_label_ids"].long()
        if ids.ndim != 1 or int(labels.max()) >= ids.shape[0]:
            raise SubspaceError("'base_label_ids' must be 1-D with one entry per task label", path)
        data["base_label_ids"] = ids
    if max_examples is not None:
        data["pixel_values"] = data["pixel_values"][:max_examples]
        data["labels"] = data["labels"][:max_examples]
    return data


def load_image_classifier(
    base: str | Path, adapter_dir: str | Path | None, num_labels: int | None = None
) -> torch.nn.Module:
    """Base image classifier (+ PEFT adapter; its head comes from ``modules_to_save``).

    The head size is the adapter's; a base whose own head has another size gets a fresh head of
    the right size (``ignore_mismatched_sizes``) which the adapter's saved head then replaces.
    """
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    labels = num_labels or (head_size(adapter_dir) if adapter_dir is not None else None)
    kwargs = {} if labels is None else {"num_labels": labels, "ignore_mismatched_sizes": True}
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected: the adapter brings it
    try:
        model = AutoModelForImageClassification.from_pretrained(str(base), **kwargs)
    finally:
        hf_logging.set_verbosity(old)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


@torch.no_grad()
def image_classification_accuracy(
    base: str | Path,
    adapter_dir: str | Path | None,
    data: ImageEval | str | Path,
    num_labels: int | None = None,
    batch_size: int = 256,
    model: torch.nn.Module | None = None,
) -> float:
    """Fraction of images whose argmax logit is the label.

    Where the base's own head scores (no adapter, or an adapter without a saved head, and no
    `num_labels`), data with ``base_label_ids`` reads the base head's logits of the task's classes only;
    otherwise the head is the adapter's (or a fresh one). `model`, when given, is `base` + `adapter_dir`
    already loaded.
    """
    if not isinstance(data, dict):
        data = load_image_eval(data)
    pixels, labels = data["pixel_values"], data["labels"]
    own_head = num_labels is not None or (adapter_dir is not None and head_size(adapter_dir) is not None)
    restrict = None if own_head else data.get("base_label_ids")
    if model is None:
        model = load_image_classifier(base, adapter_dir, None if restrict is not None else num_labels)
    correct = 0
    for start in range(0, labels.shape[0], batch_size):
        logits = model(pixel_values=pixels[start : start + batch_size]).logits
        if restrict is not None:
            logits = logits[:, restrict]
        correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    return correct / labels.shape[0]
