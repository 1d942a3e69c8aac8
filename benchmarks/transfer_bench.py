"""What basis transfer (`subspace.transfer_from`) buys a small zoo: tasks LEFT OUT of the fit, stored as
coefficients on bases fit on 2, 4, 8 ... adapters of the target zoo, for four bases of equal width:

- transfer: fit toward a store of another zoo (the source), weight chosen per slot by leave-one-task-out;
- scratch: the plain fit on the same adapters;
- source: the source store's bases as they are, cut to the same k per slot;
- mean adapter: the fitted adapters' mean delta (no basis; each held-out task keeps its own head).

Per held-out task: captured energy (1 - relative error^2 of its projection, over all its slots) and
accuracy through PEFT (the written folder loaded by PEFT), normalized by the task's own adapter.

    OMP_NUM_THREADS=1 python -m benchmarks.transfer_bench --source-zoo benchmarks/cache/text-train \
        --zoo benchmarks/cache/mixed-transfer --out benchmarks/results/transfer --sizes 2 4 8 --held-out 2

A second table, captured energy only, repeats the fits over `--rotations` random fit sets per n with every
task outside the fit held out (cheap: no PEFT), for many more held-out projections.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.add_policy_bench import _held_out
from benchmarks.zoo_eval import normalized_se, run_and_write, zoo_names, zoo_parser, zoo_scorer

METHODS = ("transfer", "scratch", "source", "mean_adapter")


def _timed_fit(settings: Any, tasks: list[Any], repeats: int) -> tuple[Any, float]:
    """The SubspaceBasis fit on `tasks` (the last of `repeats` fits) and the median wall time of the fits."""
    from mergekit_subspace.fit import SubspaceBasis

    times, fitted = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        fitted = SubspaceBasis(settings).fit(tasks)
        times.append(time.perf_counter() - start)
    return fitted, statistics.median(times)


def _cut(source: Any, scratch: Any) -> Any:
    """The source store's bases, each slot cut to the width the scratch fit has there (the scratch bases
    where the source store lacks the slot)."""
    from mergekit_subspace.fit import SubspaceBasis

    bases = {}
    for module, (k_out, k_in) in scratch.k_.items():
        if module not in source.manifest["slots"]:
            bases[module] = scratch.bases_[module]
            continue
        U, V = source.basis(module)
        bases[module] = (U[:, :k_out], V[:, :k_in])
    return SubspaceBasis.from_bases(bases, scratch.shapes_)


def _zero(delta: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(delta.shape[0], 1, dtype=torch.float64), torch.zeros(
        1, delta.shape[1], dtype=torch.float64
    )


def _stored(fitted: Any, task: Any) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The share of the task's energy its projection keeps, and its PEFT factors; a slot the bases do not
    hold (no fitted adapter touched it) is stored as zero."""
    kept = total = 0.0
    factors = {}
    for module, delta in task.slots.items():
        total += delta.norm_sq()
        if module not in fitted.bases_:
            factors[module] = _zero(delta)
            continue
        core = delta.project(*fitted.bases_[module])
        kept += float(torch.sum(core * core))
        factors[module] = fitted.inverse_transform({module: core})[module]
    return (kept / total if total else 1.0), factors


def _mean_stored(task: Any, mean: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, dict]:
    """1 - ||D - M||^2 / ||D||^2 for the mean adapter M taken as the task (r x r products only), and M's
    factors on the task's slots (zero where no fitted adapter touched the slot)."""
    err = norm = 0.0
    factors = {}
    for module, delta in task.slots.items():
        B, A = delta.factors()
        Bm, Am = mean.get(module, _zero(delta))
        factors[module] = (Bm, Am)
        own = float(torch.sum((B.T @ B) * (A @ A.T)))
        err += (
            own + float(torch.sum((Bm.T @ Bm) * (Am @ Am.T))) - 2 * float(torch.sum((B.T @ Bm) * (A @ Am.T)))
        )
        norm += own
    return (1.0 - err / norm if norm else 1.0), factors


