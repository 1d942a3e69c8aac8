"""A recipe that states only a target (`subspace: {target: {ratio: R}}`), measured: the store the tool
chose, every task reconstructed and scored through PEFT, beside the zoo's mean adapter and the base with each
task's own head alone.

    OMP_NUM_THREADS=1 python -m benchmarks.target_bench --zoo benchmarks/cache/mixed \
        --out benchmarks/results/target-mixed --ratio 20

Ratios are stated against the source folders on disk and against the sources cast to the chosen dtype.
Leave-one-out and per-task SVD at equal bytes are in the zoo's `bench` results (`benchmarks/results/mixed/`),
not repeated here.
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mergekit_subspace.bench import baselines
    from mergekit_subspace.bench.run import _cast_source_bytes
    from mergekit_subspace.recipe import SubspaceSettings
    from mergekit_subspace.sources import lora_task
    from mergekit_subspace.subspace import SubspaceStore

    zoo = Path(args.zoo)
    names = zoo_names(zoo)
    target = {"ratio": args.ratio} if args.ratio else {"max_rel_error": args.max_rel_error}
    settings = SubspaceSettings(target=target)
    work = Path(tempfile.mkdtemp(prefix="target-bench-"))
    judge = zoo_scorer(zoo, names, args.base, args.max_examples, work)
    tasks = [lora_task(zoo / "adapters" / n) for n in names]
    store = SubspaceStore.from_tasks(tasks, settings, work / "store", progress=False)
    info = store.info()
    chosen = store.manifest["settings"]["target"]["chosen"]
    mean = baselines.mean_adapter(tasks)
    rows = []
    for task in tasks:
        out = work / f"rec-{task.name}"
        store.reconstruct(task.name, out)
        row = {
            "task": task.name,
            "original": judge.folder(zoo / "adapters" / task.name, task),
            "reconstructed": judge.folder(out, task),
            "mean_adapter": judge.factors({m: mean[m] for m in task.slots}, task, "mean"),
            "base_head_only": judge.factors(baselines.zero_factors(task), task, "head"),
            "rel_error": info["per_task"][task.name]["rel_error"],
        }
        shutil.rmtree(out)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    store_bytes = info["bytes"]["store"]
    cast = _cast_source_bytes(tasks, chosen["dtype"])
    k_out = [meta["k_out"] for meta in store.manifest["slots"].values()]
    shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for method in ("reconstructed", "mean_adapter", "base_head_only"):
        norm = [r[method] / r["original"] for r in rows]
        summary[method] = {"mean_normalized": statistics.fmean(norm), "worst_normalized": min(norm)}
    return {
        "zoo": str(zoo),
        "target": target,
        "chosen": chosen,
        "k_out_range": [min(k_out), max(k_out)],
        "bytes": {"store": store_bytes, "sources": info["bytes"]["sources"], "sources_cast": cast},
        "ratio_vs_sources": info["bytes"]["sources"] / store_bytes,
        "ratio_vs_cast_sources": cast / store_bytes,
        "mean_rel_error": statistics.fmean(r["rel_error"] for r in rows),
        "max_examples": args.max_examples,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "summary": summary,
    }


def report(results: dict[str, Any], out: Path) -> None:
    s = results["summary"]
    n = results["max_examples"]
    se = normalized_se(results["rows"], n)
    lines = [
        f"# A recipe that states only `target: {json.dumps(results['target'])}`, on {Path(results['zoo']).name}",
        "",
        f"{len(results['rows'])} tasks. The tool chose **{results['chosen']['dtype']}**, k_out "
        f"{results['k_out_range'][0]}-{results['k_out_range'][1]} per slot. Store "
        f"{results['bytes']['store']:,} B: **{results['ratio_vs_sources']:.1f}x** smaller than the source "
        f"folders on disk, {results['ratio_vs_cast_sources']:.1f}x smaller than the sources cast to "
        f"{results['chosen']['dtype']}. Mean relative error {results['mean_rel_error']:.3f}. Accuracy through "
        f"PEFT on {n} examples per task (standard error of one task's normalized accuracy about {se:.3f}); "
        f"{results['threads']} torch thread(s).",
        "",
        "| method | mean normalized | worst task |",
        "|---|---:|---:|",
    ]
    for method, label in (
        ("reconstructed", "reconstructed from the store"),
        ("mean_adapter", "mean adapter (+ own head)"),
        ("base_head_only", "base + own head only"),
    ):
        lines.append(
            f"| {label} | {s[method]['mean_normalized']:.3f} | {s[method]['worst_normalized']:.3f} |"
        )
    lines += [
        "",
        "| task | own acc. | reconstructed | rel. error | mean adapter | head only |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['task']} | {r['original']:.3f} | {r['reconstructed']:.3f} | {r['rel_error']:.3f} | "
            f"{r['mean_adapter']:.3f} | {r['base_head_only']:.3f} |"
        )
    lines += ["", f"Why this dtype: {results['chosen'].get('reason', '-')}"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = zoo_parser(__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--ratio", type=float)
    group.add_argument("--max-rel-error", type=float)
    args = parser.parse_args(argv)
    return run_and_write("benchmarks.target_bench", args, argv, run, report)


if __name__ == "__main__":
    raise SystemExit(main())
