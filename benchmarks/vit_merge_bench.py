"""Frozen-head ViT merge benchmark: the heads are shared, so only the merged LoRA deltas differ between methods.

Protocol (issue 14):
- the frozen-head ViT zoo (`benchmarks/zoos/vit_frozen.py`): 16 q/v LoRAs of one tiny ViT, each a 5-way task
  (Fashion-MNIST or MNIST under a rotation, flip or inversion) trained against one frozen 20-way head; no
  adapter has a head, so a task's own adapter, every merge and the base alone are scored with the same rows of
  the same head (the task's ``base_label_ids``);
- each task's eval file is split per class: the first --val images of every class for validation, the rest
  for test;
- subsets of T = 2, 4, 8 tasks drawn at random (seeded) from the zoo; every method merges a subset's adapters
  into one delta, written as one PEFT folder, and every task of the subset is scored with that folder, loaded
  through PEFT (`headless_merge_bench.score_row`, the same code as the decoder bench);
- methods: the plain mean (lambda 1), every method of our registry, mergekit 0.1.5 (task_arithmetic, ties,
  dare_ties, breadcrumbs, della, on W_base + D_i) and PEFT `add_weighted_adapter` (cat, svd, ties_svd), all
  from `headless_merge_bench.plans`; lambda chosen on validation over one grid by one code path for all;
- *ours auto*: the choice `merge_method: auto` makes, from the same validation scores with the library's
  rule (`select.choose_method`: best mean validation score at its own best lambda, over every registered
  method that ran);
- *ours auto + task weights*: the library's own validation path run whole in one fresh process
  (`merge_method: auto` on the validation split written as image files, then `validation.task_weight_grid`:
  each task's weight times 0, 0.5 or 2, kept where the mean validation score rises), scored on the test split;
- normalized accuracy = merged test accuracy / the task's own adapter's test accuracy; mean and worst task;
- seconds and peak RSS of each merge in one fresh interpreter per tool, at lambda 1.

Run from the repository root:  python -m benchmarks.vit_merge_bench [--zoo DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import headless_merge_bench as headless
from benchmarks import merge_peers
from benchmarks.merge_bench import DENSITY
from benchmarks.zoos._common import atomic_write_text, quiet_hf

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_ZOO = "benchmarks/cache/vit-frozen"
DEFAULT_OUT = "benchmarks/results/merge-vit-frozen"
DEFAULT_GRID = (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0)  # T = 8 task arithmetic sits near 1/8
DEFAULT_VAL = 40  # validation images per class; the rest of the eval file is the test split
SUBSETS_PER_SIZE = {2: 3, 4: 3, 8: 2}
MODULE = "benchmarks.vit_merge_bench"  # what the worker processes import
AUTO_LABEL = "ours auto (best on validation)"


# ---------------------------------------------------------------------------------------------- workers


TUNED_LABEL = "ours auto + task weights (library, on validation)"
TASK_WEIGHT_GRID = (0.0, 0.5, 2.0)  # each task's weight times one of these, after auto's method and lambda


def worker_tuned(job: dict[str, Any]) -> dict[str, Any]:
    """The library's whole validation path: `merge_method: auto` over every registered method and the lambda
    grid on the image validation files, then `validation.task_weight_grid`; one head-less folder."""
    from mergekit_subspace.merge import merge

    with quiet_hf():
        result = merge(
            {
                "merge_method": "auto",
                "adapters": job["adapters"],
                "base_model": job["base"],
                "parameters": {"density": DENSITY},
                "tasks": [{"name": name, "validation": path} for name, path in job["validation"].items()],
                "validation": {
                    "lambda_grid": job["grid"],
                    "max_examples": None,
                    "task_weight_grid": list(TASK_WEIGHT_GRID),
                },
                "output": {"path": job["out"], "heads": "none"},
            },
            progress=False,
        )
    (folder,) = result.folders.values()
    report = result.report
    return {
        "merge_s": report["seconds"]["merge"],
        "end_to_end_s": report["seconds"]["total"],
        "phases": report["seconds"],
        "folder": str(folder),
        "chosen": report["method"],
        "lambda": report["lambda"],
        "task_weights": report["validation"]["task_weights"],
    }


WORKERS = {
    "ours": headless.WORKERS["ours"],
    "mergekit": headless.WORKERS["mergekit"],
    "peft": headless._guarded(headless.peft_worker("AutoModelForImageClassification")),
    "tuned": headless._guarded(worker_tuned),
}


def worker_main(job_path: str) -> None:
    import torch

    torch.set_num_threads(headless.THREADS)
    merge_peers.worker_loop(json.loads(Path(job_path).read_text()), WORKERS)


# ----------------------------------------------------------------------------------------- evaluation


def split_per_class(path: Path, val_per_class: int) -> dict[str, Any]:
    """The eval file's images as validation (first `val_per_class` of each class) and test (the rest)."""
    import torch

    from mergekit_subspace.eval.image import load_image_eval

    data = load_image_eval(path)
    if "base_label_ids" not in data:
        raise SystemExit(f"{path}: no base_label_ids; build the zoo with benchmarks.zoos.vit_frozen")
    labels = data["labels"]
    val = torch.zeros_like(labels, dtype=torch.bool)
    for label in labels.unique():
        val[torch.nonzero(labels == label).flatten()[:val_per_class]] = True
    if bool(val.all()):
        raise SystemExit(f"{path}: --val {val_per_class} per class leaves no test images")
    pick = lambda mask: (data["pixel_values"][mask], labels[mask])  # noqa: E731
    return {"val": pick(val), "test": pick(~val), "label_ids": data["base_label_ids"]}


