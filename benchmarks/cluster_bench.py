"""Several bases (`subspace: {clusters: C}`) against one basis at equal bytes, on a zoo of real adapters.

For each k of one basis, clusters C = 2, 3, 4 are fit at the largest k per cluster whose store holds no more
numbers than one basis at that k (mergekit_subspace.clusters.equal_bytes_k), and `clusters: auto` picks
among them. Every store's tasks are reconstructed and scored through PEFT, beside the zoo's mean adapter and
the base with each task's own head alone.

    OMP_NUM_THREADS=1 python -m benchmarks.cluster_bench --zoo benchmarks/cache/mixed \
        --out benchmarks/results/clusters-mixed --k 8 16

Ratios are stated against the source folders on disk and against the sources cast to the store's dtype.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.zoo_eval import normalized_se, run_and_write, zoo_names, zoo_parser, zoo_scorer

COUNTS = (1, 2, 3, 4)


def _store_row(store: Any, tasks: list, judge: Any, work: Path, cast: int, label: str) -> dict[str, Any]:
    """One store: bytes, ratios, errors, and every task's accuracy from its reconstructed PEFT folder."""
    info = store.info()
    per_task = []
    for task in tasks:
        out = work / f"rec-{task.name}"
        store.reconstruct(task.name, out)
        per_task.append(
            {
                "task": task.name,
                "accuracy": judge.folder(out, task),
                "rel_error": info["per_task"][task.name]["rel_error"],
                "cluster": info["per_task"][task.name].get("cluster"),
            }
        )
        shutil.rmtree(out)
    row = {
        "label": label,
        "settings": store.manifest["settings"],
        "bytes": info["bytes"]["store"],
        "payload_numbers": store.stored_numbers(),
        "ratio_vs_sources": info["bytes"]["sources"] / info["bytes"]["store"],
        "ratio_vs_cast_sources": cast / info["bytes"]["store"],
        "mean_rel_error": statistics.fmean(t["rel_error"] for t in per_task),
        "tasks": per_task,
    }
    print(json.dumps({k: v for k, v in row.items() if k != "tasks"}), file=sys.stderr)
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mergekit_subspace.bench import baselines
    from mergekit_subspace.bench.run import _cast_source_bytes
    from mergekit_subspace.clusters import equal_bytes_k
    from mergekit_subspace.recipe import SubspaceSettings
    from mergekit_subspace.sources import lora_task
    from mergekit_subspace.subspace import SubspaceStore

    zoo = Path(args.zoo)
    names = zoo_names(zoo)
    work = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    judge = zoo_scorer(zoo, names, args.base, args.max_examples, work)
    tasks = [lora_task(zoo / "adapters" / n) for n in names]
    cast = _cast_source_bytes(tasks, args.dtype)
    original = {t.name: judge.folder(zoo / "adapters" / t.name, t) for t in tasks}
    mean = baselines.mean_adapter(tasks)
    floors = {
        t.name: {
            "mean_adapter": judge.factors({m: mean[m] for m in t.slots}, t, "mean"),
            "base_head_only": judge.factors(baselines.zero_factors(t), t, "head"),
        }
        for t in tasks
    }
    stores = []
    for k in args.k:
        one = SubspaceSettings(k=k, dtype=args.dtype)
        for count in COUNTS:
            k_c, k_in = equal_bytes_k(tasks, None, one, count)
            settings = one.model_copy(
                update={"k": k_c, "k_in": k_in, "clusters": None if count == 1 else count}
            )
            path = work / f"k{k}-c{count}"
            store = SubspaceStore.from_tasks(tasks, settings, path, progress=False)
            row = _store_row(store, tasks, judge, work, cast, f"k={k}: {count} x k={k_c}")
            stores.append(row | {"k_one_basis": k, "clusters": count, "k_per_cluster": k_c})
            shutil.rmtree(path)
        auto = one.model_copy(update={"clusters": "auto"})
        store = SubspaceStore.from_tasks(tasks, auto, work / f"k{k}-auto", progress=False)
        row = _store_row(store, tasks, judge, work, cast, f"k={k}: clusters auto")
        chosen = store.manifest["settings"].get("clusters", 1)
        stores.append(
            row
            | {
                "k_one_basis": k,
                "clusters": "auto",
                "chose": chosen,
                "k_per_cluster": store.manifest["settings"]["k"],
                "auto_table": store.cluster_choices,
            }
        )
        shutil.rmtree(work / f"k{k}-auto")
    shutil.rmtree(work, ignore_errors=True)
    for row in stores:
        norm = [t["accuracy"] / original[t["task"]] for t in row["tasks"]]
        row["mean_normalized"] = statistics.fmean(norm)
        row["worst_normalized"] = min(norm)
    baseline_summary = {}
    for method in ("mean_adapter", "base_head_only"):
        norm = [floors[n][method] / original[n] for n in names]
        baseline_summary[method] = {"mean_normalized": statistics.fmean(norm), "worst_normalized": min(norm)}
    return {
        "zoo": zoo.name,
        "tasks": names,
        "dtype": args.dtype,
        "original": original,
        "baselines": baseline_summary,
        "sources_bytes": sum(t.source_bytes for t in tasks),
        "sources_cast_bytes": cast,
        "max_examples": args.max_examples,
        "threads": torch.get_num_threads(),
        "stores": stores,
    }


