"""The README's first command: a small real zoo, compressed, reconstructed, measured, in a few minutes.

Trains (or reuses) a handful of all-MiniLM-L6-v2 LoRAs on WordNet supersense tasks, compresses them with
recipes/demo.yaml, writes every task back as a PEFT folder, and prints bytes, errors and the accuracy of the
original and the reconstructed adapter, both loaded through PEFT.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.text_bench import DEFAULT_CACHE  # noqa: E402
from benchmarks.zoos.text import build_text_zoo, minilm_path  # noqa: E402
from mergekit_subspace.eval.data import load_classification_jsonl  # noqa: E402
from mergekit_subspace.eval.metrics import classification_accuracy  # noqa: E402
from mergekit_subspace.report import format_info, human_bytes, table  # noqa: E402
from mergekit_subspace.subspace import SubspaceStore  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "demo.yaml"
OUT = ROOT / "demo-out"


def link_base(out: Path) -> Path:
    """recipes/demo.yaml names demo-out/base: point it at the MiniLM folder inside its wheel."""
    link = out / "base"
    target = Path(minilm_path())
    if link.is_symlink() and link.resolve() != target.resolve():
        link.unlink()
    if not link.exists():
        out.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target, target_is_directory=True)
    return link


def link_zoo(cache: Path, names: list[str], zoo: Path) -> None:
    """demo-out/zoo holds links to exactly the demo's adapters, so the recipe's glob picks those and no more."""
    shutil.rmtree(zoo, ignore_errors=True)
    for sub, suffix in (("adapters", ""), ("eval", ".jsonl")):
        (zoo / sub).mkdir(parents=True)
        for name in names:
            (zoo / sub / f"{name}{suffix}").symlink_to((cache / sub / f"{name}{suffix}").resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=6, help="adapters in the demo zoo")
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="text zoo cache, shared with benchmarks.text_bench"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per adapter (default: the zoo's)"
    )
    args = parser.parse_args(argv)

    os.chdir(ROOT)  # the recipe's paths are relative to the repository root
    base = link_base(OUT)
    print(
        f"1/4 building a zoo of {args.n} MiniLM LoRAs on WordNet tasks (cached in {args.cache})", flush=True
    )
    entries = build_text_zoo(args.cache, n_adapters=args.n, steps=args.steps)
    link_zoo(args.cache, [entry["name"] for entry in entries], OUT / "zoo")
    print(f"2/4 compressing with {RECIPE.relative_to(ROOT)}", flush=True)
    store = SubspaceStore.compress(RECIPE, overwrite=True)
    info = store.info()
    print(format_info(info))
    print("\n3/4 reconstructing every task as a PEFT folder and 4/4 scoring both through PEFT", flush=True)
    rows = []
    for entry in entries:
        name = entry["name"]
        rebuilt = store.reconstruct(name, OUT / "reconstructed" / name, overwrite=True)
        examples = load_classification_jsonl(OUT / "zoo" / "eval" / f"{name}.jsonl")
        original = classification_accuracy(base, OUT / "zoo" / "adapters" / name, examples)
        restored = classification_accuracy(base, rebuilt, examples)
        task = info["per_task"][name]
        rows.append(
            [
                name,
                entry["r"],
                human_bytes(task["source_bytes"]),
                human_bytes(task["bytes"]),
                f"{task['rel_error']:.3f}",
                f"{original:.3f}",
                f"{restored:.3f}",
            ]
        )
    print()
    print(table(["task", "r", "source", "stored", "rel_error", "acc original", "acc reconstructed"], rows))
    b = info["bytes"]
    print(
        f"\nstore {human_bytes(b['store'])} (shared basis {human_bytes(b['basis'])}) vs sources "
        f"{human_bytes(b['sources'])}: {info['ratio']:.2f}x smaller. A small zoo pays for its basis; the "
        "ratio grows with the number of tasks (see benchmarks/)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
