"""Text-zoo benchmark: MiniLM LoRAs on WordNet tasks, compressed at several k, every baseline scored via PEFT.

    python -m benchmarks.text_bench [--n 48] [--k 4 8 16 32] [--k-in K] [--budget-bytes B] [--dtype int8] [--max-examples 256] [--cache DIR] [--out DIR]

Builds (or reuses) the zoo, writes the bench recipe it ran beside the results, and runs `mergekit-subspace
bench` on it. Results land in benchmarks/results/text/ (results.json, report.md, PNGs, recipe.yaml).
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

from benchmarks.zoos.text import build_text_zoo, minilm_path  # noqa: E402
from mergekit_subspace.bench.report import markdown  # noqa: E402
from mergekit_subspace.bench.run import run_bench  # noqa: E402
from mergekit_subspace.io.codec import STORE_DTYPES  # noqa: E402

ROOT = Path(__file__).resolve().parent
DEFAULT_CACHE = ROOT / "cache" / "text"
DEFAULT_OUT = ROOT / "results" / "text"


def write_recipe(
    path: Path,
    zoo: Path,
    names: list[str],
    ks: list[int],
    max_examples: int,
    dtype: str,
    k_in: int | None = None,
    budget_bytes: int | None = None,
) -> Path:
    recipe = {
        "base_model": minilm_path(),
        "adapters": [str(zoo / "adapters" / name) for name in names],
        "subspace": {"k": max(ks), "normalize": True, "dtype": dtype}
        | ({"k_in": k_in} if k_in else {})
        | ({"budget_bytes": budget_bytes} if budget_bytes else {}),
        "eval": {
            "type": "sequence_classification",
            "data": str(zoo / "eval" / "{task}.jsonl"),
            "max_examples": max_examples,
        },
        "sweep": {"k": ks},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


TARGET_RATIO, TARGET_ACCURACY = 20.0, 0.98


def target_section(results: dict[str, Any]) -> str:
    """The text zoo's target (>= 20x smaller at >= 0.98 mean normalized accuracy), met or missed by how much."""
    lines = [
        "",
        f"## Against the target: >= {TARGET_RATIO:.0f}x smaller than the sources at >= {TARGET_ACCURACY} "
        "mean normalized accuracy",
        "",
        "| k | ratio | reconstructed | per_task_svd (equal bytes) | vlora (its bytes) | met? |",
        "|---|---|---|---|---|---|",
    ]
    for k, summary in results["summary"].items():
        ratio = results["bytes"]["per_k"][k]["ratio"]
        ours = summary["reconstructed"]["mean_normalized"]
        svd = summary["per_task_svd"]["mean_normalized"]
        vlora = summary.get("vlora", {}).get("mean_normalized")
        vlora_bytes = results.get("peers", {}).get("vlora", {}).get(k, {}).get("bytes")
        peer = "n/a" if vlora is None else f"{vlora:.3f} ({vlora_bytes / 1e6:.1f} MB)"
        short = []
        if ratio < TARGET_RATIO:
            short.append(f"ratio short by {TARGET_RATIO - ratio:.1f}x")
        if ours < TARGET_ACCURACY:
            short.append(f"accuracy short by {TARGET_ACCURACY - ours:.3f}")
        met = "yes" if not short else "no: " + ", ".join(short)
        lines.append(f"| {k} | {ratio:.1f}x | {ours:.3f} | {svd:.3f} | {peer} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--k-in", type=int, default=None, help="right (input-side) basis size; default: k")
    parser.add_argument(
        "--budget-bytes",
        type=int,
        default=None,
        help="bytes of basis + core numbers; k per slot is chosen under it and --k is its upper bound",
    )
    parser.add_argument("--max-examples", type=int, default=256)
    parser.add_argument("--dtype", default="float16", choices=list(STORE_DTYPES))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite report.md from OUT/results.json (no measuring)"
    )
    args = parser.parse_args(argv)
    if args.report_only:
        results = json.loads((args.out / "results.json").read_text())
        (args.out / "report.md").write_text(markdown(results) + target_section(results))
        print((args.out / "report.md").read_text())
        return 0

    entries = build_text_zoo(args.cache, n_adapters=args.n)
    names = [entry["name"] for entry in entries]
    recipe = write_recipe(
        args.out / "recipe.yaml",
        args.cache,
        names,
        args.k,
        args.max_examples,
        args.dtype,
        args.k_in,
        args.budget_bytes,
    )
    results = run_bench(recipe, args.out, overwrite=True)
    (args.out / "report.md").write_text(markdown(results) + target_section(results))
    shutil.rmtree(args.out / "stores", ignore_errors=True)  # stores are reproducible from the recipe
    (args.out / "command.txt").write_text(
        "python -m benchmarks." + Path(__file__).stem + " " + " ".join(argv or sys.argv[1:]) + "\n"
    )
    print((args.out / "report.md").read_text())
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
