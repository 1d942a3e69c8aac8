"""Run a bench recipe: compress at each k, write every method's PEFT folder, score each through PEFT.

Everything a reader needs to doubt the headline is measured in the same run: the original adapters, the
reconstructed ones, the mean adapter, per-task SVD at equal bytes, leave-one-out, base-only and vLoRA.
"""

from __future__ import annotations

import math
import resource
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergekit_subspace.bench import baselines
from mergekit_subspace.bench.evaluate import load_task_data, scorer
from mergekit_subspace.bench.recipe import BenchRecipe, parse_bench_recipe
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.eval.models import head_size
from mergekit_subspace.io.codec import ITEM_BYTES, extra_bytes
from mergekit_subspace.io.files import atomic_write_bytes, check_output, json_bytes
from mergekit_subspace.io.peft import write_lora_adapter
from mergekit_subspace.sources import TaskSource
from mergekit_subspace.subspace import SubspaceStore, load_recipe_tasks

METHODS = ("original", "reconstructed", "mean_adapter", "per_task_svd", "leave_one_out", "base_only", "vlora")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_factors(path: Path, factors: baselines.Factors, task: TaskSource) -> Path:
    """A method's factors for `task` as a PEFT folder in the task's dtype, with the task's own heads."""
    dtype = getattr(torch, task.dtype)
    cast = {m: (B.to(dtype), A.to(dtype)) for m, (B, A) in factors.items()}
    return write_lora_adapter(path, cast, task.extras, task.peft_config, overwrite=True)


class AdapterScorer:
    """Writes a method's adapter for a task, scores it through PEFT, removes it (disk stays small).

    Evaluation data and head sizes are read on first use unless given (bench passes them, read up front).
    """

    def __init__(
        self,
        recipe: BenchRecipe,
        work: Path,
        data: dict[str, Any] | None = None,
        labels: dict[str, int | None] | None = None,
    ) -> None:
        assert recipe.base_model is not None
        self.spec = recipe.eval
        self.score = scorer(recipe.eval, recipe.base_model)
        self.work = work
        self.data = data if data is not None else {}
        self.labels = labels if labels is not None else {}

    def folder(self, path: Path, task: TaskSource) -> float:
        if task.name not in self.data:
            self.labels[task.name] = head_size(task.source) if task.kind == "lora" else None
            self.data[task.name] = load_task_data(self.spec, task.name, task.source)
        return self.score(path, self.data[task.name], self.labels[task.name])

    def factors(self, factors: baselines.Factors, task: TaskSource, tag: str) -> float:
        path = write_factors(self.work / f"{tag}-{task.name}", factors, task)
        try:
            return self.folder(path, task)
        finally:
            shutil.rmtree(path, ignore_errors=True)


def _cast_source_bytes(tasks: list[TaskSource], dtype: str) -> int:
    """Sources re-saved in the store's dtype: separates the gain of the basis from the gain of casting."""
    numbers = sum(d.A.numel() + d.B.numel() for t in tasks for d in t.slots.values())
    return numbers * ITEM_BYTES[dtype] + sum(extra_bytes(x, dtype) for t in tasks for x in t.extras.values())


