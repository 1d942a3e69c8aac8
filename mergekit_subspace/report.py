"""Plain-text tables of store facts, shared by the CLI and the demo."""

from __future__ import annotations

from typing import Any


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


SHOWN_TASKS = 20  # a zoo of thousands prints its summary, the worst tasks and a pointer to `info --json`


def format_info(info: dict[str, Any]) -> str:
    """Summary and per-task table of `SubspaceStore.info()`; past SHOWN_TASKS tasks, the worst ones only."""
    b = info["bytes"]
    k_values = sorted({(s["k_out"], s["k_in"]) for s in info["slots"].values()})
    capped = [m for m, s in info["slots"].items() if s["k_capped"]]
    lines = [
        f"store {info['store']}: {len(info['tasks'])} tasks, {len(info['slots'])} slots, "
        f"(k_out, k_in) in {k_values}, {info['settings']['dtype']} numbers",
        f"bytes: store {human_bytes(b['store'])} (basis {human_bytes(b['basis'])}), "
        f"sources {human_bytes(b['sources'])}, ratio {info['ratio']:.2f}x",
    ]
    if capped:
        lines.append(
            f"note: k was capped at what the slot can hold (min(dim, total rank of its tasks)) in {len(capped)} slot(s)"
        )
    solvers = sorted({s.get("solver", "exact") for s in info["slots"].values()})
    if solvers != ["exact"]:
        counts = {
            name: sum(s.get("solver", "exact") == name for s in info["slots"].values()) for name in solvers
        }
        lines.append("solver: " + ", ".join(f"{name} in {count} slot(s)" for name, count in counts.items()))
    per_task = info["per_task"]
    members: dict[int, int] = {}
    for t in per_task.values():
        if t.get("cluster") is not None:
            members[t["cluster"]] = members.get(t["cluster"], 0) + 1
    if members:
        sizes = ", ".join(f"{c}: {members[c]}" for c in sorted(members))
        lines.append(f"clusters: {len(members)}, one basis each (tasks per cluster: {sizes})")
    shown = list(per_task)
    if len(shown) > SHOWN_TASKS:
        errors = sorted(t["rel_error"] for t in per_task.values())
        lines.append(
            f"relative error over {len(errors)} tasks: median {errors[len(errors) // 2]:.4f}, worst {errors[-1]:.4f}"
            f"; the {SHOWN_TASKS} worst below (all of them: info --json)"
        )
        shown = sorted(per_task, key=lambda name: -per_task[name]["rel_error"])[:SHOWN_TASKS]
    rows = [
        [
            name,
            t["kind"],
            t["slots"],
            human_bytes(t["bytes"]),
            human_bytes(t["source_bytes"]),
            f"{t['rel_error']:.4f}",
        ]
        + (["*"] if t["added_after_fit"] else [""])
        for name, t in ((name, per_task[name]) for name in shown)
    ]
    lines += ["", table(["task", "kind", "slots", "stored", "source", "rel_error", "added"], rows)]
    return "\n".join(lines)


def describe_add(entry: dict[str, Any]) -> str:
    """One line for `add`: the task's error as stored and what was done to keep it within the guard."""
    line = (
        f"added '{entry['name']}': relative error {entry['rel_error']:.4f} over {len(entry['slots'])} slots"
    )
    if entry["action"] == "grew":
        columns = sum(a + b for a, b in entry["grown"].values())
        what = "the basis" if entry.get("cluster") is None else f"cluster {entry['cluster']}'s basis"
        line += (
            f" (projection alone: {entry['projected_rel_error']:.4f}; grew {what} by {columns} columns "
            f"in {len(entry['grown'])} slots)"
        )
    elif entry.get("cluster") is not None:
        line += f" (projected on cluster {entry['cluster']}, the one that holds it best)"
    else:
        line += " (projected on the basis as it is)"
    return line