def _rotations(zoo: Path, names: list[str], source_path: Path, args: argparse.Namespace) -> list[dict]:
    """Captured energy only (no PEFT), over `args.rotations` random fit sets per size, every task outside
    the fit held out: many more held-out projections than the accuracy runs can afford."""
    from mergekit_subspace.bench import baselines
    from mergekit_subspace.recipe import SubspaceSettings
    from mergekit_subspace.sources import lora_task
    from mergekit_subspace.subspace import SubspaceStore

    source = SubspaceStore(source_path)
    tasks = {n: lora_task(zoo / "adapters" / n) for n in names}
    rng = random.Random(0)
    out = []
    for size in args.sizes:
        captured: dict[str, list[float]] = {m: [] for m in METHODS}
        for _ in range(args.rotations):
            fit_names = sorted(rng.sample(names, size))
            fit_tasks = [tasks[n] for n in fit_names]
            scratch, _ = _timed_fit(SubspaceSettings(k=args.k), fit_tasks, 1)
            pulled = SubspaceSettings(k=args.k, transfer_from=str(source_path))
            bases = {"transfer": _timed_fit(pulled, fit_tasks, 1)[0], "scratch": scratch}
            bases["source"] = _cut(source, scratch)
            mean = baselines.mean_adapter(fit_tasks)
            for name in names:
                if name in fit_names:
                    continue
                for method, fitted in bases.items():
                    captured[method].append(_stored(fitted, tasks[name])[0])
                captured["mean_adapter"].append(_mean_stored(tasks[name], mean)[0])
        pairs = list(zip(captured["transfer"], captured["scratch"], strict=True))
        out.append(
            {
                "size": size,
                "rotations": args.rotations,
                "held_out_projections": len(pairs),
                "captured": {m: statistics.fmean(v) for m, v in captured.items()},
                "transfer_above_scratch": sum(t > s + 1e-12 for t, s in pairs) / len(pairs),
            }
        )
        print(json.dumps(out[-1]), file=sys.stderr)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mergekit_subspace.bench import baselines
    from mergekit_subspace.recipe import SubspaceSettings
    from mergekit_subspace.sources import lora_task
    from mergekit_subspace.subspace import SubspaceStore

    zoo, source_zoo = Path(args.zoo), Path(args.source_zoo)
    names = zoo_names(zoo)
    held = _held_out(names, args.held_out)
    pool = [n for n in names if n not in held]
    work = Path(tempfile.mkdtemp(prefix="transfer-bench-"))
    source_tasks = [lora_task(source_zoo / "adapters" / n) for n in zoo_names(source_zoo)]
    start = time.perf_counter()
    source = SubspaceStore.from_tasks(
        source_tasks, SubspaceSettings(k=args.source_k), work / "source", progress=False
    )
    source_seconds = time.perf_counter() - start
    judge = zoo_scorer(zoo, names, args.base, args.max_examples, work)
    held_tasks = [lora_task(zoo / "adapters" / n) for n in held]
    reference = {}
    for task in held_tasks:
        reference[task.name] = {
            "original": judge.folder(zoo / "adapters" / task.name, task),
            "base_head_only": judge.factors(baselines.zero_factors(task), task, "head"),
        }
    runs = []
    for size in args.sizes:
        fit_names = _held_out(pool, size) if size < len(pool) else pool
        fit_tasks = [lora_task(zoo / "adapters" / n) for n in fit_names]
        plain = SubspaceSettings(k=args.k)
        pulled = SubspaceSettings(k=args.k, transfer_from=str(source.path))
        scratch, scratch_s = _timed_fit(plain, fit_tasks, args.repeats)
        moved, transfer_s = _timed_fit(pulled, fit_tasks, args.repeats)
        bases = {"transfer": moved, "scratch": scratch, "source": _cut(source, scratch)}
        mean = baselines.mean_adapter(fit_tasks)
        rows = []
        for task in held_tasks:
            row: dict[str, Any] = {"task": task.name, **reference[task.name]}
            row["slots_without_basis"] = sorted(set(task.slots) - set(scratch.bases_))
            for method, fitted in bases.items():
                row[f"{method}_captured"], factors = _stored(fitted, task)
                row[method] = judge.factors(factors, task, method)
            row["mean_adapter_captured"], factors = _mean_stored(task, mean)
            row["mean_adapter"] = judge.factors(factors, task, "mean")
            rows.append(row)
            print(json.dumps({"size": size, **row}), file=sys.stderr)
        weights = sorted(moved.transfer_weights_.values())
        runs.append(
            {
                "size": size,
                "fit_tasks": fit_names,
                "k": {m: list(v) for m, v in scratch.k_.items()},
                "transfer_weights": moved.transfer_weights_,
                "weight_median": statistics.median(weights) if weights else None,
                "fit_seconds": {"scratch": scratch_s, "transfer": transfer_s},
                "rows": rows,
                "summary": _summary(rows),
            }
        )
    rotations = _rotations(zoo, names, source.path, args) if args.rotations else []
    shutil.rmtree(work, ignore_errors=True)
    return {
        "rotations": rotations,
        "zoo": str(zoo),
        "source_zoo": str(source_zoo),
        "source_tasks": [t.name for t in source_tasks],
        "source_k": args.source_k,
        "source_fit_seconds": source_seconds,
        "held_out": held,
        "k": args.k,
        "max_examples": args.max_examples,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "runs": runs,
    }


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        method: {
            "captured": statistics.fmean(r[f"{method}_captured"] for r in rows),
            "mean_normalized": statistics.fmean(r[method] / r["original"] for r in rows),
            "worst_normalized": min(r[method] / r["original"] for r in rows),
        }
        for method in METHODS
    }


LABELS = {
    "transfer": "transfer (weight chosen per slot)",
    "scratch": "fit from scratch",
    "source": "source basis as it is (same k)",
    "mean_adapter": "mean adapter of the fit",
}


