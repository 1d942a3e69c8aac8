"""A recipe that states only a target (`subspace: {target: {ratio: R}}`), measured: the store the tool
chose, every task reconstructed and scored through PEFT, beside the zoo's mean adapter and the base with each
task's own head alone.

    OMP_NUM_THREADS=1 python -m benchmarks.target_bench --zoo benchmarks/cache/mixed \
        --out benchmarks/results/target-mixed --ratio 20 [--calibration-texts 16] [--clusters auto]

Ratios are stated against the source folders on disk and against the sources cast to the chosen dtype.
Beside the store: leave-one-out (each task projected on a basis fit without it, at the store's own k per
slot), per-task SVD at the store's numbers per task, the mean adapter and the base with each task's head.

`--calibration-texts N` adds `calibration:` to the recipe: N texts per task from the end of its eval file,
past the `--max-examples` lines that are scored, so no scored text is ever a calibration text.
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

from benchmarks.zoo_eval import normalized_se, per_task_bars, run_and_write, zoo_names, zoo_parser, zoo_scorer

METHODS = {
    "reconstructed": "reconstructed from the store",
    "leave_one_out": "leave-one-out (basis fit without the task)",
    "per_task_svd": "per-task SVD at the store's numbers per task",
    "mean_adapter": "mean adapter (+ own head)",
    "base_head_only": "base + own head only",
}


def _calibration_file(zoo: Path, names: list[str], args: argparse.Namespace, out: Path) -> Path:
    """`--calibration-texts` texts per task, taken past the scored lines of each eval file."""
    lines = []
    for name in names:
        rows = (zoo / "eval" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        unscored = rows[args.max_examples :]
        if len(unscored) < args.calibration_texts:
            raise SystemExit(
                f"{name}: {len(unscored)} eval lines past --max-examples {args.max_examples}, "
                f"fewer than --calibration-texts {args.calibration_texts}"
            )
        lines += [json.dumps({"text": json.loads(r)["text"]}) for r in unscored[: args.calibration_texts]]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mergekit_subspace.bench import baselines
    from mergekit_subspace.bench.run import _cast_source_bytes
    from mergekit_subspace.recipe import SubspaceSettings
    from mergekit_subspace.sources import lora_task
    from mergekit_subspace.subspace import SubspaceStore

    zoo = Path(args.zoo)
    names = zoo_names(zoo)
    target = {"ratio": args.ratio} if args.ratio else {"max_rel_error": args.max_rel_error}
    work = Path(tempfile.mkdtemp(prefix="target-bench-"))
    recipe: dict[str, Any] = {"target": target}
    if args.clusters:
        recipe["clusters"] = args.clusters if args.clusters == "auto" else int(args.clusters)
    for key in ("dtype", "core_dtype"):
        if getattr(args, key):
            recipe[key] = getattr(args, key)
    inputs = None
    if args.calibration_texts:
        recipe["calibration"] = {"data": str(_calibration_file(zoo, names, args, work / "calibration.jsonl"))}
    settings = SubspaceSettings(**recipe)
    judge = zoo_scorer(zoo, names, args.base, args.max_examples, work)
    tasks = [lora_task(zoo / "adapters" / n) for n in names]
    if settings.calibration is not None:
        from benchmarks.zoos.text import minilm_path
        from mergekit_subspace.calibration import capture_inputs

        modules = {m for t in tasks for m in t.shapes}
        base = args.base or minilm_path()
        inputs = capture_inputs(settings.calibration, base, "classify", modules, progress=False)
    store = SubspaceStore.from_tasks(tasks, settings, work / "store", progress=False, inputs=inputs)
    info = store.info()
    chosen = store.manifest["settings"]["target"]["chosen"]
    sizes = {m: (meta["k_out"], meta["k_in"]) for m, meta in store.manifest["slots"].items()}
    per_task_numbers = store.stored_numbers() / len(tasks)
    mean = baselines.mean_adapter(tasks)
    rows = []
    for index, task in enumerate(tasks):
        out = work / f"rec-{task.name}"
        store.reconstruct(task.name, out)
        loo, loo_error = baselines.leave_one_out(tasks, index, sizes, settings)
        svd, svd_rank = baselines.per_task_svd(task, per_task_numbers)
        row = {
            "task": task.name,
            "original": judge.folder(zoo / "adapters" / task.name, task),
            "reconstructed": judge.folder(out, task),
            "leave_one_out": judge.factors(loo, task, "loo") if loo else None,
            "per_task_svd": judge.factors(svd, task, "svd"),
            "mean_adapter": judge.factors({m: mean[m] for m in task.slots}, task, "mean"),
            "base_head_only": judge.factors(baselines.zero_factors(task), task, "head"),
            "rel_error": info["per_task"][task.name]["rel_error"],
            "leave_one_out_rel_error": loo_error,
            "per_task_svd_rank": svd_rank,
        }
        if row["leave_one_out"] is None:
            row["leave_one_out"] = row["base_head_only"]
        shutil.rmtree(out)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    store_bytes = info["bytes"]["store"]
    cast = _cast_source_bytes(tasks, chosen["dtype"])
    core_dtype = chosen.get("core_dtype", chosen["dtype"])
    cast_cores = _cast_source_bytes(tasks, core_dtype)
    k_out = [meta["k_out"] for meta in store.manifest["slots"].values()]
    shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for method in METHODS:
        norm = [r[method] / r["original"] for r in rows]
        summary[method] = {"mean_normalized": statistics.fmean(norm), "worst_normalized": min(norm)}
    return {
        "zoo": str(zoo),
        "target": target,
        "chosen": chosen,
        "k_out_range": [min(k_out), max(k_out)],
        "bytes": {
            "store": store_bytes,
            "sources": info["bytes"]["sources"],
            "sources_cast": cast,
            "sources_cast_to_core_dtype": cast_cores,
        },
        "ratio_vs_sources": info["bytes"]["sources"] / store_bytes,
        "ratio_vs_cast_sources": cast / store_bytes,
        "ratio_vs_sources_cast_to_core_dtype": cast_cores / store_bytes,
        "mean_rel_error": statistics.fmean(r["rel_error"] for r in rows),
        "calibration": settings.calibration.model_dump() | {"data": "unscored eval texts (a temporary file)"}
        if settings.calibration
        else None,
        "calibration_texts_per_task": args.calibration_texts,
        "clusters": store.manifest["settings"].get("clusters"),
        "max_examples": args.max_examples,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "summary": summary,
    }


def report(results: dict[str, Any], out: Path) -> None:
    s = results["summary"]
    n = results["max_examples"]
    se = normalized_se(results["rows"], n)
    chosen = results["chosen"]
    core_dtype = chosen.get("core_dtype", chosen["dtype"])
    dtypes = (
        chosen["dtype"]
        if core_dtype == chosen["dtype"]
        else f"{chosen['dtype']} bases with {core_dtype} cores"
    )
    cast = f"{results['ratio_vs_cast_sources']:.1f}x smaller than the sources cast to {chosen['dtype']}"
    if core_dtype != chosen["dtype"]:
        cast += f" ({results['ratio_vs_sources_cast_to_core_dtype']:.1f}x against the sources cast to {core_dtype})"
    lines = [
        f"# A recipe that states only `target: {json.dumps(results['target'])}`, on {Path(results['zoo']).name}",
        "",
        f"{len(results['rows'])} tasks. The tool chose **{dtypes}**, k_out "
        f"{results['k_out_range'][0]}-{results['k_out_range'][1]} per slot. Store "
        f"{results['bytes']['store']:,} B: **{results['ratio_vs_sources']:.1f}x** smaller than the source "
        f"folders on disk, {cast}. Mean relative error {results['mean_rel_error']:.3f}. Accuracy through "
        f"PEFT on {n} examples per task (standard error of one task's normalized accuracy about {se:.3f}); "
        f"{results['threads']} torch thread(s).",
        "",
        "| method | mean normalized | worst task |",
        "|---|---:|---:|",
    ]
    for method, label in METHODS.items():
        lines.append(
            f"| {label} | {s[method]['mean_normalized']:.3f} | {s[method]['worst_normalized']:.3f} |"
        )
    lines += [
        "",
        "| task | own acc. | reconstructed | rel. error | leave-one-out | per-task SVD | mean adapter | head only |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['task']} | {r['original']:.3f} | {r['reconstructed']:.3f} | {r['rel_error']:.3f} | "
            f"{r['leave_one_out']:.3f} | {r['per_task_svd']:.3f} | {r['mean_adapter']:.3f} | "
            f"{r['base_head_only']:.3f} |"
        )
    lines += [
        "",
        f"Why this dtype: {chosen.get('why', '-')}; sized by {chosen.get('sized_by', 'captured weight energy')}"
        f"; predicted mean rel. error {chosen['predicted_rel_error']:.3f}.",
        "Leave-one-out and per-task SVD are scored unquantized (float factors), so they are upper bounds of "
        "what those methods would keep in the store's dtype.",
    ]
    if results.get("clusters"):
        lines.append(
            f"The store holds {results['clusters']} clusters (k_out above is the clusters' columns side by "
            "side); leave-one-out fits one basis of that union width per slot, not clusters."
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    rows = results["rows"]
    per_task_bars(
        [r["task"] for r in rows],
        {m: [r[m] / r["original"] for r in rows] for m in METHODS},
        out / "per_task.png",
        "normalized accuracy (through PEFT)",
        f"{results['ratio_vs_sources']:.1f}x store vs baselines, per task",
        line=0.98,
    )


def rewrite_report(out: Path) -> None:
    """Rewrite report.md and the plot from a committed results.json (no re-run)."""
    report(json.loads((out / "results.json").read_text()), out)


def main(argv: list[str] | None = None) -> int:
    parser = zoo_parser(__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--ratio", type=float)
    group.add_argument("--max-rel-error", type=float)
    parser.add_argument("--clusters", help="add `clusters:` to the recipe (a count or auto)")
    parser.add_argument("--dtype", help="add `dtype:` to the recipe (the target then keeps it)")
    parser.add_argument("--core-dtype", help="add `core_dtype:` to the recipe")
    parser.add_argument(
        "--calibration-texts",
        type=int,
        default=0,
        help="unscored eval texts per task as calibration data (0: none)",
    )
    args = parser.parse_args(argv)
    return run_and_write("benchmarks.target_bench", args, argv, run, report)


if __name__ == "__main__":
    raise SystemExit(main())
