"""Merge benchmark: our methods vs mergekit 0.1.5 and PEFT's add_weighted_adapter on the text zoo.

Protocol (the standard one for merging with per-task heads):
- the zoo's LoRA adapters (all-MiniLM-L6-v2, WordNet supersense tasks); each task's eval file is split into a
  validation part (first --val lines) and a test part (the rest);
- every method merges the same T adapters (T = 4 and 8) into one delta; each task is then scored with the
  merged delta + its own head, loaded through PEFT from the written folder;
- lambda (the merged delta's scale) is chosen for every method, ours and the peers', on the validation part
  over the same grid, by the same code (mergekit_subspace.merge.select); the plain mean stays at lambda 1;
- normalized accuracy = merged test accuracy / the task's own adapter's test accuracy, averaged over tasks;
- time and peak RSS of each merge are measured in a fresh subprocess (one per method and T), from the
  adapter folders on disk to per-task PEFT folders on disk, at lambda 1.

Run from the repository root:  python -m benchmarks.merge_bench [--zoo DIR] [--out benchmarks/results/merge]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import merge_peers
from benchmarks.merge_peers import mergekit_merge, peft_merge, worker_loop

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_ZOO = str(Path(__file__).resolve().parent / "cache" / "text")
DEFAULT_OUT = "benchmarks/results/merge"
DEFAULT_GRID = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
DEFAULT_VAL = 32
DEFAULT_TEST = 160
DENSITY = 0.5  # for every sparsifying method, ours and peers (mergekit's README examples use 0.5)
# linear and mean are task_arithmetic up to a scale the lambda grid already covers, and dare_linear is
# task_arithmetic plus dropout noise: left out to keep the run short (each is tested in tests/test_merge.py).
# `mean` runs only as the plain-mean baseline (lambda 1).
OURS = ("task_arithmetic", "ties", "dare_ties", "tsv", "iso_c", "iso_cts", "mean")
MERGEKIT = ("task_arithmetic", "ties", "dare_ties")
PEFT = ("cat", "svd", "ties_svd")
HEAD_PREFIX = "base_model.model.classifier."
# One thread: on a shared 2-core machine, 2 OpenMP threads made a 384 x 384 SVD 20x slower (spinning).
THREADS = 1


# ---------------------------------------------------------------------------------------------- workers


def _write_with_heads(src: Path, adapters: list[Path], out: Path) -> None:
    """One PEFT folder per task: the merged delta of `src` plus that task's own head (modules_to_save)."""
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "adapter_config.json").read_text())
    merged = load_file(src / "adapter_model.safetensors")
    for adapter in adapters:
        own = load_file(adapter / "adapter_model.safetensors")
        own_config = json.loads((adapter / "adapter_config.json").read_text())
        folder = out / adapter.name
        folder.mkdir(parents=True)
        tensors = dict(merged) | {k: v for k, v in own.items() if k.startswith(HEAD_PREFIX)}
        written = dict(
            config, task_type=own_config.get("task_type"), modules_to_save=own_config.get("modules_to_save")
        )
        (folder / "adapter_config.json").write_text(json.dumps(written, indent=2))
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})


def worker_ours(job: dict[str, Any]) -> dict[str, Any]:
    from mergekit_subspace.merge import merge

    params: dict[str, Any] = {}
    if job["method"] in ("ties", "dare_linear", "dare_ties"):
        params["density"] = DENSITY
    result = merge(
        {
            "merge_method": job["method"],
            "adapters": job["adapters"],
            "parameters": params,
            "output": {"path": job["out"], "heads": job.get("heads", "none")},
        },
        progress=False,
    )
    seconds = result.report["seconds"]
    return {"merge_s": seconds["merge"], "end_to_end_s": seconds["total"], "phases": seconds}


