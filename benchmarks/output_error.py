"""Output error of the shared basis on real activations, for a grid of left (k_out) and right (k_in) sizes.

    python -m benchmarks.output_error [--cache DIR] [--n 48] [--k-out 4 8 16 32 64] [--k-in 8 16 32 64 96] [--out DIR]

The Frobenius error of a reconstructed delta treats every input direction alike; a layer only ever sees
the activations that reach it. This script feeds evaluation texts of the text zoo through all-MiniLM-L6-v2,
keeps the inputs X of every adapted module, and reports sum_i ||(D_i - U C_i V^T) X|| / ||D_i X|| over all
tasks and slots, with the bases fit as the store fits them (HOSVD on unit-norm deltas). Everything is
computed from the factors; no m x n matrix is formed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.zoos._common import limit_threads  # noqa: E402
from benchmarks.zoos.text import build_text_zoo, minilm_path  # noqa: E402
from mergekit_subspace.fit import SubspaceBasis  # noqa: E402
from mergekit_subspace.io.files import atomic_write_bytes, json_bytes  # noqa: E402
from mergekit_subspace.sources import TaskSource, lora_task  # noqa: E402

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "output-error"


def slot_inputs(
    model_path: str, modules: list[str], texts: list[str], tokens: int, seed: int
) -> dict[str, torch.Tensor]:
    """Inputs (tokens x n) that reach each adapted module, padding excluded, sampled to `tokens` rows."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()
    seen: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    mask: torch.Tensor | None = None

    def keep(module: str) -> Any:
        def hook(_layer: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            assert mask is not None
            seen[module].append(args[0].reshape(-1, args[0].shape[-1])[mask].double())

        return hook

    # adapters name modules as the classifier wraps them ("bert.encoder..."); the bare encoder drops "bert."
    hooks = [model.get_submodule(m.split("bert.", 1)[-1]).register_forward_pre_hook(keep(m)) for m in modules]
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            batch = tokenizer(
                texts[start : start + 64], padding=True, truncation=True, max_length=64, return_tensors="pt"
            )
            mask = batch["attention_mask"].reshape(-1).bool()
            model(**batch)
    for hook in hooks:
        hook.remove()
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for module, parts in seen.items():
        rows = torch.cat(parts)
        out[module] = rows[torch.randperm(rows.shape[0], generator=generator)[:tokens]]
    return out


def output_error(
    tasks: list[TaskSource], inputs: dict[str, torch.Tensor], k_out: list[int], k_in: list[int]
) -> list[list[float]]:
    """grid[i][j]: relative output error over all tasks and slots at k_out[i], k_in[j]."""
    fitted = SubspaceBasis(k=max(k_out), k_in=max(k_in)).fit(tasks, modules=list(inputs))
    grid = []
    for ko in k_out:
        row = []
        for ki in k_in:
            err = ref = 0.0
            for module, X in inputs.items():
                U, V = fitted.bases_[module][0][:, :ko], fitted.bases_[module][1][:, :ki]
                Xt = X.T
                VX = V.T @ Xt
                for task in tasks:
                    if module not in task.slots:
                        continue
                    B, A = task.slots[module].factors()
                    exact = B @ (A @ Xt)
                    core = (U.T @ B) @ (A @ V)
                    diff = exact - U @ (core @ VX)
                    err += float((diff * diff).sum())
                    ref += float((exact * exact).sum())
            row.append((err / ref) ** 0.5)
        grid.append(row)
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=ROOT / "cache" / "text", help="text zoo folder")
    parser.add_argument("--n", type=int, default=48, help="adapters of the text zoo")
    parser.add_argument("--k-out", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--k-in", type=int, nargs="+", default=[8, 16, 32, 64, 96])
    parser.add_argument("--texts-per-task", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1500, help="activation rows kept per slot")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    limit_threads()

    entries = build_text_zoo(args.cache, n_adapters=args.n)  # cached adapters are reused, never retrained
    tasks = [lora_task(args.cache / "adapters" / e["name"]) for e in entries]
    texts = []
    for entry in entries:
        lines = (args.cache / "eval" / f"{entry['name']}.jsonl").read_text().splitlines()
        texts += [json.loads(line)["text"] for line in lines[: args.texts_per_task]]
    modules = sorted({m for t in tasks for m in t.slots})
    inputs = slot_inputs(minilm_path(), modules, texts, args.tokens, args.seed)
    grid = output_error(tasks, inputs, args.k_out, args.k_in)

    results = {
        "zoo": str(args.cache),
        "tasks": len(tasks),
        "texts": len(texts),
        "tokens_per_slot": args.tokens,
        "k_out": args.k_out,
        "k_in": args.k_in,
        "relative_output_error": grid,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "results.json", json_bytes(results))
    lines = [
        "# Relative output error on real activations against (k_out, k_in)",
        "",
        f"{len(tasks)} MiniLM adapters of the text zoo; inputs of every adapted module from {len(texts)} evaluation "
        f"texts ({args.tokens} token rows per slot). Entry: sum ||(D - U C V^T) X||^2 / sum ||D X||^2, square-rooted.",
        "",
        "| k_out \\ k_in | " + " | ".join(map(str, args.k_in)) + " |",
        "|---" * (len(args.k_in) + 1) + "|",
    ]
    lines += [
        f"| {ko} | " + " | ".join(f"{v:.3f}" for v in row) + " |"
        for ko, row in zip(args.k_out, grid, strict=True)
    ]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    (args.out / "command.txt").write_text(
        "python -m benchmarks.output_error " + " ".join(argv or sys.argv[1:]) + "\n"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
