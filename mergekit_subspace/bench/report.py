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
    timing = results["timing"]
    if "total_seconds" in timing:  # runs before the phases were timed have only fit seconds per k
        per_k = sum(timing[k]["fit_seconds"] + timing[k]["eval_seconds"] for k in results["summary"])
        lines[-1:] = [
            f"Wall time: {timing['total_seconds']:.1f} s from start to the last plot (reading adapters and "
            f"data {timing['load_seconds']:.1f} s, original / base-only / mean adapter "
            f"{timing['baselines_seconds']:.1f} s with the first model load, fitting and scoring per k "
            f"{per_k:.1f} s, plots {timing['plot_seconds']:.1f} s).",
            "",
        ]
    return "\n".join(lines)


def slot_spectra(store: Any) -> dict[str, Any]:
    """What the slot plots draw, kept in results.json so they can be drawn again from it alone: per slot the
    cumulative captured energy of the left basis (scree) and the singular values, over the largest, of the
    tasks x core-entries matrix of its coefficients (4 significant digits)."""
    import torch

    def short(values: list[float]) -> list[float]:
        return [float(f"{v:.4g}") for v in values]

    scree = {}
    for module, slot in sorted(store.manifest["slots"].items()):
        spectrum = slot["spectrum_out"]
        scree[module] = short([sum(spectrum[: i + 1]) for i in range(len(spectrum))])
    cores_by_task = {t: store.cores(t) for t in store.tasks}
    coefficients = {}
    for module in store.slots:
        cores = [c[module].flatten().double() for c in cores_by_task.values() if module in c]
        if len(cores) < 2:
            continue
        values = torch.linalg.svdvals(torch.stack(cores))
        if float(values[0]) > 0:
            coefficients[module] = short((values / values[0]).tolist())
    return {"scree": scree, "coefficients": coefficients}


def _label_points(ax: Any, points: list[tuple[float, float, str]], color: str, below: bool) -> None:
    """'k=8' beside each point (above right; below left for `below`, which keeps it off the right edge);
    points at the same place (vLoRA's smallest subspace at several k) get one label naming every k."""
    at: dict[tuple[float, float], list[str]] = {}
    for x, y, k in points:
        at.setdefault((x, y), []).append(k)
    for (x, y), ks in at.items():
        ax.annotate(
            "k=" + ", ".join(ks),
            (x, y),
            xytext=(-5, -12) if below else (5, 5),
            textcoords="offset points",
            ha="right" if below else "left",
            fontsize=8,
            color=color,
        )


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    """scree.png, accuracy_vs_bytes.png and coefficient_spectrum.png, drawn from `results` alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mergekit_subspace.bench.plotting import STYLE, integer_ticks, legend_outside, save, slot_band

    budgets = [int(k) for k in results["budgets"]]
    largest = max(budgets)
    spectra = results["spectra"]
    written = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    slot_band(
        ax,
        spectra["scree"],
        pick_labels=("fastest to capture", "median slot", "slowest to capture"),
        pad_last=True,
    )
    for k in budgets:
        ax.axvline(k, color="grey", lw=0.8, ls="--")
        ax.annotate(
            f"store k={k}",
            (k, 0.02),
            xytext=(-3, 0),
            textcoords="offset points",
            fontsize=8,
            color="grey",
            rotation=90,
            ha="right",
            va="bottom",
        )
    ax.set(xlabel="k (left basis directions)", ylabel="captured energy (normalized deltas)", ylim=(0, 1.02))
    ax.set_title(f"Energy the shared basis captures as k grows ({len(spectra['scree'])} slots)")
    integer_ticks(ax.xaxis)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    written.append(save(fig, out / "scree.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    keys = [str(k) for k in budgets]
    x = [results["bytes"]["per_k"][k]["store"] for k in keys]
    for method in ("reconstructed", "per_task_svd", "leave_one_out", "vlora"):
        y = [results["summary"][k][method]["mean_normalized"] for k in keys]
        if method == "vlora" and isinstance(results["peers"].get("vlora"), dict):
            xs = [results["peers"]["vlora"][k]["bytes"] for k in keys]
        else:
            xs = x
        points = [(a, b, k) for a, b, k in zip(xs, y, keys, strict=True) if b is not None]
        if not points:
            continue
        ours = method == "reconstructed"  # drawn largest and filled; the others hollow, so none hides another
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            label=method,
            markersize=8 if ours else 6,
            markerfacecolor=None if ours else "none",
            zorder=3 if ours else 2,
            **STYLE[method],
        )
        if method in ("reconstructed", "vlora"):
            _label_points(ax, points, STYLE[method]["color"], below=not ours)
    ax.axhline(1.0, color=STYLE["original"]["color"], lw=1, label="original adapters (= 1)")
    for method in ("mean_adapter", "base_only"):
        value = results["summary"][keys[0]][method]["mean_normalized"]
        if value is not None:
            style = STYLE[method]
            ax.axhline(value, color=style["color"], ls=style["ls"], lw=1, label=f"{method} ({value:.3f})")
    ax.axvline(results["bytes"]["sources"], color="tab:red", lw=1, label="source adapters' bytes")
    ax.set_xscale("log")
    ax.set(xlabel="bytes on disk (log)", ylabel="mean normalized accuracy (method / original)")
    ax.set_title("Accuracy against bytes (points labelled with the store's k)")
    ax.grid(alpha=0.3)
    legend_outside(ax)
    written.append(save(fig, out / "accuracy_vs_bytes.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    slot_band(
        ax,
        spectra["coefficients"],
        pick_labels=("slowest decay", "median slot", "fastest decay"),
        color="tab:purple",
    )
    ax.set_yscale("log")
    ax.set(xlabel="component", ylabel="singular value / largest (log)")
    ax.set_title(f"How low-rank the tasks' coefficients are, per slot (k = {largest})")
    integer_ticks(ax.xaxis)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    written.append(save(fig, out / "coefficient_spectrum.png"))
    return written


def write_markdown(results: dict[str, Any], out: Path) -> None:
    atomic_write_bytes(out / "report.md", markdown(results).encode())