def worker_mergekit(job: dict[str, Any]) -> dict[str, Any]:
    """mergekit on full weights of the adapted modules, then (not timed) each task's head re-attached."""
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "merged" if job.get("export", True) else None
        timing = mergekit_merge(job["adapters"], job["base"], job["method"], DENSITY, merged)
        if merged is not None:
            _write_with_heads(merged, [Path(p) for p in job["adapters"]], Path(job["out"]))
    return timing


def _strip_head(src: Path, dst: Path) -> None:
    """PEFT refuses add_weighted_adapter when several adapters hold the same modules_to_save head."""
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "adapter_config.json").read_text())
    config.update(modules_to_save=None, task_type=None)
    dst.mkdir(parents=True)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    tensors = {k: v for k, v in load_file(src / "adapter_model.safetensors").items() if "lora_" in k}
    save_file(tensors, dst / "adapter_model.safetensors")


def worker_peft(job: dict[str, Any]) -> dict[str, Any]:
    """PEFT add_weighted_adapter on the same adapters (heads stripped, then each task's head re-attached)."""
    from transformers import AutoModelForSequenceClassification

    adapters = [Path(p) for p in job["adapters"]]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        stripped = []
        for path in adapters:
            _strip_head(path, Path(tmp) / "in" / path.name)
            stripped.append(str(Path(tmp) / "in" / path.name))
        stripped_s = time.perf_counter() - start
        timing = peft_merge(
            stripped,
            lambda: AutoModelForSequenceClassification.from_pretrained(
                job["base"], num_labels=job["num_labels"]
            ),
            job["method"],
            DENSITY,
            Path(tmp) / "saved",
        )
        _write_with_heads(Path(tmp) / "saved" / "merged", adapters, Path(job["out"]))
    timing["end_to_end_s"] += stripped_s
    timing["phases"]["load"] += stripped_s
    return timing


WORKERS = {"ours": worker_ours, "mergekit": worker_mergekit, "peft": worker_peft}


def worker_main(job_path: str) -> None:
    """Run one family's merges (each method on each size), recording each merge's time and peak RSS."""
    import torch

    torch.set_num_threads(THREADS)
    worker_loop(json.loads(Path(job_path).read_text()), WORKERS)


