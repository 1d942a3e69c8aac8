"""What `add --policy` buys: tasks left out of the fit, added by projection only and by `auto` (grow when the
projection's error is above the guard), beside the fitted zoo's mean adapter and the base with the task's
own head alone. Every accuracy comes from loading the written PEFT folder through PEFT.

    OMP_NUM_THREADS=1 python -m benchmarks.add_policy_bench --zoo benchmarks/cache/mixed \
        --out benchmarks/results/add-policy-mixed --k 16 --held-out 6

Held-out tasks are spread evenly over the zoo's sorted task list (so every data source of a mixed zoo is
represented when the names group by source). They are added one after another, as a user would, so each
`auto` add sees the basis the earlier ones grew. Bytes added per task = its task file + what the basis file
grew + what the manifest grew, against the task's own source bytes on disk.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.zoo_eval import normalized_se, per_task_bars, run_and_write, zoo_names, zoo_parser, zoo_scorer


def _held_out(names: list[str], count: int) -> list[str]:
    step = len(names) / count
    return sorted({names[int(i * step + step / 2)] for i in range(count)})


def _store_bytes(path: Path) -> dict[str, int]:
    return {p.relative_to(path).as_posix(): p.stat().st_size for p in path.rglob("*") if p.is_file()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mergekit_subspace.bench import baselines
    from mergekit_subspace.recipe import SubspaceSettings
    from mergekit_subspace.sources import lora_task
    from mergekit_subspace.subspace import SubspaceStore

    zoo = Path(args.zoo)
    names = zoo_names(zoo)
    held = _held_out(names, args.held_out)
    fit_names = [n for n in names if n not in held]
    settings = SubspaceSettings(k=args.k, dtype=args.dtype, k_in=args.k_in)
    work = Path(tempfile.mkdtemp(prefix="add-policy-"))
    judge = zoo_scorer(zoo, names, args.base, args.max_examples, work)
    fit_tasks = [lora_task(zoo / "adapters" / n) for n in fit_names]
    fitted = SubspaceStore.from_tasks(fit_tasks, settings, work / "fit", progress=False)
    mean = baselines.mean_adapter(fit_tasks)
    stores = {}
    for policy in ("project", "auto"):
        shutil.copytree(fitted.path, work / policy)
        stores[policy] = SubspaceStore(work / policy)
    rows = []
    for name in held:
        task = lora_task(zoo / "adapters" / name)
        row: dict[str, Any] = {"task": name, "source_bytes": task.source_bytes}
        row["original"] = judge.folder(zoo / "adapters" / name, task)
        row["base_head_only"] = judge.factors(baselines.zero_factors(task), task, "head")
        row["mean_adapter"] = judge.factors({m: mean[m] for m in task.slots if m in mean}, task, "mean")
        for policy, store in stores.items():
            before = _store_bytes(store.path)
            guard = math.inf if policy == "project" else args.max_rel_error
            entry = store.add(task, policy=policy, max_rel_error=guard)
            after = _store_bytes(store.path)
            added = sum(after.values()) - sum(before.values())
            out = work / f"{policy}-{name}"
            store.reconstruct(name, out)
            row[policy] = judge.folder(out, task)
            shutil.rmtree(out)
            row[f"{policy}_rel_error"] = entry["rel_error"]
            row[f"{policy}_added_bytes"] = added
            row[f"{policy}_action"] = entry["action"]
            row[f"{policy}_grown_columns"] = sum(a + b for a, b in entry["grown"].values())
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "zoo": str(zoo),
        "fit_tasks": fit_names,
        "held_out": held,
        "settings": {
            "k": args.k,
            "k_in": args.k_in,
            "dtype": args.dtype,
            "max_rel_error": args.max_rel_error,
        },
        "max_examples": args.max_examples,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "summary": _summary(rows),
    }


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in ("project", "auto", "mean_adapter", "base_head_only"):
        norm = [r[method] / r["original"] for r in rows]
        out[method] = {"mean_normalized": statistics.fmean(norm), "worst_normalized": min(norm)}
    for policy in ("project", "auto"):
        share = [r[f"{policy}_added_bytes"] / r["source_bytes"] for r in rows]
        out[policy]["mean_bytes_over_source"] = statistics.fmean(share)
        out[policy]["mean_rel_error"] = statistics.fmean(r[f"{policy}_rel_error"] for r in rows)
    return out


def report(results: dict[str, Any], out: Path) -> None:
    s = results["summary"]
    lines = [
        f"# add --policy on {Path(results['zoo']).name}: tasks left out of the fit",
        "",
        f"Fit on {len(results['fit_tasks'])} tasks (k = {results['settings']['k']}, "
        f"k_in = {results['settings']['k_in']}, {results['settings']['dtype']}); "
        f"{len(results['held_out'])} held-out tasks added one after another to a copy of the store per policy "
        f"(guard max_rel_error = {results['settings']['max_rel_error']}). Accuracy through PEFT on "
        f"{results['max_examples']} examples per task; normalized = accuracy / the task's own adapter's. "
        f"{results['threads']} torch thread(s).",
        "",
        "| method | mean normalized | worst task | mean rel. error | bytes added / task's source bytes |",
        "|---|---:|---:|---:|---:|",
    ]
    for method, label in (
        ("auto", "add --policy auto"),
        ("project", "add --policy project (coefficients only)"),
        ("mean_adapter", "mean adapter of the fitted zoo (+ own head)"),
        ("base_head_only", "base + own head only"),
    ):
        cell = s[method]
        extra = (
            f"{cell['mean_rel_error']:.3f} | {cell['mean_bytes_over_source']:.3f}"
            if "mean_rel_error" in cell
            else "- | -"
        )
        lines.append(
            f"| {label} | {cell['mean_normalized']:.3f} | {cell['worst_normalized']:.3f} | {extra} |"
        )
    lines += [
        "",
        "| task | own acc. | auto | action | columns added | rel. error (auto / project) | project | mean adapter | head only |",
        "|---|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['task']} | {r['original']:.3f} | {r['auto']:.3f} | {r['auto_action']} | "
            f"{r['auto_grown_columns']} | {r['auto_rel_error']:.3f} / {r['project_rel_error']:.3f} | "
            f"{r['project']:.3f} | {r['mean_adapter']:.3f} | {r['base_head_only']:.3f} |"
        )
    n = results["max_examples"]
    se = normalized_se(results["rows"], n)
    gap = s["base_head_only"]["mean_normalized"]
    lines += [
        "",
        f"Reading: at {n} examples a task's normalized accuracy has a standard error of about {se:.3f}, and the "
        f"base with the task's own head alone already reaches {gap:.3f} normalized, so on this zoo accuracy "
        "separates the methods only coarsely; the relative error of the stored delta (auto against project) is "
        "the measured difference. A normalized value above 1 means the stored task scored better than its "
        "source on these examples, within that noise.",
    ]
    lines += [
        "",
        "Not shown: tasks from a zoo this basis has never seen at all (every held-out task here shares its data "
        "source with fitted tasks); the bytes of the grown basis are counted once, against the task that grew it.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    rows = results["rows"]
    per_task_bars(
        [r["task"] for r in rows],
        {
            m: [r[m] / r["original"] for r in rows]
            for m in ("auto", "project", "mean_adapter", "base_head_only")
        },
        out / "add_policy.png",
        "normalized accuracy",
        "held-out tasks: add --policy auto vs projection only",
        line=0.98,
    )


def rewrite_report(out: Path) -> None:
    """Rewrite report.md and the plot from a committed results.json (no re-run)."""
    report(json.loads((out / "results.json").read_text()), out)


def main(argv: list[str] | None = None) -> int:
    from mergekit_subspace.add_policy import DEFAULT_MAX_REL_ERROR

    parser = zoo_parser(__doc__)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--k-in", type=int, default=None)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--held-out", type=int, default=6)
    parser.add_argument("--max-rel-error", type=float, default=DEFAULT_MAX_REL_ERROR, help="the add guard")
    args = parser.parse_args(argv)
    return run_and_write("benchmarks.add_policy_bench", args, argv, run, report)


if __name__ == "__main__":
    raise SystemExit(main())
