"""Merge timing at LLM layer size: ours vs mergekit 0.1.5 on synthetic LoRAs of 4096 x 4096 modules.

MiniLM's 384 x 384 modules make mergekit's dense work tiny, so the text-zoo benchmark says little about the
models people merge. Here the adapters are random (nothing is evaluated, only time and memory), shaped like
Llama-7B attention projections: `--layers` layers x (q_proj, v_proj), each 4096 x 4096, rank 16, T tasks.
Both tools start from the same PEFT folders on disk and write their own output (ours: one PEFT folder;
mergekit: the merged weights of the adapted modules as safetensors), each in a fresh process.

Run from the repository root:  python -m benchmarks.merge_scale [--out benchmarks/results/merge]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.merge_bench import DENSITY, THREADS, run_worker

METHODS = ("task_arithmetic", "ties", "dare_ties")


def make_synthetic(root: Path, dim: int, layers: int, tasks: int, rank: int) -> tuple[Path, list[Path]]:
    """A base folder holding only the adapted weights, and `tasks` PEFT LoRA folders on it."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(layers) for p in ("q_proj", "v_proj")]
    base = root / "base"
    base.mkdir(parents=True)
    save_file(
        {f"{m}.weight": torch.randn(dim, dim, generator=gen) * 0.02 for m in modules},
        base / "model.safetensors",
    )
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    adapters = []
    for t in range(tasks):
        folder = root / "adapters" / f"task{t}"
        folder.mkdir(parents=True)
        tensors = {}
        for m in modules:
            tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(rank, dim, generator=gen) / dim**0.5
            tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(dim, rank, generator=gen) * 0.01
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": 2 * rank,
            "target_modules": ["q_proj", "v_proj"],
            "base_model_name_or_path": str(base),
            "task_type": "CAUSAL_LM",
            "fan_in_fan_out": False,
            "lora_dropout": 0.0,
            "bias": "none",
        }
        (folder / "adapter_config.json").write_text(json.dumps(config))
        adapters.append(folder)
    return base, adapters


def markdown(result: dict) -> str:
    lines = [
        f"# Merge timing at LLM layer size (synthetic LoRAs, {result['dim']} x {result['dim']} modules)",
        "",
        f"Command: `{result['command']}`  ",
        f"{result['layers']} layers x (q_proj, v_proj) = {2 * result['layers']} modules, {result['tasks']} tasks, "
        f"rank {result['rank']}, density {DENSITY}; {THREADS} torch thread; shared 2-core CPU. Both tools read the "
        "same PEFT folders and write their own output; mergekit gets only the adapted modules (its most "
        "favourable input).",
        "",
        "| method | ours merge s | mergekit merge s | ratio (merge) | ours end-to-end s | mergekit end-to-end s "
        "| ratio (end-to-end) | ours peak RSS MB | mergekit peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in result["methods"]:
        ours, mk = result["ours"][method], result["mergekit"][method]
        lines.append(
            f"| {method} | {ours['merge_s']:.3f} | {mk['merge_s']:.3f} | {mk['merge_s'] / ours['merge_s']:.0f}x "
            f"| {ours['end_to_end_s']:.2f} | {mk['end_to_end_s']:.2f} "
            f"| {mk['end_to_end_s'] / ours['end_to_end_s']:.1f}x | {ours['peak_rss_mb']:.0f} | {mk['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/merge")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="merge-scale-"))
    try:
        base, adapters = make_synthetic(work / "in", args.dim, args.layers, args.tasks, args.rank)
        result: dict = {
            "command": "python -m benchmarks.merge_scale " + " ".join(argv or []),
            "dim": args.dim,
            "layers": args.layers,
            "tasks": args.tasks,
            "rank": args.rank,
            "methods": list(METHODS),
        }
        for family in ("ours", "mergekit"):
            tick = time.perf_counter()
            runs = [
                {
                    "method": m,
                    "size": args.tasks,
                    "adapters": [str(a) for a in adapters],
                    "out": str(work / f"{family}-{m}"),
                }
                for m in METHODS
            ]
            job = {"family": family, "base": str(base), "runs": runs, "heads": "none", "export": False}
            timed = run_worker(job, work)
            result[family] = {m: timed[(m, args.tasks)] for m in METHODS}
            print(f"{family}: {time.perf_counter() - tick:.0f}s", flush=True)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "merge_scale.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "merge_scale.md").write_text(markdown(result))
        print(markdown(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