def run_worker(job: dict[str, Any], work: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Run one family's merges in a fresh interpreter, so import costs and memory are not shared."""
    return {(r["method"], r["size"]): r for r in merge_peers.run_worker(job, work, "benchmarks.merge_bench")}


# ----------------------------------------------------------------------------------------- evaluation


def split_eval(zoo: Path, entries: list[dict], work: Path, val: int, test: int) -> dict[str, dict[str, Path]]:
    """First `val` lines of each task's (shuffled) eval file choose lambda; the next `test` are reported."""
    out = {}
    for entry in entries:
        lines = (zoo / entry["eval"]).read_text().splitlines(keepends=True)
        paths = {"val": work / f"{entry['name']}.val.jsonl", "test": work / f"{entry['name']}.test.jsonl"}
        paths["val"].write_text("".join(lines[:val]))
        paths["test"].write_text("".join(lines[val : val + test]))
        out[entry["name"]] = paths
    return out


def scale_folder(src: Path, dst: Path, value: float) -> Path:
    """The folder with lambda folded into every lora_B (what a user of the chosen merge keeps)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    shutil.copy2(src / "adapter_config.json", dst / "adapter_config.json")
    tensors = load_file(src / "adapter_model.safetensors")
    tensors = {k: v * value if ".lora_B." in k else v for k, v in tensors.items()}
    save_file(tensors, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    return dst


class Evaluator:
    def __init__(self, base: str, data: dict[str, dict[str, Path]], val: int) -> None:
        from mergekit_subspace.merge.select import Scorer, load_validation

        self.scorer = Scorer(base, batch_size=32)
        self.val = {n: load_validation(p["val"], val) for n, p in data.items()}
        self.test = {n: load_validation(p["test"], None) for n, p in data.items()}

    def test_accuracy(self, folder: Path, task: str, scale: float = 1.0) -> float:
        return self.scorer.grid(folder, self.test[task], [scale])[0]

    def choose_lambda(self, folders: dict[str, Path], grid: list[float]) -> tuple[float, list[float]]:
        from mergekit_subspace.merge.select import choose

        scores = [self.scorer.grid(folder, self.val[task], grid) for task, folder in folders.items()]
        means = [statistics.fmean(s[i] for s in scores) for i in range(len(grid))]
        return choose(grid, means), means


def evaluate_ours(
    method: str, tasks: list[dict], data: dict, grid: list[float], out: Path, ev: Evaluator
) -> dict:
    """Our `merge` with validation data in the recipe: it chooses lambda itself (the product feature)."""
    from mergekit_subspace.merge import merge

    params: dict[str, Any] = {"density": DENSITY} if method in ("ties", "dare_linear", "dare_ties") else {}
    result = merge(
        {
            "merge_method": method,
            "adapters": [t["path"] for t in tasks],
            "base_model": ev.scorer.base.as_posix(),
            "tasks": [{"name": t["name"], "validation": str(data[t["name"]]["val"])} for t in tasks],
            "parameters": params,
            "validation": {"lambda_grid": grid, "max_examples": len(next(iter(ev.val.values())).examples)},
            "output": {"path": str(out), "heads": "per_task"},
        },
        progress=False,
    )
    validation = result.report["validation"]
    accs = {t["name"]: ev.test_accuracy(result.folders[t["name"]], t["name"]) for t in tasks}
    return {"lambda": result.report["lambda"], "val_means": validation["mean_scores"], "test": accs}


def merge_per_task(method: str, tasks: list[dict], out: Path) -> dict[str, Path]:
    """Our merge at lambda 1 written with per-task heads (the timed run writes one head-less folder)."""
    from mergekit_subspace.merge import merge

    result = merge(
        {"merge_method": method, "adapters": [t["path"] for t in tasks], "output": {"path": str(out)}},
        progress=False,
    )
    return result.folders


def evaluate_peer(folders: dict[str, Path], grid: list[float], out: Path, ev: Evaluator) -> dict:
    chosen, means = ev.choose_lambda(folders, grid)
    accs = {}
    for task, folder in folders.items():
        final = scale_folder(folder, out / task, chosen)
        accs[task] = ev.test_accuracy(final, task)
    return {"lambda": chosen, "val_means": means, "test": accs}


# ---------------------------------------------------------------------------------------------- report


def summarize(rows: list[dict], own: dict[str, float]) -> None:
    for row in rows:
        normalized = [row["test"][t] / own[t] for t in row["test"]]
        row["normalized_accuracy"] = statistics.fmean(normalized)
        row["accuracy"] = statistics.fmean(row["test"].values())


def markdown(result: dict) -> str:
    sizes = result["sizes"]
    lines = [
        "# Merge benchmark: text zoo (all-MiniLM-L6-v2 LoRAs, WordNet supersense tasks)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; torch {result['versions']['torch']}, peft {result['versions']['peft']}, "
        f"mergekit {result['versions']['mergekit']}. Shared CPU: absolute seconds are noisy, ratios less so.",
        "",
        "Normalized accuracy = merged test accuracy / own adapter test accuracy, mean over tasks; every task keeps "
        f"its own head. Per task, {result['zoo']['val_lines']} validation and {result['zoo']['test_lines']} test "
        "examples (disjoint slices of the zoo's held-out set). lambda chosen on the validation slices (same grid "
        f"and code for every method, grid {result['grid']}); the plain mean stays at lambda 1. Density {DENSITY} "
        "for ties/dare methods; PEFT's svd/ties_svd at its default svd_rank (the largest input rank).",
        f"Seconds and peak RSS: one fresh process per tool ({THREADS} torch thread), peak RSS reset before each "
        "merge (/proc clear_refs). *merge* = the merge step "
        "alone (ours: core arithmetic + PEFT factors; mergekit: `merge_state_dicts`; PEFT: `add_weighted_adapter`). "
        "*end-to-end* = adapter folders on disk -> the tool's own output on disk (ours: read, fit the basis, "
        "merge, write one PEFT folder; mergekit: read, materialize W_base + s B A for the adapted modules "
        "only, merge, write the merged weights; PEFT: load base + adapters, merge, save). Peak RSS includes "
        "~450 MB of imported torch/transformers/peft (see `baseline_rss_mb` in the JSON).",
        "",
    ]
    header = "| method | " + " | ".join(f"norm. acc T={t}" for t in sizes)
    header += " | " + " | ".join(f"lambda T={t}" for t in sizes)
    header += " | " + " | ".join(f"merge s T={t}" for t in sizes)
    header += " | " + " | ".join(f"end-to-end s T={t}" for t in sizes)
    header += " | " + " | ".join(f"peak RSS MB (+ during merge) T={t}" for t in sizes) + " |"
    lines += [header, "|" + "---|" * (1 + 5 * len(sizes))]
    by_label: dict[str, dict[int, dict]] = {}
    for row in result["rows"]:
        by_label.setdefault(row["label"], {})[row["size"]] = row
    for label, per_size in by_label.items():
        cells = [label]
        cells += [f"{per_size[t]['normalized_accuracy']:.3f}" if t in per_size else "" for t in sizes]
        cells += [f"{per_size[t]['lambda']:g}" if t in per_size else "" for t in sizes]
        cells += [f"{per_size[t]['merge_s']:.3f}" if t in per_size else "" for t in sizes]
        cells += [f"{per_size[t]['end_to_end_s']:.2f}" if t in per_size else "" for t in sizes]
        cells += [
            f"{per_size[t]['peak_rss_mb']:.0f} (+{per_size[t]['peak_rss_mb'] - per_size[t]['rss_before_mb']:.0f})"
            if t in per_size
            else ""
            for t in sizes
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Targets", ""]
    for line in result["targets"]:
        lines.append(f"- {line}")
    lines += [
        "",
        "## Reading the table",
        "",
        "- ours task_arithmetic, mergekit task_arithmetic and PEFT cat compute the same delta (exact basis), so "
        "they agree to the last digit; the plain mean is task arithmetic at lambda 1/T.",
        "- The spectral methods (iso_c, iso_cts, tsv) are where merging in the shared subspace pays: they are exact "
        "SVD operations on the small cores (the same result as on the full deltas), and they beat every peer.",
        "- ties/dare_ties act on core entries (shared singular coordinates), not weight entries; here they do worse "
        "than mergekit's weight-space versions at density 0.5.",
        "- Normalized accuracy above 1 means the merged delta, at the lambda chosen on validation data, beats the "
        "task's own adapter used as trained (at its own scale, which nobody tuned): the own adapters are short "
        "CPU trainings.",
        "- Speed: on MiniLM's 384 x 384 modules mergekit's dense work is tiny, so end-to-end times are dominated by "
        "I/O and fixed costs and the 10x target is missed for task_arithmetic and dare_ties. At LLM layer size "
        "(4096 x 4096) see merge_scale.md (`python -m benchmarks.merge_scale`).",
    ]
    lines += ["", "## Reference points", ""]
    lines.append("| task | own adapter test acc. | base + own head (lambda 0) |")
    lines.append("|---|---|---|")
    for task, acc in result["own_accuracy"].items():
        lines.append(f"| {task} | {acc:.3f} | {result['base_only_accuracy'][task]:.3f} |")
    return "\n".join(lines) + "\n"


def targets(rows: list[dict], sizes: list[int]) -> list[str]:
    notes = []
    for size in sizes:
        here = [r for r in rows if r["size"] == size]
        ours = max((r for r in here if r["family"] == "ours"), key=lambda r: r["normalized_accuracy"])
        peers = [r for r in here if r["family"] in ("mergekit", "peft")]
        best_peer = max(peers, key=lambda r: r["normalized_accuracy"])
        verdict = "met" if ours["normalized_accuracy"] > best_peer["normalized_accuracy"] else "MISSED"
        notes.append(
            f"T={size}: best of ours {ours['label']} {ours['normalized_accuracy']:.3f} vs best peer "
            f"{best_peer['label']} {best_peer['normalized_accuracy']:.3f} -> accuracy target {verdict}"
        )
        mk = {r["method"]: r for r in here if r["family"] == "mergekit"}
        us = {r["method"]: r for r in here if r["family"] == "ours"}
        for method in MERGEKIT:
            if method in mk and method in us:
                merge_ratio = mk[method]["merge_s"] / max(us[method]["merge_s"], 1e-9)
                e2e_ratio = mk[method]["end_to_end_s"] / max(us[method]["end_to_end_s"], 1e-9)
                verdict = "met" if min(merge_ratio, e2e_ratio) >= 10 else "MISSED"
                notes.append(
                    f"T={size} {method}: mergekit / ours = {merge_ratio:.1f}x on the merge step, "
                    f"{e2e_ratio:.1f}x end to end -> 10x target {verdict}"
                )
    return notes


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    sizes = result["sizes"]
    labels = list(dict.fromkeys(r["label"] for r in result["rows"]))
    colors = {"ours": "tab:blue", "mergekit": "tab:orange", "peft": "tab:green", "baseline": "tab:gray"}
    family = {r["label"]: r["family"] for r in result["rows"]}
    bar_colors = [colors[family[name]] for name in labels]
    accuracies = [r["normalized_accuracy"] for r in result["rows"]]
    low, high = min(accuracies) - 0.03, max(accuracies) + 0.02
    fig, axes = plt.subplots(1, len(sizes) + 1, figsize=(6 * (len(sizes) + 1), 5.5))
    for ax, size in zip(axes, sizes, strict=False):
        values = {r["label"]: r["normalized_accuracy"] for r in result["rows"] if r["size"] == size}
        ax.barh(labels, [values.get(label, 0) for label in labels], color=bar_colors)
        for y, label in enumerate(labels):
            if label in values:
                ax.text(values[label] + 0.002, y, f"{values[label]:.3f}", va="center", fontsize=8)
        ax.set_xlim(low, high + 0.02)
        ax.invert_yaxis()
        ax.set_title(f"normalized accuracy, T={size} (axis starts at {low:.2f})")
        ax.axvline(1.0, color="k", lw=0.5)
    ax = axes[-1]
    largest = max(sizes)
    values = {r["label"]: r["end_to_end_s"] for r in result["rows"] if r["size"] == largest}
    ax.barh(labels, [values.get(label, 0) for label in labels], color=bar_colors)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.invert_yaxis()
    ax.set_title(f"end-to-end seconds (log), T={largest}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _zoo_entries(zoo: Path, n: int) -> list[dict] | None:
    """A finished zoo as its zoo.json lists it (a later change to the zoo code would otherwise retrain it)."""
    index = zoo / "zoo.json"
    if not index.is_file():
        return None
    entries = json.loads(index.read_text())["entries"]
    if len(entries) < n or not all(
        (zoo / e["path"] / "adapter_model.safetensors").is_file() for e in entries[:n]
    ):
        return None
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=DEFAULT_ZOO, help="text zoo folder (built or reused)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--val", type=int, default=DEFAULT_VAL, help="validation lines per task")
    parser.add_argument("--test", type=int, default=DEFAULT_TEST, help="test lines per task (after val)")
    parser.add_argument("--grid", type=float, nargs="+", default=list(DEFAULT_GRID))
    parser.add_argument("--keep-work", action="store_true")
    parser.add_argument("--only", nargs="+", help="family:method pairs to run (e.g. ours:ties peft:cat)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(THREADS)
    from benchmarks.zoos.text import build_text_zoo, minilm_path

    started = time.perf_counter()
    zoo = Path(args.zoo)
    entries = _zoo_entries(zoo, max(args.sizes)) or build_text_zoo(
        zoo, n_adapters=max(args.sizes), progress=False
    )
    entries = entries[: max(args.sizes)]
    for entry in entries:
        entry["path"] = str(zoo / entry["path"])
    base = minilm_path()
    work = Path(tempfile.mkdtemp(prefix="merge-bench-"))
    data = split_eval(zoo, entries, work, args.val, args.test)
    ev = Evaluator(base, data, args.val)
    own = {e["name"]: ev.test_accuracy(Path(e["path"]), e["name"]) for e in entries}
    base_only = {e["name"]: ev.test_accuracy(Path(e["path"]), e["name"], scale=0.0) for e in entries}
    print(f"own test accuracy {statistics.fmean(own.values()):.3f}", flush=True)

    rows: list[dict] = []
    plans = [("ours", m) for m in OURS] + [("mergekit", m) for m in MERGEKIT] + [("peft", m) for m in PEFT]
    if args.only:
        plans = [plan for plan in plans if f"{plan[0]}:{plan[1]}" in args.only]
    units = {(f, m, n): work / f"unit-{f}-{m}-{n}" for f, m in plans for n in args.sizes}
    timings: dict[tuple[str, int], dict] = {}
    for family in dict.fromkeys(f for f, _ in plans):
        runs = [
            {"method": m, "size": n, "adapters": [t["path"] for t in entries[:n]], "out": str(units[f, m, n])}
            for f, m in plans
            if f == family
            for n in args.sizes
        ]
        tick = time.perf_counter()
        job = {"family": family, "base": base, "num_labels": 4, "runs": runs}
        for key, value in run_worker(job, work).items():
            timings[(family, *key)] = value
        print(f"{family}: {len(runs)} merges timed ({time.perf_counter() - tick:.0f}s)", flush=True)
    for family, method in plans:
        for size in args.sizes:
            tick = time.perf_counter()
            tasks, timing = entries[:size], timings[(family, method, size)]
            folders = {t["name"]: units[family, method, size] / t["name"] for t in tasks}
            final = work / f"final-{family}-{method}-{size}"
            if family == "ours" and method == "mean":
                plain_out = merge_per_task("mean", tasks, final)
                plain = {t["name"]: ev.test_accuracy(plain_out[t["name"]], t["name"]) for t in tasks}
                label, row_family = "plain mean (lambda 1)", "baseline"
                scores = {"lambda": 1.0, "val_means": [], "test": plain}
            elif family == "ours":
                label, row_family = f"ours {method}", family
                scores = evaluate_ours(method, tasks, data, args.grid, final, ev)
            else:
                label, row_family = f"{family} {method}", family
                scores = evaluate_peer(folders, args.grid, final, ev)
            rows.append(
                {"label": label, "family": row_family, "method": method, "size": size} | timing | scores
            )
            summarize(rows, own)
            print(
                f"T={size} {label}: norm acc {rows[-1]['normalized_accuracy']:.3f} lambda {rows[-1]['lambda']:g} "
                f"merge {timing['merge_s']:.3f}s e2e {timing['end_to_end_s']:.2f}s "
                f"rss {timing['peak_rss_mb']:.0f}MB (eval {time.perf_counter() - tick:.0f}s)",
                flush=True,
            )
    summarize(rows, own)

    import peft
    import transformers

    result = {
        "command": "python -m benchmarks.merge_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (torch threads {THREADS})",
        "versions": {
            "torch": torch.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
            "mergekit": merge_peers.mergekit_version(),
        },
        "zoo": {
            "path": str(zoo),
            "tasks": [e["name"] for e in entries],
            "val_lines": args.val,
            "test_lines": args.test,
        },
        "sizes": args.sizes,
        "grid": args.grid,
        "density": DENSITY,
        "own_accuracy": own,
        "base_only_accuracy": base_only,
        "rows": rows,
        "seconds_total": time.perf_counter() - started,
    }
    result["targets"] = targets(rows, args.sizes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "merge_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "merge_bench.md").write_text(markdown(result))
    plot(result, out / "merge_bench.png")
    print(markdown(result))
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
