"""Merge speed and memory at LLM layer size: ours vs mergekit 0.1.5 and PEFT on synthetic LoRAs.

MiniLM's 384 x 384 modules make mergekit's dense work tiny, so the text-zoo benchmark says little about the
models people merge. Here the adapters are random (nothing is evaluated, only time and memory), shaped like
Llama-7B: `--layers` layers x (q_proj, v_proj), each 4096 x 4096 (`--modules attn mlp` adds gate_proj, up_proj
11008 x 4096 and down_proj 4096 x 11008), rank 16, 8 tasks. Every tool starts from the same PEFT folders on disk
and writes its own output, and every merge of every repeat runs in its own fresh interpreter:

- ours: `merge` from the adapter folders (read, fit the exact shared basis, merge the cores, write one PEFT
  folder); one more row writes the full merged weights (`output.format: full`) from the base folder;
- mergekit: `merge_state_dicts` on W_base + s B A of the adapted modules only (its most favourable input:
  nothing else of the model is read or merged), written as merged safetensors: the like-for-like output of
  our full row;
- PEFT: `add_weighted_adapter` on the adapters loaded into a module tree holding only the adapted linears.

The base folder holds only the adapted weights. The adapters' `task_type` is null (LoraConfig's default), so
PEFT wraps that bare module tree in a plain PeftModel; nothing else of the PEFT format is changed.

Run from the repository root:  python -m benchmarks.merge_scale [--out benchmarks/results/merge]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import merge_peers
from benchmarks.merge_bench import DENSITY, THREADS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MERGEKIT = ("task_arithmetic", "ties", "dare_ties")
# Ours only: mergekit 0.1.5 has no TSV, Iso-C, KnOTS or Core Space merge.
OURS = (*MERGEKIT, "iso_c", "tsv", "knots_ties", "core_ties")
PEFT = ("cat", "svd", "ties_svd")
# The method of ours each PEFT combination is compared with: cat is task arithmetic exactly, svd is task
# arithmetic truncated to the largest input rank, ties_svd is TIES on the dense deltas, then truncated.
PEFT_COUNTERPART = {"cat": "task_arithmetic", "svd": "task_arithmetic", "ties_svd": "ties"}
SPARSIFYING = {"ties", "dare_ties", "knots_ties", "core_ties", "ties_svd"}
# PEFT's svd / ties_svd take a dense SVD of every module (~30 s each at 4096 x 4096 on one thread).
SLOW = {("peft", "svd"), ("peft", "ties_svd")}
FULL_METHOD = "task_arithmetic"
MODULE_SETS = {"attn": ("q_proj", "v_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
LLAMA_7B_MLP = 11008
FAMILIES = ("ours", "mergekit", "peft")


# --------------------------------------------------------------------------------------------- inputs


def module_shapes(dim: int, layers: int, sets: list[str]) -> dict[str, tuple[int, int]]:
    """Module name -> (out, in), as nn.Linear stores it; the MLP keeps Llama-7B's 11008 / 4096 ratio."""
    hidden = dim * LLAMA_7B_MLP // 4096
    shapes = {"q_proj": (dim, dim), "v_proj": (dim, dim)}
    shapes |= {"gate_proj": (hidden, dim), "up_proj": (hidden, dim), "down_proj": (dim, hidden)}
    out = {}
    for i in range(layers):
        for group in sets:
            block = "self_attn" if group == "attn" else "mlp"
            for name in MODULE_SETS[group]:
                out[f"model.layers.{i}.{block}.{name}"] = shapes[name]
    return out


