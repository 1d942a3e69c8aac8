"""Calibration: the inputs each adapted module sees on real texts, so a budget spends bytes on output error.

The weight error ||D - U C V^T|| treats every input direction alike, but the model only feels the output
error ||(D - U C V^T) X^T|| on the inputs X a module really receives, and those are far from isotropic. With
`subspace.calibration` a budget or target runs the base model once over the calibration texts and keeps, per
adapted module, a uniform sample of at most `max_rows` token rows of its input (padding excluded; modules
fed the same tensor, such as query/key/value, share one sample). Each slot's curve then measures every step
(k_out, k_in) by the output energy it keeps on those rows, so `budget.allocate` gives bytes to the slots
whose outputs gain most (docs/math.md, "Calibration"). The rows are scaled to mean squared norm n, which
makes the output energy of isotropic inputs equal the weight energy: only the inputs' shape moves bytes.

For a task's delta D = B A (scale folded into A) stored at the prefix sizes (a, b) as U_a P V_b^T with
P = (U_a^T B)(A V_b), and N sample rows X:

    ||D X^T - U_a P V_b^T X^T||^2 = E - 2 <(U_a^T B) Y, P Z_b> + ||P Z_b||^2,

with Y = A X^T (r x N), Z_b = V_b^T X^T and E = ||B Y||^2 (U has orthonormal columns). Everything is
r x N, k x N or smaller: no m x n matrix is formed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from mergekit_subspace import hub
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.lowrank import COMPUTE_DTYPE, LowRankDelta
from mergekit_subspace.recipe import CalibrationSettings

if TYPE_CHECKING:
    from mergekit_subspace.sources import TaskSource
    from mergekit_subspace.subspace import SubspaceStore

SEED = 0
_TASK_KINDS = {"CAUSAL_LM": "causal", "SEQ_CLS": "classify"}
Inputs = dict[str, torch.Tensor]  # slot -> sample of its input rows (N x n), float32


def read_texts(path: str | Path) -> list[str]:
    """The calibration texts: `{"text": ...}` JSONL lines, or one text per line of any other file."""
    path = Path(path)
    if not path.is_file():
        raise SubspaceError("calibration data not found", path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SubspaceError(f"calibration data cannot be read as UTF-8 text ({exc})", path) from None
    texts: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SubspaceError(f"line {number} is not JSON ({exc.msg})", path) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise SubspaceError(f'line {number} has no string field "text"', path)
            line = record["text"]
        texts.append(line)
    if not texts:
        raise SubspaceError("calibration data holds no text", path)
    return texts


def base_folder(tasks: Sequence[TaskSource], base_model: str | None) -> Path:
    """The base model to run: the recipe's `base_model`, else the one the adapters name."""
    named = base_model or next(
        (str(b) for t in tasks if (b := t.peft_config.get("base_model_name_or_path"))), None
    )
    if not named:
        raise SubspaceError(
            "subspace.calibration runs the base model: set `base_model:` in the recipe (the adapters name none)"
        )
    folder = hub.resolve(named)
    if not (folder / "config.json").is_file():
        raise SubspaceError("subspace.calibration needs the base model, but this is no model folder", folder)
    return folder


def model_kind(tasks: Sequence[TaskSource]) -> str:
    """Causal LM or sequence classifier, from the tasks' PEFT task_type (a classifier when none says)."""
    kinds = {_TASK_KINDS.get(t.peft_config.get("task_type") or "", "classify") for t in tasks}
    return "causal" if kinds == {"causal"} else "classify"