def run_bench(
    recipe_path: str | Path, out: str | Path, progress: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """Measure a bench recipe into OUT/results.json, OUT/report.md and OUT/*.png.

    On a terminal one bar counts the (k, task) steps (the first pass scores the original, base-only and mean
    adapter of each task; then one pass per k), its text naming what runs now, model loading included.
    `timing` records the wall time of every phase and `total_seconds`, from the call to the last plot.
    """
    started = time.perf_counter()
    recipe_path = Path(recipe_path)
    recipe = parse_bench_recipe(recipe_path)
    if not recipe.base_model:
        raise SubspaceError(
            "bench needs base_model: accuracy is measured on the base plus each adapter", recipe_path
        )
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SubspaceError("already exists and is not empty; pass --overwrite", out)
    budgets = recipe.budgets()
    tasks, base = load_recipe_tasks(recipe, recipe_path, progress=progress)
    check_output(
        out, overwrite=True, inputs=[recipe.base_model, *(t.source for t in tasks)], existing_ok=True
    )
    show = None if progress else True
    # every data file is read and checked before any fitting or training starts
    labels = {t.name: head_size(t.source) if t.kind == "lora" else None for t in tasks}
    data = {
        t.name: load_task_data(recipe.eval, t.name, t.source)
        for t in tqdm(tasks, desc="read eval data", disable=show, leave=False)
    }
    timing: dict[str, Any] = {"load_seconds": time.perf_counter() - started}

    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    judge = AdapterScorer(recipe, work, data, labels)
    per_task: dict[str, dict[str, Any]] = {t.name: {} for t in tasks}
    fixed: dict[str, dict[str, float | None]] = {}
    bar = tqdm(total=len(tasks) * (1 + len(budgets)), desc="bench", unit="step", disable=show)
    clock = time.perf_counter()
    bar.set_postfix_str("mean adapter")
    mean_factors = baselines.mean_adapter(tasks)
    for index, task in enumerate(tasks):
        bar.set_postfix_str(
            f"{task.name}: original, base, mean" + (" (loading the base)" if index == 0 else "")
        )
        fixed[task.name] = {
            "original": judge.folder(Path(task.source), task) if task.kind == "lora" else None,
            "base_only": judge.factors(baselines.zero_factors(task), task, "base"),
            "mean_adapter": judge.factors({m: mean_factors[m] for m in task.slots}, task, "mean"),
        }
        bar.update()
    timing["baselines_seconds"] = time.perf_counter() - clock

    results: dict[str, Any] = {
        "recipe": str(recipe_path),
        "eval": recipe.eval.model_dump(),
        "tasks": [t.name for t in tasks],
        "budgets": budgets,
        "subspace": recipe.subspace.model_dump(exclude={"k"}),
        "bytes": {
            "sources": sum(t.source_bytes for t in tasks),
            "sources_cast_to_store_dtype": _cast_source_bytes(tasks, recipe.subspace.dtype),
            "store_dtype": recipe.subspace.dtype,
            "per_k": {},
        },
        "timing": timing,
        "peers": {},
        "per_task": per_task,
    }
    use_vlora = "vlora" in recipe.peers
    if use_vlora:
        from mergekit_subspace.bench import vlora_peer

        use_vlora = vlora_peer.available()
        if not use_vlora:
            results["peers"]["vlora"] = "not installed (pip install vlora-dev)"

    for k in budgets:
        settings = recipe.subspace.model_copy(update={"k": k, "energy": None})
        bar.set_postfix_str(f"k={k}: fitting")
        clock = time.perf_counter()
        store = SubspaceStore.from_tasks(
            tasks, settings, out / "stores" / f"k{k}", base=base, overwrite=True, progress=progress
        )
        fit_seconds = time.perf_counter() - clock
        info = store.info()
        payload = store.payload_bytes()
        # leave-one-out refits each slot at the size the store chose for it (per-slot under budget_bytes)
        slot_sizes = {m: (s["k_out"], s["k_in"]) for m, s in info["slots"].items()}
        results["bytes"]["per_k"][str(k)] = {
            "store": info["bytes"]["store"],
            "basis": info["bytes"]["basis"],
            "payload": payload,
            "per_task_mean": (info["bytes"]["store"] - info["bytes"]["basis"]) / len(tasks),
            "ratio": info["ratio"],
            "ratio_vs_cast_sources": results["bytes"]["sources_cast_to_store_dtype"] / info["bytes"]["store"],
        }
        vlora_factors: dict[str, baselines.Factors] = {}
        if use_vlora:
            bar.set_postfix_str(f"k={k}: fitting vLoRA")
            vlora_factors, vlora_bytes, vlora_meta = vlora_peer.vlora_at_bytes(tasks, payload)
            results["peers"].setdefault("vlora", {})[str(k)] = {"bytes": vlora_bytes, **vlora_meta}
        reconstruct_ms = []
        clock = time.perf_counter()
        for task in tasks:
            bar.set_postfix_str(f"k={k}: {task.name}")
            row: dict[str, Any] = dict(fixed[task.name])
            t0 = time.perf_counter()
            rebuilt = store.reconstruct(task.name, work / f"rec-{task.name}", overwrite=True)
            reconstruct_ms.append((time.perf_counter() - t0) * 1000)
            row["reconstructed"] = judge.folder(rebuilt, task)
            shutil.rmtree(rebuilt, ignore_errors=True)
            row["rel_error"] = info["per_task"][task.name]["rel_error"]
            svd_factors, svd_rank = baselines.per_task_svd(task, payload / len(tasks))
            row["per_task_svd"] = judge.factors(svd_factors, task, "svd")
            row["per_task_svd_rank"] = svd_rank
            if recipe.leave_one_out and len(tasks) > 1:
                loo_factors, loo_error = baselines.leave_one_out(
                    tasks, tasks.index(task), slot_sizes, settings
                )
                row["leave_one_out"] = (
                    judge.factors(loo_factors, task, "loo") if loo_factors else row["base_only"]
                )
                row["leave_one_out_rel_error"] = loo_error
            else:
                row["leave_one_out"] = None
            row["vlora"] = (
                judge.factors(vlora_factors[task.name], task, "vlora") if task.name in vlora_factors else None
            )
            per_task[task.name][str(k)] = row
            bar.update()
        timing[str(k)] = {
            "fit_seconds": fit_seconds,
            "eval_seconds": time.perf_counter() - clock,
            "reconstruct_ms_per_task_median": statistics.median(reconstruct_ms),
        }
        results["bytes"]["per_k"][str(k)]["slots"] = {
            m: {"k_out": s["k_out"], "k_in": s["k_in"], "captured_energy": s["captured_energy"]}
            for m, s in info["slots"].items()
        }
    results["summary"] = summarize(results)
    results["not_shown"] = not_shown(results, tasks)
    shutil.rmtree(work, ignore_errors=True)

    from mergekit_subspace.bench.report import plots, slot_spectra, write_markdown

    bar.set_postfix_str("plots")
    clock = time.perf_counter()
    results["spectra"] = slot_spectra(store)  # the last store fitted: the largest k
    plots(results, out)
    timing["plot_seconds"] = time.perf_counter() - clock
    bar.close()
    timing["total_seconds"] = time.perf_counter() - started
    results["peak_rss_mib"] = peak_rss_mib()
    atomic_write_bytes(out / "results.json", json_bytes(results))
    write_markdown(results, out)
    return results


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Mean accuracy and mean normalized accuracy (method / original) per k and method."""
    summary: dict[str, Any] = {}
    for k in map(str, results["budgets"]):
        rows = [per_k[k] for per_k in results["per_task"].values()]
        entry: dict[str, Any] = {}
        for method in METHODS:
            values = [r[method] for r in rows if r.get(method) is not None]
            normalized = [
                r[method] / r["original"] for r in rows if r.get(method) is not None and r.get("original")
            ]
            entry[method] = {
                "mean_accuracy": statistics.fmean(values) if values else None,
                "mean_normalized": statistics.fmean(normalized) if normalized else None,
                "tasks": len(values),
            }
        entry["mean_rel_error"] = statistics.fmean(r["rel_error"] for r in rows)
        summary[k] = entry
    return summary


def not_shown(results: dict[str, Any], tasks: list[TaskSource]) -> list[str]:
    """What this run could not show, said in the results rather than left for the reader to find."""
    notes = []
    if any(t.kind == "finetune" for t in tasks):
        notes.append(
            "fine-tune tasks have no PEFT original to score; their normalized accuracy is not computed"
        )
    vlora = results["peers"].get("vlora")
    if isinstance(vlora, str):
        notes.append(f"vLoRA: {vlora}")
    elif vlora:
        missing = [
            t for t, row in results["per_task"].items() if any(r.get("vlora") is None for r in row.values())
        ]
        if missing:
            notes.append(
                f"vLoRA cannot hold adapters with rank_pattern; not scored for {len(missing)} task(s)"
            )
        over = [k for k, v in vlora.items() if v["bytes"] > results["bytes"]["per_k"][k]["payload"] * 1.05]
        if over:
            notes.append(
                f"vLoRA's smallest subspace exceeds our bytes at k={', '.join(over)} (see peers.vlora)"
            )
    if math.isfinite(results["bytes"]["sources"]):
        notes.append("bytes exclude the base model, which every method needs once")
    return notes
