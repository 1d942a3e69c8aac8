"""One evaluator per eval type, all scoring a PEFT folder loaded through PEFT (or the bare base)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergekit_subspace.bench.recipe import EvalSpec
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.eval.models import head_size


def eval_path(spec: EvalSpec, task: str) -> Path:
    return Path(spec.data.format(task=task))


def load_task_data(spec: EvalSpec, task: str, source: str | Path) -> Any:
    """Read and check a task's evaluation data; raises before any fitting starts."""
    path = eval_path(spec, task)
    if spec.type == "sequence_classification":
        from mergekit_subspace.eval.data import load_classification_jsonl

        return load_classification_jsonl(path, spec.max_examples, num_labels=head_size(source))
    if spec.type == "causal_lm_exact_match":
        from mergekit_subspace.eval.data import load_exact_match_jsonl

        return load_exact_match_jsonl(path, spec.max_examples)
    if spec.type == "image_classification":
        from mergekit_subspace.eval.image import load_image_eval

        if not path.is_file():
            raise SubspaceError("evaluation data not found", path)
        return load_image_eval(path, spec.max_examples)
    raise SubspaceError(f"unknown eval type '{spec.type}'")


def scorer(spec: EvalSpec, base: str | Path) -> Callable[[Path | None, Any, int | None], float]:
    """A function (adapter_dir or None, data, num_labels) -> accuracy for this eval type."""
    if spec.type == "sequence_classification":
        from mergekit_subspace.eval.metrics import classification_accuracy

        return lambda adapter, data, labels: classification_accuracy(
            base, adapter, data, num_labels=labels, batch_size=spec.batch_size
        )
    if spec.type == "causal_lm_exact_match":
        from mergekit_subspace.eval.metrics import exact_match_accuracy

        return lambda adapter, data, labels: exact_match_accuracy(
            base, adapter, data, batch_size=spec.batch_size
        )
    from mergekit_subspace.eval.image import image_classification_accuracy

    return lambda adapter, data, labels: image_classification_accuracy(base, adapter, data, num_labels=labels)
