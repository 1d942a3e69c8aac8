"""The files of an `analyze` run: analysis.json, summary.md and PNG plots, written as one atomic folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergekit_subspace.io.files import atomic_directory

SHOWN_PAIRS = 10


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    """A short summary a person reads: is the zoo low-dimensional beyond the nulls, who owns the directions,
    shared-init pairs, and with a base model the on- vs off-principal shares per layer."""
    zoo, source = results["zoo"], results["source"]
    slots = source["slots"]
    lines = [
        f"# Analysis of {source['kind']} `{source['path']}`",
        "",
        f"{len(source['tasks'])} tasks, {slots} slots; fit on "
        f"{'unit-norm' if results['fit']['normalize'] else 'raw-norm'} deltas; scree width k <= "
        f"{results['options']['k']}; {results['options']['seeds']} seeds per null.",
        "",
    ]
    lines += [f"- note: {note}" for note in results["notes"]]
    lines += [
        "",
        "## Is the zoo low-dimensional beyond a rank- and norm-matched random null?",
        "",
        "k needed for a share of the two-sided captured energy (median over slots; `>` counts slots that do not",
        "reach it within the scree width):",
        "",
        "| energy | zoo k | spectrum-null k | gaussian-null k |",
        "|---|---|---|---|",
    ]
    nulls = zoo["nulls"]
    for level in nulls["spectrum"]["levels"]:
        cells = []
        for kind in ("spectrum", "gaussian"):
            entry = nulls[kind]["levels"][level]
            cells.append(
                _fmt(entry["null_median"], 1)
                + (f" ({entry['null_unreached']} >)" if entry["null_unreached"] else "")
            )
        zoo_entry = nulls["spectrum"]["levels"][level]
        zoo_cell = _fmt(zoo_entry["zoo_median"], 1) + (
            f" ({zoo_entry['zoo_unreached']} >)" if zoo_entry["zoo_unreached"] else ""
        )
        lines.append(f"| {float(level):.0%} | {zoo_cell} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        f"Slots beyond the null (capture at the zoo's k for 80% above the null's by > 3 sd + margin): "
        f"spectrum null {nulls['spectrum']['slots_beyond_null']}/{slots}, "
        f"gaussian null {nulls['gaussian']['slots_beyond_null']}/{slots}.",
        "",
        "| spectrum (left side, median over slots) | zoo | spectrum null | gaussian null |",
        "|---|---|---|---|",
        f"| effective rank (Roy & Vetterli) | {_fmt(zoo['effective_rank_out_median'], 1)} | "
        f"{_fmt(nulls['spectrum']['effective_rank_out_median'], 1)} | {_fmt(nulls['gaussian']['effective_rank_out_median'], 1)} |",
        f"| participation ratio 1/IPR | {_fmt(zoo['participation_out_median'], 1)} | "
        f"{_fmt(nulls['spectrum']['participation_out_median'], 1)} | {_fmt(nulls['gaussian']['participation_out_median'], 1)} |",
        "",
        f"Right (input) side effective rank, median: {_fmt(zoo['effective_rank_in_median'], 1)}.",
        "",
        "## Which tasks own the top directions (left side)",
        "",
        f"Share of the top {results['options']['leverage_k']} directions' energy, mean over the slots each "
        "task touches, beside an even share (1 / tasks of those slots), and in how many slots the task owns "
        "the first direction:",
        "",
        "| task | share | even share | ratio | owns direction 1 in |",
        "|---|---|---|---|---|",
    ]
    for owner in zoo["leverage"]["top_owners"][:5]:
        lines.append(
            f"| {owner['task']} | {owner['share']:.3f} | {owner['uniform']:.3f} | {owner['ratio']:.2f} | "
            f"{owner['owns_first']}/{zoo['leverage']['slots'][owner['task']]} |"
        )
    pairs = zoo["shared_init"]
    lines += ["", "## Shared initialization (near-identical lora_A row spaces)", ""]
    if pairs is None:
        lines.append("Not checked (the input keeps no lora_A, or no slot has two LoRA tasks).")
    else:
        lines.append(
            f"{pairs['slots_affected']}/{pairs['slots_checked']} slots have a pair with overlap >= "
            f"{results['options']['overlap_threshold']} (median pairwise overlap {_fmt(pairs['median_overlap'])}, "
            f"chance about {_fmt(pairs['chance_overlap_median'])}); {len(pairs['pairs'])} pair(s)."
        )
        if pairs["pairs"]:
            lines += ["", "| tasks | slots | mean overlap |", "|---|---|---|"]
            for pair in pairs["pairs"][:SHOWN_PAIRS]:
                lines.append(
                    f"| {' / '.join(pair['tasks'])} | {pair['slots']} | {pair['mean_overlap']:.3f} |"
                )
            lines += [
                "",
                "Such pairs share an input subspace by construction: the right-side basis is not evidence.",
            ]
    if "base" in zoo:
        lines += _base_lines(zoo["base"], results)
    lines += ["", "Definitions of every figure are in analysis.json (`definitions`).", ""]
    return "\n".join(lines)


def _base_lines(base: dict[str, Any], results: dict[str, Any]) -> list[str]:
    chance = base["chance"]
    lines = [
        "",
        f"## Against the base model's top-{results['options']['base_k']} principal directions",
        "",
        f"Base `{results['base_model']}`; singular subspaces by {', '.join(base['methods'])}. Share of each "
        "update's energy inside the base's top-k left / right directions (on-principal) vs chance, mean over "
        "tasks and slots:",
        "",
        "| layer | left on | right on | both on | both off | angle left (deg) | angle right (deg) | spectral shift | norm ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = list(base["per_layer"].items()) + [("all", base["overall"])]
    for name, entry in rows:
        lines.append(
            f"| {name} | {_fmt(entry['left_on'])} | {_fmt(entry['right_on'])} | {_fmt(entry['on_on'])} | "
            f"{_fmt(entry['off_off'])} | {_fmt(entry['left_angle_mean'], 2)} | {_fmt(entry['right_angle_mean'], 2)} | "
            f"{_fmt(entry['spectral_shift'], 4)} | {_fmt(entry['update_norm_ratio'], 4)} |"
        )
    lines.append(
        f"| chance | {_fmt(chance['left_on'])} | {_fmt(chance['right_on'])} | {_fmt(chance['on_on'])} | | | | | |"
    )
    return lines


def plots(results: dict[str, Any], folder: Path) -> list[str]:
    """scree.png (zoo vs nulls), leverage.png (task shares per slot) and, with a base, principal.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mergekit_subspace.bench.plotting import integer_ticks, legend_outside, save, short_names, slot_band

    written = []
    zoo, slots = results["zoo"], results["slots"]

    fig, ax = plt.subplots(figsize=(8, 4.5))
    slot_band(
        ax,
        {module: record["capture"] for module, record in slots.items()},
        pick_labels=("fastest to capture", "median slot", "slowest to capture"),
        pad_last=True,
    )
    for kind, color, style in (("spectrum", "tab:orange", "--"), ("gaussian", "tab:gray", ":")):
        null = zoo["nulls"][kind]["scree_mean"]
        ax.plot(
            range(1, len(null) + 1), null, color=color, lw=2, ls=style, label=f"{kind} null (mean over slots)"
        )
    ax.set(xlabel="k (directions per side)", ylabel="captured energy (two-sided, normalized)", ylim=(0, 1.02))
    ax.set_title(f"Scree: zoo vs rank- and norm-matched nulls ({len(slots)} slots)")
    integer_ticks(ax.xaxis)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    save(fig, folder / "scree.png")
    written.append("scree.png")

    names = results["source"]["tasks"]
    modules = sorted(slots)
    grid = [
        [slots[m]["leverage_out"]["task_share"].get(name, float("nan")) for m in modules] for name in names
    ]
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.3 * len(modules)), min(12, 2 + 0.25 * len(names))))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(names)), names, fontsize=6 if len(names) > 30 else 8)
    if len(modules) <= 40:  # few enough slots to name each
        short = short_names(modules)
        ax.set_xticks(range(len(modules)), [short[m] for m in modules], rotation=90, fontsize=6)
        ax.set_xlabel("slot")
    else:
        integer_ticks(ax.xaxis)
        ax.set_xlabel("slot (index into sorted slot names)")
    ax.set_title(f"Share of each slot's top-{results['options']['leverage_k']} directions owned by each task")
    fig.colorbar(image, ax=ax, label="share of the top directions' energy (blank: not in slot)")
    save(fig, folder / "leverage.png")
    written.append("leverage.png")

    if "base" in zoo:
        per_layer = zoo["base"]["per_layer"]
        layers = list(per_layer)
        chance = zoo["base"]["chance"]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for key, color, marker, meaning in (
            ("left_on", "tab:blue", "o", "left (output) side"),
            ("right_on", "tab:orange", "s", "right (input) side"),
            ("on_on", "tab:green", "^", "both sides"),
        ):
            values = [per_layer[name][key] for name in layers]
            ax.plot(layers, values, color=color, marker=marker, label=f"{meaning}: zoo")
            ax.axhline(
                chance[key], color=color, ls=":", lw=1.2, label=f"{meaning}: chance ({chance[key]:.3f})"
            )
        highest = max(
            [per_layer[name][key] or 0.0 for name in layers for key in ("left_on", "right_on")] + [0.05]
        )
        ax.set(xlabel="layer", ylabel="share of update energy", ylim=(0, min(1.02, 1.3 * highest)))
        ax.set_title(f"Update energy on the base's top-{results['options']['base_k']} principal directions")
        ax.grid(alpha=0.3)
        legend_outside(ax)
        save(fig, folder / "principal.png")
        written.append("principal.png")
    return written


def write_analysis(results: dict[str, Any], out: Path, overwrite: bool = False) -> list[str]:
    """analysis.json, summary.md and the plots into `out`, atomically (the old folder or the new one)."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "analysis.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        (tmp / "summary.md").write_text(markdown(results))
        written = plots(results, tmp)
    return ["analysis.json", "summary.md", *written]
