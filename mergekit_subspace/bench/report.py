"""report.md tables and PNG plots of a bench run (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergekit_subspace.io.files import atomic_write_bytes
from mergekit_subspace.report import human_bytes

SHOWN = ("original", "reconstructed", "per_task_svd", "vlora", "leave_one_out", "mean_adapter", "base_only")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _settings_line(settings: dict[str, Any]) -> str:
    k_in = settings.get("k_in")
    sides = f"k_in = {k_in} for the right (input-side) basis at every k" if k_in else "k_in = k"
    if settings.get("budget_bytes"):
        sides += (
            f", k_out per slot chosen under a budget of {settings['budget_bytes']:,} bytes of basis and core "
            "numbers (the k column is its upper bound; per-slot k is in results.json)"
        )
    return (
        f"Store: {settings.get('dtype', '?')} numbers, {sides}, "
        f"{'unit-norm' if settings.get('normalize', True) else 'raw-norm'} fitting, "
        f"{settings.get('refine', 0)} HOOI sweeps. Cores of low-rank tasks are kept as factors when smaller."
    )


def markdown(results: dict[str, Any]) -> str:
    b = results["bytes"]
    lines = [
        f"# Bench: {results['recipe']}",
        "",
        f"{len(results['tasks'])} tasks, eval `{results['eval']['type']}` on up to "
        f"{results['eval']['max_examples']} examples per task, every accuracy measured by loading the written "
        "PEFT folder through PEFT.",
        "",
        f"Sources on disk: {human_bytes(b['sources'])}; cast to the store dtype ({b['store_dtype']}): "
        f"{human_bytes(b['sources_cast_to_store_dtype'])}.",
        "",
        _settings_line(results.get("subspace") or {}),
        "",
        "## Summary (mean normalized accuracy = method / original, averaged over tasks)",
        "",
        "| k | store | ratio | ratio vs cast | "
        + " | ".join(SHOWN)
        + " | mean rel. error | fit s | rec. ms/task |",
        "|---" * (len(SHOWN) + 7) + "|",
    ]
    for k, entry in results["summary"].items():
        per_k = b["per_k"][k]
        timing = results["timing"][k]
        cells = [_fmt(entry[m]["mean_normalized"]) for m in SHOWN]
        lines.append(
            f"| {k} | {human_bytes(per_k['store'])} | {per_k['ratio']:.1f}x | {per_k['ratio_vs_cast_sources']:.1f}x | "
            + " | ".join(cells)
            + f" | {entry['mean_rel_error']:.3f} | {timing['fit_seconds']:.1f} | "
            f"{timing['reconstruct_ms_per_task_median']:.0f} |"
        )
    lines += [
        "",
        "Raw mean accuracy:",
        "",
        "| k | " + " | ".join(SHOWN) + " |",
        "|---" * (len(SHOWN) + 1) + "|",
    ]
    for k, entry in results["summary"].items():
        lines.append(f"| {k} | " + " | ".join(_fmt(entry[m]["mean_accuracy"]) for m in SHOWN) + " |")
    largest = str(max(results["budgets"]))
    lines += [
        "",
        f"## Per task at k = {largest}",
        "",
        "| task | " + " | ".join(SHOWN) + " | rel. error | LOO rel. error | SVD rank |",
        "|---" * (len(SHOWN) + 4) + "|",
    ]
    for name, per_k in results["per_task"].items():
        row = per_k[largest]
        lines.append(
            f"| {name} | "
            + " | ".join(_fmt(row.get(m)) for m in SHOWN)
            + f" | {row['rel_error']:.3f} | {_fmt(row.get('leave_one_out_rel_error'))} | {row['per_task_svd_rank']} |"
        )
    if results["peers"]:
        lines += [
            "",
            "## Peers",
            "",
            "```json",
            json.dumps(results["peers"], indent=2, sort_keys=True),
            "```",
        ]
    lines += ["", "## What this run could not show", ""] + [f"- {note}" for note in results["not_shown"]]
    lines += ["", f"Peak RSS: {results['peak_rss_mib']:.0f} MiB.", ""]
    return "\n".join(lines)


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    largest = str(max(results["budgets"]))
    manifest = json.loads((out / "stores" / f"k{largest}" / "manifest.json").read_text())

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for _module, slot in sorted(manifest["slots"].items()):
        spectrum = slot["spectrum_out"]
        cumulative = [sum(spectrum[: i + 1]) for i in range(len(spectrum))]
        ax.plot(range(1, len(cumulative) + 1), cumulative, alpha=0.35, lw=1)
    ax.set(xlabel="k (left basis directions)", ylabel="captured energy (normalized deltas)", ylim=(0, 1.02))
    ax.set_title(f"Scree per slot ({len(manifest['slots'])} slots)")
    ax.grid(alpha=0.3)
    written.append(out / "scree.png")
    fig.tight_layout()
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    budgets = [str(k) for k in results["budgets"]]
    x = [results["bytes"]["per_k"][k]["store"] for k in budgets]
    for method, style in (
        ("reconstructed", "o-"),
        ("per_task_svd", "s--"),
        ("leave_one_out", "^:"),
        ("vlora", "d-."),
    ):
        y = [results["summary"][k][method]["mean_normalized"] for k in budgets]
        if method == "vlora" and isinstance(results["peers"].get("vlora"), dict):
            xs = [results["peers"]["vlora"][k]["bytes"] for k in budgets]
        else:
            xs = x
        points = [(a, b) for a, b in zip(xs, y, strict=True) if b is not None]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=method)
    for method, color in (("mean_adapter", "grey"), ("base_only", "black")):
        value = results["summary"][budgets[0]][method]["mean_normalized"]
        if value is not None:
            ax.axhline(value, color=color, ls="--", lw=1, label=method)
    ax.axvline(results["bytes"]["sources"], color="tab:red", lw=1, label="source adapters (bytes)")
    ax.set_xscale("log")
    ax.set(xlabel="bytes on disk", ylabel="mean normalized accuracy")
    ax.set_title("Accuracy against bytes")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    written.append(out / "accuracy_vs_bytes.png")
    fig.tight_layout()
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    import torch

    from mergekit_subspace.subspace import SubspaceStore

    store = SubspaceStore(out / "stores" / f"k{largest}")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cores_by_task = {t: store.cores(t) for t in store.tasks}
    for module in store.slots:
        cores = [c[module].flatten().double() for c in cores_by_task.values() if module in c]
        if len(cores) < 2:
            continue
        values = torch.linalg.svdvals(torch.stack(cores))
        ax.plot(range(1, len(values) + 1), (values / values[0]).tolist(), alpha=0.35, lw=1)
    ax.set_yscale("log")
    ax.set(xlabel="component", ylabel="singular value / largest")
    ax.set_title("Spectrum of the per-task coefficients (tasks x core entries), per slot")
    ax.grid(alpha=0.3)
    written.append(out / "coefficient_spectrum.png")
    fig.tight_layout()
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def write_report(results: dict[str, Any], out: Path) -> None:
    atomic_write_bytes(out / "report.md", markdown(results).encode())
    plots(results, out)
