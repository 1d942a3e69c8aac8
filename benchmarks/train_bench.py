"""Training a new task inside a store's basis (`mergekit-subspace train`) against a plain PEFT LoRA.

    OMP_NUM_THREADS=1 python -m benchmarks.train_bench --zoo benchmarks/cache/text-train \
        --out benchmarks/results/train --held-out 2 --k 16

A store is compressed from the zoo without the held-out tasks. For each held-out task the bench trains its
cores (full, then diagonal) and its head in the frozen basis, with the steps, batch size and seed of the
zoo's own LoRA for that task and on the same training split (`benchmarks.zoos.text.make_tasks`), and scores:
the zoo's LoRA (trained by the zoo builder on that data: the baseline), the trained task reconstructed as a
PEFT folder, and the floor: base + the head trained with the full cores, cores zeroed. Every accuracy is of a
PEFT folder loaded through PEFT. Seconds are those of the training loop (wall and CPU); the LoRA's are the
zoo builder's own record of its loop.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.add_policy_bench import _held_out
from benchmarks.zoo_eval import per_task_bars, run_and_write, zoo_names, zoo_parser, zoo_scorer

METHODS = ("full", "diagonal")


def _write_train_jsonl(zoo: Path, names: list[str], work: Path) -> dict[str, Path]:
    """The training split of each zoo task, exactly as the zoo builder trained on it."""
    from benchmarks.zoos.text import make_tasks

    entries = {n: json.loads((zoo / "adapters" / n / "zoo_entry.json").read_text()) for n in names}
    count = 1 + max(entries[n]["index"] for n in names)
    first = entries[names[0]]
    tasks = {t.name: t for t in make_tasks(count, n_train=first["n_train"] // len(first["labels"]))}
    paths = {}
    for name in names:
        path = work / f"{name}.train.jsonl"
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in tasks[name].train))
        paths[name] = path
    return paths


def _lora_parameters(adapter: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as handle:
        return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())


def _floor_folder(store: Any, name: str, out: Path) -> Path:
    """Base + the trained task's head: the task's PEFT folder with every lora_B zeroed."""
    from mergekit_subspace.io.peft import write_lora_adapter

    entry = store.manifest["tasks"][name]
    zero = {
        m: (
            torch.zeros(store.manifest["slots"][m]["shape"][0], 1),
            torch.zeros(1, store.manifest["slots"][m]["shape"][1]),
        )
        for m in entry["slots"]
    }
    return write_lora_adapter(out, zero, store.extras(name), entry["peft_config"], overwrite=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.zoos.text import minilm_path
    from mergekit_subspace.recipe import SubspaceSettings
    from mergekit_subspace.sources import lora_task
    from mergekit_subspace.subspace import SubspaceStore
    from mergekit_subspace.train import TrainRecipe, train_task

    zoo = Path(args.zoo)
    names = zoo_names(zoo)
    held = _held_out(names, args.held_out)
    fit_names = [n for n in names if n not in held]
    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    judge = zoo_scorer(zoo, names, args.base, args.max_examples, work)
    base = args.base or minilm_path()
    settings = SubspaceSettings(k=args.k, dtype=args.dtype)
    store = SubspaceStore.from_tasks(
        [lora_task(zoo / "adapters" / n) for n in fit_names], settings, work / "store", progress=False
    )
    train_files = _write_train_jsonl(zoo, held, work)
    rows = []
    for name in held:
        adapter = zoo / "adapters" / name
        task = lora_task(adapter)
        entry = json.loads((adapter / "zoo_entry.json").read_text())
        row: dict[str, Any] = {
            "task": name,
            "lora": {
                "accuracy": judge.folder(adapter, task),
                "seconds": entry["seconds"],
                "cpu_seconds": entry["cpu_seconds"],
                "trainable_parameters": _lora_parameters(adapter),
                "bytes": (adapter / "adapter_model.safetensors").stat().st_size,
                "r": entry["r"],
            },
        }
        for cores in METHODS:
            stored_name = f"{name}-{cores}"
            recipe = TrainRecipe(
                store=str(store.path),
                name=stored_name,
                task="sequence_classification",
                train=str(train_files[name]),
                steps=entry["steps"],
                batch_size=entry["batch_size"],
                seed=entry["seed"],
                lr=args.lr,
                max_length=entry["max_length"],
                cores=cores,
                labels=entry["labels"],
                base_model=base,
            )
            result = train_task(recipe, progress=False)
            store = SubspaceStore(store.path)
            out = store.reconstruct(stored_name, work / stored_name)
            trained = result.entry["trained"]
            row[cores] = {
                "accuracy": judge.folder(out, task),
                "seconds": trained["seconds"],
                "cpu_seconds": trained["cpu_seconds"],
                "trainable_parameters": sum(trained["trainable_parameters"].values()),
                "core_parameters": trained["trainable_parameters"]["cores"],
                "bytes": (store.path / "tasks" / f"{stored_name}.safetensors").stat().st_size,
                "train_loss": trained["train_loss"],
                "rel_error_as_stored": result.entry["rel_error"],
            }
            shutil.rmtree(out)
            if cores == "full":
                floor = _floor_folder(store, stored_name, work / f"{stored_name}-floor")
                row["head_only"] = {"accuracy": judge.folder(floor, task)}
                shutil.rmtree(floor)
        rows.append(row)
        print(json.dumps(row))
    basis_bytes = (store.path / store.manifest.get("basis_file", "basis.safetensors")).stat().st_size
    shutil.rmtree(work, ignore_errors=True)
    return {
        "zoo": str(zoo),
        "fit_tasks": fit_names,
        "held_out": held,
        "settings": {"k": args.k, "dtype": args.dtype, "lr": args.lr},
        "basis_bytes": basis_bytes,
        "max_examples": args.max_examples,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "summary": _summary(rows),
    }


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in ("lora", *METHODS, "head_only"):
        cells = [r[method] for r in rows]
        summary = {"mean_accuracy": statistics.fmean(c["accuracy"] for c in cells)}
        if method != "head_only":
            for key in ("seconds", "cpu_seconds", "trainable_parameters", "bytes"):
                summary[f"median_{key}"] = statistics.median(c[key] for c in cells)
            summary["cpu_seconds_over_lora"] = statistics.median(
                r[method]["cpu_seconds"] / r["lora"]["cpu_seconds"] for r in rows
            )
        out[method] = summary
    return out


def report(results: dict[str, Any], out: Path) -> None:
    s = results["summary"]
    lines = [
        f"# Training a task inside the basis, on {Path(results['zoo']).name}",
        "",
        f"Store fit on {len(results['fit_tasks'])} tasks (k = {results['settings']['k']}, "
        f"{results['settings']['dtype']}; basis file {results['basis_bytes']:,} bytes, shared); "
        f"{len(results['held_out'])} held-out tasks trained in it with the zoo LoRA's steps, batch size, seed "
        f"and training split, core/head lr {results['settings']['lr']:g} (the LoRA's: 2e-3). Accuracy through "
        f"PEFT on {results['max_examples']} test examples per task. {results['threads']} torch thread(s); "
        "seconds are medians over the held-out tasks of the training loop alone (one run each, a shared and "
        "busy machine: CPU seconds are the steadier figure).",
        "",
        "| method | mean accuracy | trainable parameters | bytes stored per task | loop s (wall) | loop s (CPU) | CPU s / LoRA's |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {
        "lora": "PEFT LoRA (zoo builder)",
        "full": "train in basis, full cores",
        "diagonal": "train in basis, diagonal cores",
        "head_only": "floor: base + trained head only",
    }
    for method, label in labels.items():
        c = s[method]
        if method == "head_only":
            lines.append(f"| {label} | {c['mean_accuracy']:.3f} | - | - | - | - | - |")
            continue
        lines.append(
            f"| {label} | {c['mean_accuracy']:.3f} | {c['median_trainable_parameters']:,.0f} | "
            f"{c['median_bytes']:,.0f} | {c['median_seconds']:.1f} | {c['median_cpu_seconds']:.1f} | "
            f"{c['cpu_seconds_over_lora']:.2f} |"
        )
    lines += ["", "| task | LoRA | full cores | diagonal | head only |", "|---|---:|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(
            f"| {r['task']} | {r['lora']['accuracy']:.3f} | {r['full']['accuracy']:.3f} | "
            f"{r['diagonal']['accuracy']:.3f} | {r['head_only']['accuracy']:.3f} |"
        )
    lines += [
        "",
        "Bytes: the LoRA's adapter_model.safetensors against the trained task's file in the store (its cores in "
        "the store's dtype plus its head); the shared basis is counted once for the whole store, above. "
        "Trainable parameters include the 4-class head (1,540). The LoRA is float32 on disk and adapts the "
        "modules its zoo settings name (query and value, or query, key and value); the trained task's cores "
        "cover the store's slots (those its fit tasks touch), in the store's dtype. A diagonal core is kept "
        "as a dense k_out x k_in core (the store format has no diagonal layout), so it stores the same bytes "
        "as a full one. The LoRA's seconds are the zoo builder's record of its own loop (the same machine, "
        "another moment); both loops sort batches by length within chunks the same way.",
        "",
        "Not shown: repeats (one training run per task and method: the machine was too loaded for more), "
        "more held-out tasks, a learning-rate sweep for either method, a head trained alone (the floor uses "
        "the head trained with the full cores), and zoos other than this small WordNet one.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    rows = results["rows"]
    per_task_bars(
        [r["task"] for r in rows],
        {labels[m]: [r[m]["accuracy"] for r in rows] for m in ("lora", "full", "diagonal", "head_only")},
        out / "train_accuracy.png",
        "test accuracy (through PEFT)",
        ylim=(0, 1),
    )


def main(argv: list[str] | None = None) -> int:
    parser = zoo_parser(__doc__)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--held-out", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-3)
    args = parser.parse_args(argv)
    return run_and_write("benchmarks.train_bench", args, argv, run, report)


def rewrite_report(out: Path) -> None:
    """Rewrite report.md and the plot from a committed results.json (no re-run)."""
    report(json.loads((out / "results.json").read_text()), out)


if __name__ == "__main__":
    raise SystemExit(main())
