"""Plot pieces the bench and analyze reports share, so each plot says its point without the text: many slots
drawn as a band with the few slots that matter named, one colour and marker per series, integer ticks for
counts, legends beside the axes rather than over the data."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

# one colour and marker per series, the same in every plot
STYLE: dict[str, dict[str, str]] = {
    "reconstructed": {"color": "tab:blue", "marker": "o", "ls": "-"},
    "per_task_svd": {"color": "tab:orange", "marker": "s", "ls": "--"},
    "leave_one_out": {"color": "tab:green", "marker": "^", "ls": ":"},
    "vlora": {"color": "tab:purple", "marker": "D", "ls": "-."},
    "mean_adapter": {"color": "tab:brown", "marker": "", "ls": "--"},
    "base_only": {"color": "black", "marker": "", "ls": ":"},
    "original": {"color": "tab:gray", "marker": "", "ls": "-"},
}
PICKS = ("tab:green", "tab:olive", "tab:red")  # colours of the named slots: highest, median, lowest score


def short_names(modules: Iterable[str]) -> dict[str, str]:
    """Slot names without the dotted prefix they all share ('bert.encoder.layer.' -> '3.attention.self.query')."""
    modules = list(modules)
    if len(modules) < 2:
        return {m: m for m in modules}
    parts = [m.split(".") for m in modules]
    shared = len(os.path.commonprefix(parts))
    shared = min(shared, min(len(p) for p in parts) - 1)  # keep at least the last part
    return {m: ".".join(p[shared:]) for m, p in zip(modules, parts, strict=True)}


def _padded(curves: list[list[float]], pad_last: bool) -> np.ndarray:
    """Curves as rows of one array; past a curve's end its last value (pad_last) or NaN (no such point)."""
    width = max(len(c) for c in curves)
    rows = np.full((len(curves), width), np.nan)
    for row, curve in zip(rows, curves, strict=True):
        row[: len(curve)] = curve
        if pad_last and curve:
            row[len(curve) :] = curve[-1]
    return rows


def slot_band(
    ax: Any,
    curves: dict[str, list[float]],
    pick_labels: tuple[str, str, str],
    color: str = "tab:blue",
    pad_last: bool = False,
    what: str = "slots",
) -> None:
    """Draw per-slot curves (x = 1, 2, ...) as a band: min-max over slots (light), 25-75% (darker) and the
    median (line); then the slots whose curve is highest, median and lowest overall (by the mean of its
    points, padded as the band is), each named in the legend as `pick_labels` say. Without `pad_last` only
    full-length curves are ranked when there are three: a short curve (a slot few tasks touch) has no points
    where the others fall furthest apart."""
    curves = {m: c for m, c in curves.items() if c}
    if not curves:
        return
    rows = _padded(list(curves.values()), pad_last)
    x = np.arange(1, rows.shape[1] + 1)
    counted = ~np.isnan(rows).all(axis=0)
    low, q1, median, q3, high = (
        np.nanquantile(rows[:, counted], q, axis=0) for q in (0.0, 0.25, 0.5, 0.75, 1.0)
    )
    x = x[counted]
    ax.fill_between(x, low, high, color=color, alpha=0.12, lw=0, label=f"all {len(curves)} {what}: min-max")
    ax.fill_between(x, q1, q3, color=color, alpha=0.3, lw=0, label="25-75%")
    ax.plot(x, median, color=color, lw=2, label=f"median over {what}")
    names = short_names(curves)
    scores = dict(zip(curves, np.nanmean(rows, axis=1).tolist(), strict=True))
    full = [m for m in curves if len(curves[m]) == rows.shape[1]]
    ranked = sorted(curves if pad_last or len(full) < 3 else full, key=lambda m: scores[m], reverse=True)
    picks = [ranked[0], ranked[len(ranked) // 2], ranked[-1]] if len(ranked) >= 3 else ranked
    for module, label, pick_color, marker in zip(picks, pick_labels, PICKS, ("^", "o", "v"), strict=False):
        curve = curves[module]
        ax.plot(
            range(1, len(curve) + 1),
            curve,
            color=pick_color,
            lw=1.2,
            marker=marker,
            markersize=3,
            markevery=max(1, len(curve) // 12),
            label=f"{label}: {names[module]}",
        )


def integer_ticks(axis: Any) -> None:
    """Ticks at whole numbers only (component counts, k, layers)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def legend_outside(ax: Any, **kwargs: Any) -> None:
    """The legend to the right of the axes, where it hides no data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, **kwargs)


def save(fig: Any, path: Path) -> Path:
    """Write the figure with room for a legend outside the axes, and close it."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