def report(results: dict[str, Any], out: Path) -> None:
    runs = results["runs"]
    held = results["held_out"]
    lines = [
        f"# Basis transfer: {Path(results['source_zoo']).name} -> {Path(results['zoo']).name}",
        "",
        f"Source store: k = {results['source_k']} fit on the {len(results['source_tasks'])} adapters of "
        f"`{Path(results['source_zoo']).name}`. Target: bases fit on n adapters of "
        f"`{Path(results['zoo']).name}` (k = {results['k']}, capped at the fit's total rank), then "
        f"{len(held)} target tasks left out of every fit ({', '.join(held)}) projected on them. "
        f"Captured = 1 - relative error^2 of the held-out task's delta over its slots; normalized accuracy = "
        f"accuracy through PEFT on {results['max_examples']} examples / the task's own adapter's. "
        f"Times: median of {results['repeats']} fits, {results['threads']} torch thread(s), shared machine.",
        "",
        "| n fit | method | held-out captured | mean normalized acc. | worst | fit s |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for run in runs:
        for method in METHODS:
            cell = run["summary"][method]
            seconds = run["fit_seconds"].get(method)
            lines.append(
                f"| {run['size']} | {LABELS[method]} | {cell['captured']:.3f} | {cell['mean_normalized']:.3f} | "
                f"{cell['worst_normalized']:.3f} | {'-' if seconds is None else f'{seconds:.2f}'} |"
            )
    rows = runs[0]["rows"]
    head_only = statistics.fmean(r["base_head_only"] / r["original"] for r in rows)
    lines += [
        "",
        "Weight chosen per slot (the prior's energy / the zoo's; 0 = plain fit):",
        "",
        "| n fit | median | min | max | slots |",
        "|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        values = list(run["transfer_weights"].values())
        lines.append(
            f"| {run['size']} | {run['weight_median']:g} | {min(values):g} | {max(values):g} | {len(values)} |"
        )
    if results.get("rotations"):
        first = results["rotations"][0]
        lines += [
            "",
            f"Captured energy alone, over {first['rotations']} random fit sets per n (every task of the target "
            "zoo outside the fit held out; no PEFT):",
            "",
            "| n fit | held-out projections | transfer | scratch | source (same k) | mean adapter | "
            "transfer > scratch |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for rot in results["rotations"]:
            c = rot["captured"]
            lines.append(
                f"| {rot['size']} | {rot['held_out_projections']} | {c['transfer']:.3f} | {c['scratch']:.3f} | "
                f"{c['source']:.3f} | {c['mean_adapter']:.3f} | {rot['transfer_above_scratch']:.0%} |"
            )
    se = normalized_se(rows, results["max_examples"])
    lines += [
        "",
        "| task | own acc. | base + own head |",
        "|---|---:|---:|",
    ]
    lines += [f"| {r['task']} | {r['original']:.3f} | {r['base_head_only']:.3f} |" for r in rows]
    lines += [
        "",
        f"Reading: base + own head alone reaches {head_only:.3f} normalized; one task's normalized accuracy has "
        f"a standard error of about {se:.3f} at {results['max_examples']} examples, and the mean over "
        f"{len(held)} held-out tasks is little better, so accuracy separates the methods only coarsely; "
        "captured energy is exact for these tasks. The mean adapter's captured energy is 1 - ||D - M||^2 / "
        "||D||^2 with M the mean delta taken as the task: below 0 where M is farther from the task than zero.",
        "",
        f"Source store fit: {results['source_fit_seconds']:.1f} s (once). Not shown: other target/source "
        "pairs, accuracy on more held-out tasks than these two, and dtypes other than float32 (the bases "
        "here are not quantized).",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot(results, out)


def _plot(results: dict[str, Any], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    runs = results["runs"]
    sizes = [run["size"] for run in runs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        axes[0].plot(
            sizes, [r["summary"][method]["captured"] for r in runs], marker="o", label=LABELS[method]
        )
        axes[1].plot(
            sizes, [r["summary"][method]["mean_normalized"] for r in runs], marker="o", label=LABELS[method]
        )
    axes[0].set_ylabel("held-out captured energy")
    axes[1].set_ylabel("held-out normalized accuracy (PEFT)")
    for ax in axes:
        ax.set_xlabel("adapters of the target zoo in the fit")
        ax.set_xticks(sizes)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"basis transfer {Path(results['source_zoo']).name} -> {Path(results['zoo']).name}")
    fig.tight_layout()
    fig.savefig(out / "transfer.png", dpi=120)


def rewrite_report(out: Path) -> None:
    """Rewrite report.md and the plot from a committed results.json (no re-run)."""
    report(json.loads((out / "results.json").read_text()), out)


def main(argv: list[str] | None = None) -> int:
    parser = zoo_parser(__doc__)
    parser.add_argument("--source-zoo", required=True, help="the zoo whose store the fits are pulled toward")
    parser.add_argument("--source-k", type=int, default=16)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--held-out", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="fits per method, for the median time")
    parser.add_argument("--rotations", type=int, default=6, help="random fit sets per n for captured energy")
    args = parser.parse_args(argv)
    return run_and_write("benchmarks.transfer_bench", args, argv, run, report)


if __name__ == "__main__":
    raise SystemExit(main())