class ImageEvaluator(headless.Evaluator):
    """The base ViT in memory; each folder is loaded once through PEFT and scored on the frozen head's rows of
    each task's classes.  `tune` (lambda on validation, test at that lambda) is the decoder bench's."""

    def __init__(self, base: str, eval_files: dict[str, Path], val_per_class: int) -> None:
        from mergekit_subspace.eval.image import load_image_classifier

        self.base = base
        self.data = {task: split_per_class(path, val_per_class) for task, path in eval_files.items()}
        with quiet_hf():
            self.model = load_image_classifier(base, None)

    def _score(self, model: Any, task: str, split: str) -> float:
        import torch

        pixels, labels = self.data[task][split]
        with torch.inference_mode():
            logits = model(pixel_values=pixels).logits[:, self.data[task]["label_ids"]]
        return float((logits.argmax(-1) == labels).float().mean())

    def scores(
        self, folder: Path | None, tasks: list[str], split: str, grid: list[float]
    ) -> dict[str, list[float]]:
        """Per task, accuracy at each lambda of the grid (folder None: the base alone)."""
        from peft import PeftModel

        from mergekit_subspace.merge.select import set_lora_scale

        if folder is None:
            return {t: [self._score(self.model, t, split)] for t in tasks}
        with quiet_hf():
            model = PeftModel.from_pretrained(copy.deepcopy(self.model), str(folder)).eval()
        out: dict[str, list[float]] = {t: [] for t in tasks}
        for value in grid:
            set_lora_scale(model, value)
            for task in tasks:
                out[task].append(self._score(model, task, split))
        return out

    def sizes(self, task: str) -> dict[str, int]:
        return {split: len(self.data[task][split][1]) for split in ("val", "test")}


# --------------------------------------------------------------------------------------------- the run


def draw_subsets(names: list[str], per_size: dict[int, int], seed: int) -> list[tuple[int, tuple[str, ...]]]:
    """Distinct random subsets of each size (seeded; subset i of a size does not depend on how many)."""
    out: list[tuple[int, tuple[str, ...]]] = []
    for size, count in per_size.items():
        if size > len(names):
            raise SystemExit(f"T={size} needs {size} tasks; the zoo has {len(names)}")
        rng = random.Random(f"vit-merge:{seed}:{size}")
        seen: set[tuple[str, ...]] = set()
        for _ in range(100 * count):
            if len(seen) == count:
                break
            subset = tuple(sorted(rng.sample(names, size)))
            if subset not in seen:
                seen.add(subset)
                out.append((size, subset))
    return out


def auto_row(rows: list[dict[str, Any]], own: dict[str, float]) -> dict[str, Any] | None:
    """What merge_method: auto picks on a subset: the best of our methods on validation (library rule)."""
    from mergekit_subspace.merge.select import choose_method

    ours = [r for r in rows if r["family"] == "ours" and r.get("val_means")]
    if not ours:
        return None
    best = {r["method"]: max(r["val_means"]) for r in ours}
    chosen = next(r for r in ours if r["method"] == choose_method(best))
    row = {k: chosen[k] for k in ("size", "subset", "lambda", "val_means", "test")}
    row |= {
        "label": AUTO_LABEL,
        "family": "ours",
        "method": "auto",
        "chosen": chosen["method"],
        "candidates": list(best),
        "merge_s": sum(r["merge_s"] for r in ours),
        "end_to_end_s": sum(r["end_to_end_s"] for r in ours),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ours),
    }
    headless.summarize(row, own)
    return row