def make_synthetic(
    root: Path, shapes: dict[str, tuple[int, int]], tasks: int, rank: int
) -> tuple[Path, list[Path]]:
    """A base folder holding only the adapted weights, and `tasks` PEFT LoRA folders on it."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    base = root / "base"
    base.mkdir(parents=True)
    save_file(
        {f"{m}.weight": torch.randn(o, i, generator=gen) * 0.02 for m, (o, i) in shapes.items()},
        base / "model.safetensors",
    )
    layers = 1 + max(int(m.split(".")[2]) for m in shapes)
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    targets = sorted({m.rsplit(".", 1)[1] for m in shapes})
    adapters = []
    for t in range(tasks):
        folder = root / "adapters" / f"task{t}"
        folder.mkdir(parents=True)
        tensors = {}
        for m, (o, i) in shapes.items():
            tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(rank, i, generator=gen) / i**0.5
            tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(o, rank, generator=gen) * 0.01
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": 2 * rank,
            "target_modules": targets,
            "base_model_name_or_path": str(base),
            "task_type": None,
            "fan_in_fan_out": False,
            "lora_dropout": 0.0,
            "bias": "none",
        }
        (folder / "adapter_config.json").write_text(json.dumps(config))
        adapters.append(folder)
    return base, adapters


# ---------------------------------------------------------------------------------------------- workers


def worker_ours(job: dict[str, Any]) -> dict[str, Any]:
    from mergekit_subspace.merge import merge

    params = {"density": DENSITY} if job["method"] in SPARSIFYING else {}
    output: dict[str, Any] = {"path": job["out"], "heads": "none", "format": job["format"]}
    recipe: dict[str, Any] = {
        "merge_method": job["method"],
        "adapters": job["adapters"],
        "parameters": params,
        "output": output,
    }
    if job["format"] == "full":
        recipe["base_model"] = job["base"]
    seconds = merge(recipe, progress=False).report["seconds"]
    return {"merge_s": seconds["merge"], "end_to_end_s": seconds["total"], "phases": seconds}


def worker_mergekit(job: dict[str, Any]) -> dict[str, Any]:
    return merge_peers.mergekit_merge(job["adapters"], job["base"], job["method"], DENSITY, None)


def load_module_tree(base: str) -> Any:
    """The adapted linears of the base, at their dotted names, loaded with the base weights (PEFT's input)."""
    import torch
    from safetensors.torch import load_file

    root = torch.nn.Module()
    for key, weight in load_file(Path(base) / "model.safetensors").items():
        *parents, leaf, _ = key.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        node.add_module(leaf, linear)
    return root


def worker_peft(job: dict[str, Any]) -> dict[str, Any]:
    return merge_peers.peft_merge(
        job["adapters"], lambda: load_module_tree(job["base"]), job["method"], DENSITY, Path(job["out"])
    )


WORKERS = {"ours": worker_ours, "mergekit": worker_mergekit, "peft": worker_peft}


def worker_main(job_path: str) -> None:
    """One merge in this fresh interpreter, with its time and peak RSS."""
    import torch

    torch.set_num_threads(THREADS)
    merge_peers.worker_loop(json.loads(Path(job_path).read_text()), WORKERS)


# ------------------------------------------------------------------------------------------------ runs


def cells(full: bool) -> list[dict[str, str]]:
    """Every (tool, method, output format) the benchmark times."""
    out = [{"family": "ours", "method": m, "format": "peft"} for m in OURS]
    if full:
        out.append({"family": "ours", "method": FULL_METHOD, "format": "full"})
    out += [{"family": "mergekit", "method": m, "format": "merged weights"} for m in MERGEKIT]
    out += [{"family": "peft", "method": m, "format": "peft"} for m in PEFT]
    return out


def label(cell: dict[str, str]) -> str:
    suffix = " (full weights)" if cell["family"] == "ours" and cell["format"] == "full" else ""
    return f"{cell['family']} {cell['method']}{suffix}"


def run_one(cell: dict[str, str], base: Path, adapters: list[Path], work: Path) -> dict[str, Any]:
    """One merge in a fresh interpreter; `process_s` is its wall time from spawn to exit (imports included)."""
    out = work / "out"
    part = {"method": cell["method"], "size": len(adapters), "out": str(out), "format": cell["format"]}
    job = {
        "family": cell["family"],
        "base": str(base),
        "adapters": [str(a) for a in adapters],
        "runs": [part],
    }
    tick = time.perf_counter()
    (result,) = merge_peers.run_worker(job, work, "benchmarks.merge_scale")
    result["process_s"] = time.perf_counter() - tick
    shutil.rmtree(out, ignore_errors=True)
    return result


STATS = ("merge_s", "end_to_end_s", "process_s", "peak_rss_mb", "merge_rss_mb")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and min-max over repeats of each measured quantity."""
    for run in runs:
        run["merge_rss_mb"] = run["peak_rss_mb"] - run["rss_before_mb"]
    out: dict[str, Any] = {"repeats": len(runs)}
    for key in STATS:
        values = [r[key] for r in runs]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def find(rows: list[dict[str, Any]], family: str, method: str, fmt: str | None = None) -> dict[str, Any]:
    return next(
        r for r in rows if r["family"] == family and r["method"] == method and fmt in (None, r["format"])
    )


def comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Speed-ups peer / ours on medians, for each peer row against its counterpart of ours."""
    pairs = [(find(rows, "mergekit", m), find(rows, "ours", m, "peft")) for m in MERGEKIT]
    if any(r["format"] == "full" for r in rows):
        pairs.append((find(rows, "mergekit", FULL_METHOD), find(rows, "ours", FULL_METHOD, "full")))
    pairs += [(find(rows, "peft", m), find(rows, "ours", PEFT_COUNTERPART[m], "peft")) for m in PEFT]
    out = []
    for peer, ours in pairs:
        ratio = {k: peer[k]["median"] / max(ours[k]["median"], 1e-9) for k in ("merge_s", "end_to_end_s")}
        ratio["process_s"] = peer["process_s"]["median"] / ours["process_s"]["median"]
        ratio["peak_rss_mb"] = peer["peak_rss_mb"]["median"] / ours["peak_rss_mb"]["median"]
        out.append({"peer": peer["label"], "ours": ours["label"], "ratio": ratio})
    return out


# ---------------------------------------------------------------------------------------------- report


def _cell(stat: dict[str, float], digits: int) -> str:
    return f"{stat['median']:.{digits}f} ({stat['min']:.{digits}f}-{stat['max']:.{digits}f})"


def _ratio(value: float) -> str:
    return f"{value:.0f}x" if value >= 100 else f"{value:.2g}x"


def markdown(result: dict[str, Any]) -> str:
    shapes = result["shapes"]
    kinds = sorted({f"{o} x {i}" for o, i in shapes.values()})
    lines = [
        f"# Merge speed and memory at LLM layer size ({result['tasks']} synthetic LoRAs, rank {result['rank']})",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; load average {result['loadavg_start']} at the start, "
        f"{result['loadavg_end']} at the end (the cores are shared with other work: absolute seconds are noisy, "
        f"ratios less so). torch {result['versions']['torch']}, peft {result['versions']['peft']}, mergekit "
        f"{result['versions']['mergekit']}; {THREADS} torch thread and OMP_NUM_THREADS="
        f"{result['omp_num_threads']} for every tool. Run took {result['seconds_total'] / 60:.1f} min.",
        "",
        f"Inputs: {result['layers']} layers x ({', '.join(result['targets'])}) = {len(shapes)} modules of "
        f"{', '.join(kinds)} (Llama-7B shapes), {result['tasks']} tasks, rank {result['rank']}, density "
        f"{DENSITY} for every sparsifying method (ours and peers). Random adapters: only time and memory are "
        "measured here; what the methods are worth is in merge_bench.md.",
        "",
        "Each cell is the median (min-max) over the repeats in the `n` column; every repeat of every row is its "
        "own fresh interpreter. *merge s* = the merge step alone (ours: arithmetic on the cores and the merged "
        "factors; mergekit: `merge_state_dicts`; PEFT: `add_weighted_adapter`). *end-to-end s* = inputs on disk "
        "-> the tool's output on disk, inside that process (ours: read adapters, fit the exact shared basis, "
        "merge, write one PEFT folder, or the full merged weights; mergekit: read adapters and base, materialize "
        "W_base + s B A per task, merge, write the merged weights; PEFT: build the module tree from the base, "
        "load the adapters, merge, save). *process s* = the same run timed from spawning the interpreter to its "
        "exit (Python start and imports of torch, transformers, peft and the tool included). Peak RSS is the "
        f"process's VmHWM, ~{result['import_rss_mb']:.0f} MB of it imports; (+N) is what the merge added.",
        "",
        "**mergekit receives only the adapted modules** (W_base + s B A for those, nothing else of the model): "
        "its most favourable input. A real mergekit run on LoRAs (`base+lora` in mergekit-yaml) first merges "
        "each LoRA into a full copy of the model and then merges every tensor, which costs more.",
        "",
        "| tool | method | output | n | merge s | end-to-end s | process s | peak RSS MB (+ merge) |",
        "|---|---|---|---:|---|---|---|---|",
    ]
    for row in result["rows"]:
        rss = row["peak_rss_mb"]["median"]
        lines.append(
            f"| {row['family']} | {row['method']} | {row['format']} | {row['repeats']} "
            f"| {_cell(row['merge_s'], 3)} | {_cell(row['end_to_end_s'], 2)} | {_cell(row['process_s'], 2)} "
            f"| {rss:.0f} (+{row['merge_rss_mb']['median']:.0f}) |"
        )
    lines += [
        "",
        "iso_c, tsv, knots_ties and core_ties are ours only: mergekit 0.1.5 has no TSV, Iso-C, KnOTS or Core "
        "Space merge, and PEFT has none of them.",
        "",
        "## Ratios (peer / ours, medians; above 1 = ours faster or smaller)",
        "",
        "| peer | ours | merge | end-to-end | process | peak RSS |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for c in result["comparisons"]:
        r = c["ratio"]
        lines.append(
            f"| {c['peer']} | {c['ours']} | {_ratio(r['merge_s'])} | {_ratio(r['end_to_end_s'])} "
            f"| {r['process_s']:.1f}x | {r['peak_rss_mb']:.1f}x |"
        )
    lines += [
        "",
        "## Target (issue 14: 8 tasks of 4096-wide modules, 10x faster than mergekit end to end)",
        "",
    ]
    lines += [f"- {line}" for line in result["targets_met"]]
    lines += ["", "## Notes", ""]
    lines += [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def target_lines(result: dict[str, Any]) -> list[str]:
    """'8 tasks of 4096-wide modules at least 10x faster than mergekit end to end', per mergekit method."""
    out = []
    for c in result["comparisons"]:
        if not c["peer"].startswith("mergekit"):
            continue
        e2e, proc = c["ratio"]["end_to_end_s"], c["ratio"]["process_s"]
        verdict = "met" if e2e >= 10 else "MISSED"
        out.append(
            f"{c['peer']} vs {c['ours']}: {e2e:.1f}x end to end -> 10x target {verdict} "
            f"({proc:.1f}x counting interpreter start and the imports every worker makes)"
        )
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Horizontal bars per row, log seconds, medians with min-max whiskers: merge step and end to end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = result["rows"]
    colors = {"ours": "tab:blue", "mergekit": "tab:orange", "peft": "tab:green"}
    labels = [r["label"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.42 * len(rows) + 1.8), sharey=True)
    for ax, key, title in zip(axes, ("merge_s", "end_to_end_s"), ("merge step", "end to end"), strict=True):
        med = [r[key]["median"] for r in rows]
        err = [[m - r[key]["min"] for m, r in zip(med, rows, strict=True)]]
        err.append([r[key]["max"] - m for m, r in zip(med, rows, strict=True)])
        ax.barh(labels, med, xerr=err, color=[colors[r["family"]] for r in rows], capsize=2)
        for y, (value, row) in enumerate(zip(med, rows, strict=True)):
            ax.text(row[key]["max"] * 1.12, y, f"{value:.3g}", va="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(min(med) / 2, max(med) * 4)
        ax.xaxis.set_major_locator(LogLocator(base=10))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{title}: seconds (log), median, min-max")
    axes[0].invert_yaxis()
    fig.suptitle(
        f"{result['tasks']} LoRAs (rank {result['rank']}) on {len(result['shapes'])} Llama-7B-shaped modules, "
        f"{THREADS} thread; mergekit gets only the adapted modules"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/merge")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--modules", nargs="+", choices=sorted(MODULE_SETS), default=["attn"])
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs per row (medians)")
    parser.add_argument(
        "--slow-repeats", type=int, default=1, help="repeats of PEFT svd / ties_svd (a dense SVD per module)"
    )
    parser.add_argument("--no-full", action="store_true", help="skip our full-weights row")
    parser.add_argument("--only", nargs="+", help="families to run (ours mergekit peft); for quick checks")
    args = parser.parse_args(argv)
    if min(args.repeats, args.slow_repeats, args.tasks, args.layers, args.rank, args.dim) < 1:
        parser.error("--repeats, --slow-repeats, --tasks, --layers, --rank and --dim must be at least 1")
    merge_peers.mergekit_pythonpath()  # fails here, with the install line, rather than after the inputs

    import peft
    import torch
    import transformers

    started = time.perf_counter()
    loadavg_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    shapes = module_shapes(args.dim, args.layers, args.modules)
    plan = [c for c in cells(not args.no_full) if args.only is None or c["family"] in args.only]
    work = Path(tempfile.mkdtemp(prefix="merge-scale-"))
    try:
        base, adapters = make_synthetic(work / "in", shapes, args.tasks, args.rank)
        runs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(plan))}
        for repeat in range(args.repeats):
            # Interleaved (every row once per repeat), so drift in the machine's load reaches every tool.
            for i, cell in enumerate(plan):
                if repeat >= args.slow_repeats and (cell["family"], cell["method"]) in SLOW:
                    continue
                result = run_one(cell, base, adapters, work)
                runs[i].append(result)
                print(
                    f"repeat {repeat + 1}/{args.repeats} {label(cell)}: merge {result['merge_s']:.3f}s "
                    f"e2e {result['end_to_end_s']:.2f}s process {result['process_s']:.2f}s "
                    f"rss {result['peak_rss_mb']:.0f}MB",
                    flush=True,
                )
        rows = [
            cell | {"label": label(cell)} | summarize(runs[i]) | {"runs": runs[i]}
            for i, cell in enumerate(plan)
        ]
        result: dict[str, Any] = {
            "command": "python -m benchmarks.merge_scale "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
            "torch_threads": THREADS,
            "versions": {
                "torch": torch.__version__,
                "peft": peft.__version__,
                "transformers": transformers.__version__,
                "mergekit": merge_peers.mergekit_version(),
            },
            "dim": args.dim,
            "layers": args.layers,
            "module_sets": args.modules,
            "targets": [m for group in args.modules for m in MODULE_SETS[group]],
            "shapes": shapes,
            "tasks": args.tasks,
            "rank": args.rank,
            "density": DENSITY,
            "repeats": args.repeats,
            "slow_repeats": args.slow_repeats,
            "import_rss_mb": statistics.median(r["baseline_rss_mb"] for row in rows for r in row["runs"]),
            "import_s": statistics.median(
                r["process_s"] - r["end_to_end_s"] for row in rows for r in row["runs"]
            ),
            "rows": rows,
            "loadavg_start": loadavg_start,
            "loadavg_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "seconds_total": time.perf_counter() - started,
        }
        families = {r["family"] for r in rows}
        result["comparisons"] = comparisons(rows) if families == set(FAMILIES) else []
        result["targets_met"] = target_lines(result)
        result["notes"] = notes(result)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "merge_scale.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "merge_scale.md").write_text(markdown(result))
        (out / "merge_scale_command.txt").write_text(
            f"OMP_NUM_THREADS={result['omp_num_threads']} {result['command']}\n"
        )
        plot(result, out / "merge_scale.png")
        print(markdown(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def notes(result: dict[str, Any]) -> list[str]:
    out = [
        "Ours never forms a dense m x n matrix until it writes one: the basis is fit from the factors "
        "(O(m (sum r)^2)) and every method works on the small cores (at most sum r = "
        f"{result['tasks'] * result['rank']} per side), so its merge step is milliseconds and its end to end "
        "is reading and writing. mergekit's cost is the dense work on every weight entry of every task.",
        "The full-weights row writes W_base + the merged delta of every adapted module (dense by nature), the "
        "same tensors mergekit writes; it is the like-for-like output for the mergekit rows.",
        f"PEFT cat is exact (rank {result['tasks']} x {result['rank']} = {result['tasks'] * result['rank']}) and "
        "costs little; svd and ties_svd form each dense delta and take a full SVD of it (PEFT's defaults, "
        f"svd_rank = the largest input rank, {result['rank']}), which dominates their time.",
        "*process s* counts the interpreter start and the imports every worker makes alike (torch, "
        "transformers, peft, mergekit_subspace.merge, and mergekit for its rows; benchmarks/merge_peers.py), "
        f"~{result['import_s']:.0f} s on this shared machine: a fixed cost that shrinks every ratio toward 1.",
    ]
    full = [r for r in result["rows"] if r["format"] == "full"]
    if full:
        write = statistics.median(run["phases"]["write"] for run in full[0]["runs"])
        out.append(
            f"The full-weights row spends {write:.1f} s (median) writing: W_base + B A per module (float32, "
            "merge/full.py), the safetensors bytes and the disk write of every full weight; that and the "
            "exact basis fit keep it below 10x against mergekit."
        )
    if any(r["family"] == "peft" and r["method"] == "cat" for r in result["rows"]):
        out.append(
            "PEFT cat beats ours task_arithmetic: it only concatenates the factors (rank grows with every task), "
            "while ours fits the shared basis and writes the merge at its numerical rank."
        )
    if result["slow_repeats"] < result["repeats"]:
        out.append(
            f"PEFT svd and ties_svd ran {result['slow_repeats']} repeat(s), the other rows {result['repeats']}: "
            "a dense SVD per module made more too slow for this run."
        )
    if "mlp" not in result["module_sets"]:
        out.append(
            "MLP-shaped modules (11008 x 4096) are not in this run (`--modules attn mlp` adds them): each is 2.7x "
            "an attention module for mergekit's dense work, which put ties past this run's time budget."
        )
    return out


if __name__ == "__main__":
    raise SystemExit(main())