class _RowSample:
    """A uniform sample of at most `limit` rows from a stream of row blocks (bottom-k of random keys)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.rows: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None

    def offer(self, rows: torch.Tensor, keys: torch.Tensor) -> None:
        if self.rows is not None and self.keys is not None:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        if keys.numel() > self.limit:
            keep = torch.topk(keys, self.limit, largest=False).indices
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = rows, keys


def capture_inputs(
    settings: CalibrationSettings,
    base: str | Path,
    kind: str,
    modules: Iterable[str],
    device: str = "cpu",
    progress: bool = True,
) -> Inputs:
    """Run the base model over the calibration texts and keep a sample of each module's input rows."""
    from mergekit_subspace.serve.loading import load_base, load_tokenizer

    texts = read_texts(settings.data)
    model = load_base(base, kind).to(device)  # type: ignore[arg-type]
    tokenizer = load_tokenizer(base, kind)  # type: ignore[arg-type]
    modules = sorted(set(modules))
    group_of: dict[str, str] = {}  # module -> the first module seen with the same input tensor
    samples: dict[str, _RowSample] = {}
    batch: dict[str, Any] = {}
    generator = torch.Generator().manual_seed(SEED)

    def hook(name: str):
        def record(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            group = batch["seen"].setdefault(id(x), name)
            group_of.setdefault(name, group)
            if group != name:
                return
            rows = x.reshape(-1, x.shape[-1])[batch["mask"]].detach().to("cpu", COMPUTE_DTYPE)
            samples.setdefault(name, _RowSample(settings.max_rows)).offer(rows, batch["keys"])

        return record

    handles = []
    try:
        for name in modules:
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                raise SubspaceError(f"the base model has no module '{name}' to calibrate", base) from None
            handles.append(layer.register_forward_pre_hook(hook(name)))
        starts = range(0, len(texts), settings.batch_size)
        with torch.inference_mode():
            for start in tqdm(starts, desc="calibrate", disable=None if progress else True, leave=False):
                encoded = tokenizer(
                    texts[start : start + settings.batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=settings.max_length,
                )
                mask = encoded["attention_mask"].reshape(-1).bool()
                batch.update(seen={}, mask=mask, keys=torch.rand(int(mask.sum()), generator=generator))
                model(**{k: v.to(device) for k, v in encoded.items()})
    finally:
        for handle in handles:
            handle.remove()
    missing = [m for m in modules if m not in group_of]
    if missing:
        raise SubspaceError(f"module '{missing[0]}' saw no input on the calibration texts", settings.data)
    return {m: samples[group_of[m]].rows for m in modules}  # type: ignore[misc]


def output_shares(
    deltas: Iterable[LowRankDelta],
    U: torch.Tensor,
    V: torch.Tensor,
    rows: torch.Tensor,
    sizes: Sequence[tuple[int, int]],
    normalize: bool,
) -> tuple[dict[tuple[int, int], float], float]:
    """Per step (k_out, k_in), the share of the slot's weighted output energy on `rows` that the prefix
    bases keep, and that energy. The rows are scaled to mean squared norm n (the input width), so for
    isotropic inputs the output energy equals the weight energy the fit weighs (1/||D_i||^2 per task when
    `normalize`): calibration only moves bytes toward the input directions the model really uses."""
    n = rows.shape[1]
    X = rows.to(U.device, COMPUTE_DTYPE)
    scale_sq = float(torch.sum(X**2))
    X = X * (0.0 if scale_sq <= 0 else (n / scale_sq) ** 0.5)
    Z = V.to(COMPUTE_DTYPE).T @ X.T  # k_in x N
    U = U.to(COMPUTE_DTYPE)
    kept = dict.fromkeys(sizes, 0.0)
    total = 0.0
    for delta in deltas:
        B = delta.B.to(U.device, COMPUTE_DTYPE)
        A = delta.A.to(U.device, COMPUTE_DTYPE) * delta.scale
        norm_sq = delta.norm_sq()
        if norm_sq <= 0:
            continue
        weight = 1.0 / norm_sq if normalize else 1.0
        Y = A @ X.T  # r x N
        energy = float(torch.sum((B @ Y) ** 2))
        UB, AV = U.T @ B, A @ V.to(COMPUTE_DTYPE)  # k_out x r, r x k_in
        UBY = UB @ Y  # k_out x N
        for a, b in sizes:
            PZ = (UB[:a] @ AV[:, :b]) @ Z[:b]
            err = energy - 2.0 * float(torch.sum(UBY[:a] * PZ)) + float(torch.sum(PZ**2))
            kept[(a, b)] += weight * (energy - max(err, 0.0))
        total += weight * energy
    return {size: (0.0 if total <= 0 else k / total) for size, k in kept.items()}, total


def store_output_error(store: SubspaceStore, tasks: Sequence[TaskSource], inputs: Inputs) -> float:
    """Mean over tasks of each task's relative output error on the calibration rows, as stored."""
    errors = []
    for task in tasks:
        stored = store.task_factors(task.name)
        err = energy = 0.0
        for module, (B_hat, A_hat) in stored.items():
            if module not in inputs:
                continue
            X = inputs[module].to(COMPUTE_DTYPE)
            delta = task.slots[module]
            exact = delta.B.to(COMPUTE_DTYPE) @ ((delta.A.to(COMPUTE_DTYPE) * delta.scale) @ X.T)
            approx = B_hat.to(COMPUTE_DTYPE) @ (A_hat.to(COMPUTE_DTYPE) @ X.T)
            err += float(torch.sum((exact - approx) ** 2))
            energy += float(torch.sum(exact**2))
        errors.append(0.0 if energy <= 0 else (err / energy) ** 0.5)
    return sum(errors) / max(len(errors), 1)