def _plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = {1: "o", 2: "s", 3: "^", 4: "D"}
    for count in COUNTS:
        rows = [r for r in results["stores"] if r["clusters"] == count]
        label = "one basis" if count == 1 else f"{count} clusters"
        xs = [r["bytes"] / 1e6 for r in rows]
        axes[0].plot(xs, [r["mean_rel_error"] for r in rows], marker=markers[count], label=label)
        axes[1].plot(xs, [r["mean_normalized"] for r in rows], marker=markers[count], label=label)
        for r, x in zip(rows, xs, strict=True):
            axes[1].annotate(
                f"k={r['k_per_cluster']}",
                (x, r["mean_normalized"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(4, -9),
            )
    base = results["baselines"]["mean_adapter"]["mean_normalized"]
    axes[1].axhline(base, color="grey", linestyle="--", label="mean adapter")
    axes[0].set(
        xlabel="store size (MB)",
        ylabel="mean relative error (lower is better)",
        title="Error of the stored tasks at equal bytes",
    )
    axes[1].set(
        xlabel="store size (MB)",
        ylabel="mean normalized accuracy (through PEFT)",
        title="Accuracy at equal bytes",
    )
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "clusters.png", dpi=120)
    plt.close(fig)


def report(results: dict[str, Any], out: Path) -> None:
    n = results["max_examples"]
    rows = [{"original": v} for v in results["original"].values()]
    se = normalized_se(rows, n)
    b = results["baselines"]
    lines = [
        f"# Clusters against one basis at equal bytes, on {results['zoo']}",
        "",
        f"{len(results['tasks'])} tasks, {results['dtype']} stores. Each row with C clusters has the largest "
        "k per cluster whose store holds no more numbers than one basis at the k named in its group. Accuracy "
        f"through PEFT on {n} examples per task (standard error of one task's normalized accuracy about "
        f"{se:.3f}); {results['threads']} torch thread(s). Ratios: against the source folders on disk "
        f"({results['sources_bytes']:,} B) / against the sources cast to {results['dtype']} "
        f"({results['sources_cast_bytes']:,} B).",
        "",
        "| store | bytes | ratio (disk / cast) | mean rel. error | mean normalized | worst task |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["stores"]:
        label = r["label"] + (
            f" (chose {r['chose']} x k={r['k_per_cluster']})" if r["clusters"] == "auto" else ""
        )
        lines.append(
            f"| {label} | {r['bytes']:,} | {r['ratio_vs_sources']:.1f}x / {r['ratio_vs_cast_sources']:.1f}x | "
            f"{r['mean_rel_error']:.3f} | {r['mean_normalized']:.3f} | {r['worst_normalized']:.3f} |"
        )
    for method, label in (
        ("mean_adapter", "mean adapter (+ own head)"),
        ("base_head_only", "base + own head only"),
    ):
        lines.append(
            f"| {label} | | | | {b[method]['mean_normalized']:.3f} | {b[method]['worst_normalized']:.3f} |"
        )
    lines += ["", "## What it says", ""]
    for k in sorted({r["k_one_basis"] for r in results["stores"]}):
        group = [r for r in results["stores"] if r["k_one_basis"] == k]
        one = next(r for r in group if r["clusters"] == 1)
        best = max((r for r in group if r["clusters"] not in (1, "auto")), key=lambda r: r["mean_normalized"])
        verdict = "beat" if best["mean_normalized"] > one["mean_normalized"] else "did not beat"
        lines.append(
            f"- At the bytes of one basis of k = {k}: the best clustering ({best['clusters']} x k = "
            f"{best['k_per_cluster']}) {verdict} one basis, {best['mean_normalized']:.3f} against "
            f"{one['mean_normalized']:.3f} mean normalized (worst task {best['worst_normalized']:.3f} against "
            f"{one['worst_normalized']:.3f}; mean relative error {best['mean_rel_error']:.3f} against "
            f"{one['mean_rel_error']:.3f}) in {best['bytes'] / one['bytes']:.2f}x its bytes."
        )
    lines += [
        "- Where k per cluster falls to 2-4, each cluster's basis is too narrow for its own tasks and the split "
        "costs more than it gains; clusters pay off once each cluster keeps a useful k.",
        f"- One zoo of {len(results['tasks'])} short-trained adapters, one run: the standard error of a mean "
        f"normalized accuracy is about {se / len(results['tasks']) ** 0.5:.3f} ({se:.3f} per task), so "
        "differences of that size are not shown to be real.",
        "",
        "![error and accuracy at equal bytes](clusters.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot(results, out)


def rewrite_report(out: Path) -> None:
    """Redraw report.md and the plot from a committed results.json."""
    report(json.loads((out / "results.json").read_text()), out)


def main(argv: list[str] | None = None) -> int:
    parser = zoo_parser(__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[8, 16], help="k of the one-basis stores")
    parser.add_argument("--dtype", default="float16")
    args = parser.parse_args(argv)
    return run_and_write("benchmarks.cluster_bench", args, argv, run, report)


if __name__ == "__main__":
    raise SystemExit(main())
