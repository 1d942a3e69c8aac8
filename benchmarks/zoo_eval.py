"""What the zoo benchmarks that score stores task by task share: a zoo folder's tasks, a PEFT-loading scorer
for them, the standard error of one task's normalized accuracy, and the command-line frame that pins threads
and writes results.json, command.txt and the report."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def zoo_names(zoo: Path) -> list[str]:
    """The zoo's task names: the folders under adapters/ that hold a PEFT config, sorted."""
    return sorted(p.name for p in (zoo / "adapters").iterdir() if (p / "adapter_config.json").is_file())


def zoo_scorer(zoo: Path, names: list[str], base: str | None, max_examples: int, work: Path) -> Any:
    """An AdapterScorer for the zoo's eval/<task>.jsonl (sequence classification), on `base` (default:
    MiniLM from its wheel)."""
    from benchmarks.zoos.text import minilm_path
    from mergekit_subspace.bench.recipe import BenchRecipe
    from mergekit_subspace.bench.run import AdapterScorer

    recipe = BenchRecipe.model_validate(
        {
            "base_model": base or minilm_path(),
            "adapters": [str(zoo / "adapters" / n) for n in names],
            "subspace": {"k": 1},  # not used: the scorer reads only base_model and eval
            "eval": {
                "type": "sequence_classification",
                "data": str(zoo / "eval" / "{task}.jsonl"),
                "max_examples": max_examples,
            },
        }
    )
    return AdapterScorer(recipe, work)


def normalized_se(rows: list[dict[str, Any]], examples: int) -> float:
    """Mean standard error of one task's normalized accuracy (binomial, on `examples` examples)."""
    return statistics.fmean(
        (r["original"] * (1 - r["original"]) / examples) ** 0.5 / r["original"] for r in rows
    )


def zoo_parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments every zoo benchmark takes; each adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", required=True, help="a zoo folder: adapters/<task>/ and eval/<task>.jsonl")
    parser.add_argument("--out", required=True)
    parser.add_argument("--base", help="base model folder (default: MiniLM from its wheel)")
    parser.add_argument("--max-examples", type=int, default=128)
    return parser


def run_and_write(
    module: str,
    args: argparse.Namespace,
    argv: list[str] | None,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    report: Callable[[dict[str, Any], Path], None],
) -> int:
    """Pin threads, run, write OUT/results.json, OUT/command.txt and the report, print the report."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    command = f"OMP_NUM_THREADS=1 python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "command.txt").write_text(command + "\n")
    report(results, out)
    print((out / "report.md").read_text())
    return 0


def per_task_bars(
    tasks: list[str],
    series: dict[str, list[float]],
    path: Path,
    ylabel: str,
    title: str | None = None,
    line: float | None = None,
    ylim: tuple[float, float] | None = None,
) -> None:
    """A grouped bar chart, one group per task and one bar per method (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.12 * len(tasks) * len(series) + 2)), 4.5))
    for i, (label, values) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(tasks))], values, width, label=label)
    if line is not None:
        ax.axhline(line, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks([j + (len(series) - 1) * width / 2 for j in range(len(tasks))])
    ax.set_xticklabels([t[:24] for t in tasks], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