def validation_files(ev: ImageEvaluator, tasks: list[str], folder: Path) -> dict[str, str]:
    """Each task's validation split as the image .safetensors file the library's validation reads."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for task in tasks:
        pixels, labels = ev.data[task]["val"]
        ids = ev.data[task]["label_ids"]
        path = folder / f"{task}.safetensors"
        save_file(
            {"pixel_values": pixels.contiguous(), "labels": labels.contiguous(), "base_label_ids": ids}, path
        )
        files[task] = str(path)
    return files


def tuned_rows(
    subsets: list[tuple[int, tuple[str, ...]]],
    paths: dict[str, str],
    base: str,
    ev: ImageEvaluator,
    own: dict[str, float],
    grid: list[float],
    work: Path,
) -> list[dict[str, Any]]:
    """The library's auto + task weights per subset (one fresh process), scored on the test split."""
    val = validation_files(ev, sorted({t for _, s in subsets for t in s}), work / "validation")
    runs = [
        {
            "method": "auto+task_weights",
            "size": size,
            "subset": "+".join(subset),
            "adapters": [paths[t] for t in subset],
            "validation": {Path(paths[t]).name: val[t] for t in subset},
            "grid": grid,
            "out": str(work / f"tuned-{'+'.join(subset)}"),
        }
        for size, subset in subsets
    ]
    tick = time.perf_counter()
    results = merge_peers.run_worker({"family": "tuned", "base": base, "runs": runs}, work, MODULE)
    print(f"tuned: {len(runs)} merges with validation ({time.perf_counter() - tick:.0f}s)", flush=True)
    rows = []
    for (size, subset), timing in zip(subsets, results, strict=True):
        row = {"label": TUNED_LABEL, "family": "ours", "method": "auto+task_weights", "size": size}
        row |= {"subset": "+".join(subset), "val_means": []} | {
            k: v for k, v in timing.items() if k != "folder"
        }
        if "error" not in timing:
            folder = Path(timing["folder"])
            row["test"] = {t: sc[0] for t, sc in ev.scores(folder, list(subset), "test", [1.0]).items()}
            headless.summarize(row, own)
            shutil.rmtree(folder, ignore_errors=True)
            print(f"T={size} tuned -> {row['chosen']}: norm mean {row['normalized_mean']:.3f}", flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=DEFAULT_ZOO, help="frozen-head ViT zoo (benchmarks.zoos.vit_frozen)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument(
        "--subsets",
        nargs="+",
        default=[f"{t}:{n}" for t, n in SUBSETS_PER_SIZE.items()],
        help="T:COUNT pairs, e.g. 2:3 4:3 8:2",
    )
    parser.add_argument("--val", type=int, default=DEFAULT_VAL, help="validation images per class")
    parser.add_argument("--grid", type=float, nargs="+", default=list(DEFAULT_GRID))
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset draw")
    parser.add_argument("--only", nargs="+", help="family:method pairs to run (e.g. ours:ties peft:cat)")
    parser.add_argument("--report-only", action="store_true", help="rewrite markdown and plot from the JSON")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        write_report(json.loads((out / "results.json").read_text()), out, plot_too=True)
        return 0
    try:
        per_size = {int(t): int(n) for t, n in (pair.split(":") for pair in args.subsets)}
    except ValueError:
        raise SystemExit(f"--subsets takes T:COUNT pairs, got {' '.join(args.subsets)}") from None

    import torch

    torch.set_num_threads(headless.THREADS)
    started = time.perf_counter()
    zoo = Path(args.zoo)
    if not (zoo / "zoo.json").is_file():
        raise SystemExit(
            f"{zoo}: no zoo.json; build it first: python -m benchmarks.zoos.vit_frozen --out {zoo}"
        )
    summary = json.loads((zoo / "zoo.json").read_text())
    entries = {e["name"]: e for e in summary["entries"]}
    base = str(zoo / "base-frozen-heads")
    subsets = draw_subsets(sorted(entries), per_size, args.seed)
    names = sorted({t for _, subset in subsets for t in subset})
    paths = {n: str(zoo / entries[n]["path"]) for n in names}
    ev = ImageEvaluator(base, {n: zoo / entries[n]["eval"] for n in names}, args.val)
    own = {t: ev.scores(Path(paths[t]), [t], "test", [1.0])[t][0] for t in names}
    base_only = {t: ev.scores(None, [t], "test", [1.0])[t][0] for t in names}
    print(
        f"own test accuracy {statistics.fmean(own.values()):.3f}, base {statistics.fmean(base_only.values()):.3f}"
    )

    from importlib.metadata import version

    result: dict[str, Any] = {
        "command": "python -m benchmarks.vit_merge_bench "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(torch threads {headless.THREADS})",
        "versions": {
            "torch": torch.__version__,
            "peft": version("peft"),
            "transformers": version("transformers"),
            "mergekit": merge_peers.mergekit_version(),
        },
        "zoo": {
            "path": args.zoo,
            "tasks": names,
            "n_adapters": len(entries),
            "val_per_class": args.val,
            "split_sizes": {t: ev.sizes(t) for t in names},
            "digit_probe": summary["heads"]["digit_probe"],
            "pretrain_test_accuracy": (summary.get("pretrain") or {}).get("test_accuracy"),
        },
        "subsets": [{"size": size, "tasks": list(subset)} for size, subset in subsets],
        "grid": args.grid,
        "density": DENSITY,
        "own_accuracy": own,
        "base_only_accuracy": base_only,
        "rows": [],
    }
    work = Path(tempfile.mkdtemp(prefix="vit-merge-"))
    todo = headless.plans(args.only)
    timings = headless.time_merges(todo, subsets, paths, base, work, MODULE)
    deltas: dict[str, list[tuple[dict, dict]]] = {}
    for size, subset in subsets:
        rows = [
            headless.score_row(
                f, m, size, subset, timings[(f, m, "+".join(subset))], ev, own, args.grid, work, deltas
            )
            for f, m in todo
        ]
        auto = auto_row(rows, own)
        result["rows"] += rows + ([auto] if auto else [])
        if auto:
            print(f"T={size} auto -> {auto['chosen']}: norm mean {auto['normalized_mean']:.3f}", flush=True)
        result["seconds_total"] = time.perf_counter() - started
        write_report(result, out, plot_too=False)
    if not args.only or "ours:auto+task_weights" in args.only:
        result["rows"] += tuned_rows(subsets, paths, base, ev, own, args.grid, work)
    result["seconds_total"] = time.perf_counter() - started
    write_report(result, out, plot_too=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------------------------- report


def write_report(result: dict[str, Any], out: Path, plot_too: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "report.md", markdown(result))
    if plot_too and result["rows"]:
        headless.plot(result, out / "normalized.png")


def markdown(result: dict[str, Any]) -> str:
    sizes = sorted({s["size"] for s in result["subsets"]})
    zoo = result["zoo"]
    tests = [s["test"] for s in zoo["split_sizes"].values()]
    own_mean = statistics.fmean(result["own_accuracy"].values())
    noise = (own_mean * (1 - own_mean) / min(tests)) ** 0.5
    per_size = {size: sum(1 for s in result["subsets"] if s["size"] == size) for size in sizes}
    probe = zoo["digit_probe"]
    lines = [
        "# Frozen-head ViT merge benchmark: only the LoRA deltas differ",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; torch {result['versions']['torch']}, peft {result['versions']['peft']}, "
        f"transformers {result['versions']['transformers']}, mergekit {result['versions']['mergekit']}. "
        f"Whole run {result.get('seconds_total', 0.0) / 60:.1f} min. Shared CPU: absolute seconds are noisy.",
        "",
        f"Zoo: `benchmarks/zoos/vit_frozen.py`, {zoo['n_adapters']} q/v LoRAs (r 4/8; {len(zoo['tasks'])} of them "
        "appear in the subsets) of a 0.31M-parameter ViT "
        f"pretrained on Fashion-MNIST (test accuracy {zoo['pretrain_test_accuracy']}); each task is 5 classes of "
        "Fashion-MNIST or MNIST under rot90, vflip, hflip or invert. No adapter has a head: all are scored on one "
        "frozen 20-way head, the base's own Fashion-MNIST rows plus a digit head fit once as a linear probe on the "
        f"base's features of untransformed MNIST (probe test accuracy {probe['test_accuracy']:.3f}), restricted to "
        "the task's classes. So a task's own adapter, every merge and the base alone use exactly the same head.",
        "",
        "Each subset's adapters are merged into one delta, written as one PEFT folder and loaded through PEFT; every "
        "task of the subset is scored with that folder. Normalized = merged test accuracy / the task's own "
        "adapter's test accuracy; *mean* and *worst* are over the subset's tasks, then averaged over the subsets "
        f"of a size ({', '.join(f'T={t}: {n}' for t, n in per_size.items())} random subsets). lambda chosen per "
        f"method on validation (grid {result['grid']}, same code for every method; the plain mean stays at lambda "
        f"1). Density {result['density']} for every sparsifying method; PEFT svd/ties_svd at its default svd_rank.",
        "",
        f"Noise: per task {zoo['val_per_class']} validation images per class and the rest of the eval file for "
        f"test: {min(tests)}-{max(tests)} test images per task (MNIST's test pool has 100 per class). "
        f"One task's accuracy near {own_mean:.2f} has a binomial standard error of about {noise:.3f} on "
        f"{min(tests)} images, so differences under ~0.02 in a subset mean are not resolved; the subsets (and so the "
        "means over them) are few.",
        "",
        f"*{AUTO_LABEL}*: `merge_method: auto`'s pick, made from the validation scores above with the library's "
        "rule (`select.choose_method`) over every registered method that ran (the plain mean is not a candidate "
        "here); its seconds are the candidates' merges summed and its RSS their largest, validation time not "
        f"included. *{TUNED_LABEL}*: the library's validation path run whole (`merge_method: auto` over every "
        "registered method and the lambda grid on the validation split written as image files, then "
        f"`validation.task_weight_grid: {list(TASK_WEIGHT_GRID)}`, one sweep: each task's weight times each "
        "scale, kept where the mean validation score rises), its folder scored on the test split; its seconds "
        "include all of that validation and its RSS the model it scores with. Seconds and peak RSS: one fresh "
        "process per tool, lambda 1, adapter folders on disk to the tool's output on disk (*e2e*); *merge* = "
        "the merge step alone.",
        "",
        "Left out: per-task weights for the peers (only the tuned row searches them), density other than 0.5, "
        "mergekit's other breadcrumbs/della parameters (their defaults), `mean` as a tuned method (it is "
        "task_arithmetic at lambda / T), and more subsets (the whole run is sized to a shared 2-core machine).",
        "",
        "Subsets: " + "; ".join(f"T={s['size']}: {', '.join(s['tasks'])}" for s in result["subsets"]),
        "",
    ]
    table = headless.by_size(result["rows"])
    ranked = sorted(
        table.items(), key=lambda item: -statistics.fmean(p["normalized_mean"] for p in item[1].values())
    )
    base_cells = []
    for size in sizes:
        norm = [
            [result["base_only_accuracy"][k] / result["own_accuracy"][k] for k in s["tasks"]]
            for s in result["subsets"]
            if s["size"] == size
        ]
        base_cells += [f"{statistics.fmean(statistics.fmean(n) for n in norm):.3f}"]
        base_cells += [f"{statistics.fmean(min(n) for n in norm):.3f}"]
    lines += headless.method_table(ranked, sizes, base_cells)
    lines += headless.reuse_and_failure_lines(result["rows"])
    picks = [r for r in result["rows"] if r.get("method") == "auto"]
    if picks:
        lines += [
            "",
            "auto's picks: "
            + "; ".join(f"T={r['size']} {r['chosen']} (lambda {r['lambda']:g})" for r in picks),
        ]
    tuned = [r for r in result["rows"] if r.get("method") == "auto+task_weights" and "task_weights" in r]
    if tuned:
        lines += [
            "",
            "auto + task weights, per subset (method, lambda, the scales that moved, validation score):",
            "",
        ]
        for r in tuned:
            moved = {t: s for t, s in r["task_weights"]["scales"].items() if s != 1.0}
            shown = ", ".join(f"{t} x{s:g}" for t, s in moved.items()) or "none"
            lines.append(
                f"- T={r['size']} [{r['subset']}]: {r['chosen']}, lambda {r['lambda']:g}; {shown}; "
                f"{r['task_weights']['start_score']:.3f} -> {r['task_weights']['score']:.3f}"
            )
    lines += headless.per_subset_lines(result["rows"])
    lines += ["", "## Reference points (test split)", "", "| task | test images | own adapter | base alone |"]
    lines.append("|---|---|---|---|")
    for task, acc in result["own_accuracy"].items():
        lines.append(
            f"| {task} | {zoo['split_sizes'][task]['test']} | {acc:.3f} | {result['base_only_accuracy'][task]:.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
