"""Headless merge benchmark: causal-LM LoRAs of SmolLM2-135M, no per-task head, so the merged weights do the work.

Protocol:
- the decoder zoo (`benchmarks/zoos/decoder.py`: short exact-match answers from arithmetic and WordNet); each
  task's held-out file is split into a validation part (first --val lines) and a test part (the next --test);
- fixed task subsets of T = 2, 4 and 8 tasks (SUBSETS); every method merges a subset's adapters into one
  delta, written as one PEFT folder; every task of the subset is scored with that same folder, loaded through
  PEFT: greedy exact match (`mergekit_subspace.eval.metrics.exact_match_accuracy`);
- methods: every method in our registry (`mergekit_subspace.merge.methods.METHODS`, merged by the library's
  `merge` straight from the adapter folders, exact basis), the plain mean (lambda 1), mergekit 0.1.5 and
  PEFT `add_weighted_adapter` (`benchmarks/merge_peers.py`);
- lambda (the merged delta's scale) is chosen for every method on the validation part, over the same grid, by
  the same code (`mergekit_subspace.merge.select`: LoRA scale set on the loaded folder, `choose`);
- normalized accuracy = merged test accuracy / the task's own adapter's test accuracy; mean and worst task;
- time and peak RSS of each merge: a fresh subprocess per tool (as `benchmarks/merge_bench.py`), lambda 1.

Generation stops at the first line break (the metric reads only the first line) and runs at most the
longest answer's token count + 2 new tokens; an answer the model gets right fits in that, so the score is the
one `exact_match_accuracy`'s default 12 tokens gives, only cheaper.  Methods whose merged delta equals one
already scored on the same subset (relative difference below SAME_DELTA, e.g. PEFT cat = task arithmetic) reuse
its scores, and the row says so.  Rows are written as they finish (JSON + markdown), so a run cut short keeps
what it measured; `--resume` skips the rows already in the JSON.

Run from the repository root:  python -m benchmarks.headless_merge_bench [--zoo DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks import merge_peers
from benchmarks.merge_bench import DENSITY, scale_folder, split_eval
from benchmarks.zoos._common import quiet_hf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_ZOO = "benchmarks/cache/decoder8"
DEFAULT_OUT = "benchmarks/results/merge-headless-full"
DEFAULT_GRID = (0.25, 0.5, 1.0, 2.0)
DEFAULT_VAL = 24
DEFAULT_TEST = 64
# Fixed subsets, by zoo task name: related, conflicting (successor vs predecessor) and unrelated tasks.
SUBSETS: dict[int, tuple[tuple[str, ...], ...]] = {
    2: (("successor", "antonym"), ("successor", "predecessor")),
    4: (
        ("successor", "antonym", "supersense", "lemma"),
        ("predecessor", "addition", "first-letter", "plural"),
    ),
    8: (
        ("successor", "antonym", "supersense", "lemma", "predecessor", "addition", "first-letter", "plural"),
    ),
}
# Run first (a run cut short by --budget-minutes keeps these); the rest of the registry follows in its order.
PRIORITY = (
    "baseline:mean",
    "ours:task_arithmetic",
    "mergekit:task_arithmetic",
    "peft:cat",
    "ours:iso_c",
    "ours:tsv",
    "ours:ties",
    "mergekit:ties",
    "peft:svd",
    "ours:iso_cts",
    "ours:knots_ties",
    "ours:core_ties",
    "mergekit:dare_ties",
    "ours:dare_ties",
    "mergekit:breadcrumbs",
    "mergekit:della",
    "peft:ties_svd",
)
MERGEKIT = ("task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della")
PEFT = ("cat", "svd", "ties_svd")
SAME_DELTA = 1e-4  # relative Frobenius difference under which two merged deltas are the same delta
THREADS = 1
MODULE = "benchmarks.headless_merge_bench"  # what the worker processes import


# ---------------------------------------------------------------------------------------------- workers


def worker_ours(job: dict[str, Any]) -> dict[str, Any]:
    """Our merge from the adapter folders (exact basis) to one head-less PEFT folder, at lambda 1."""
    from mergekit_subspace.merge import merge
    from mergekit_subspace.merge.methods import METHODS

    params = {"density": DENSITY} if "density" in METHODS[job["method"]].parameters else {}
    result = merge(
        {
            "merge_method": job["method"],
            "adapters": job["adapters"],
            "parameters": params,
            "output": {"path": job["out"], "heads": "none"},
        },
        progress=False,
    )
    (folder,) = result.folders.values()
    seconds = result.report["seconds"]
    return {
        "merge_s": seconds["merge"],
        "end_to_end_s": seconds["total"],
        "phases": seconds,
        "folder": str(folder),
    }


def worker_mergekit(job: dict[str, Any]) -> dict[str, Any]:
    timing = merge_peers.mergekit_merge(
        job["adapters"], job["base"], job["method"], DENSITY, Path(job["out"])
    )
    return timing | {"folder": job["out"]}


def peft_worker(auto_class: str):
    """PEFT add_weighted_adapter on the base loaded by the named transformers Auto class."""

    def worker(job: dict[str, Any]) -> dict[str, Any]:
        import transformers

        timing = merge_peers.peft_merge(
            job["adapters"],
            lambda: getattr(transformers, auto_class).from_pretrained(job["base"]),
            job["method"],
            DENSITY,
            Path(job["out"]),
        )
        return timing | {"folder": str(Path(job["out"]) / "merged")}

    return worker


def _guarded(fn):
    """A method that fails (e.g. one still in development) is recorded as failed, not fatal to the run."""

    def run(job: dict[str, Any]) -> dict[str, Any]:
        try:
            return fn(job)
        except Exception as exc:  # noqa: BLE001 - reported in the results
            return {"error": f"{type(exc).__name__}: {exc}"[:500]}

    return run


WORKERS = {
    "ours": _guarded(worker_ours),
    "mergekit": _guarded(worker_mergekit),
    "peft": _guarded(peft_worker("AutoModelForCausalLM")),
}


def worker_main(job_path: str) -> None:
    import torch

    torch.set_num_threads(THREADS)
    merge_peers.worker_loop(json.loads(Path(job_path).read_text()), WORKERS)


# ----------------------------------------------------------------------------------------- evaluation


class Evaluator:
    """One base model in memory; each merged folder is loaded once through PEFT and scored on every task."""

    def __init__(self, base: str, data: dict[str, dict[str, Path]], val: int, batch_size: int) -> None:
        from mergekit_subspace.eval.metrics import _tokenizer
        from mergekit_subspace.eval.models import load_causal_lm
        from mergekit_subspace.merge.select import load_validation

        self.base = base
        self.batch_size = batch_size
        self.val = {n: load_validation(p["val"], val).examples for n, p in data.items()}
        self.test = {n: load_validation(p["test"], None).examples for n, p in data.items()}
        tokenizer = _tokenizer(base)
        answers = [a for rows in (*self.val.values(), *self.test.values()) for _, a in rows]
        self.max_new_tokens = (
            max(len(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) for a in answers) + 2
        )
        breaks = [
            i for t, i in tokenizer.get_vocab().items() if "\n" in tokenizer.convert_tokens_to_string([t])
        ]
        with quiet_hf():
            self.model = load_causal_lm(base, None)
        # stop each row at its first line break: the metric reads the first line only
        self.model.generation_config.eos_token_id = [tokenizer.eos_token_id, *breaks]

    def _accuracy(self, model, rows: list[tuple[str, str]]) -> float:
        from mergekit_subspace.eval.metrics import exact_match_accuracy

        ordered = sorted(rows, key=lambda row: len(row[0]))  # less padding; accuracy is order-free
        return exact_match_accuracy(
            self.base,
            None,
            ordered,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            model=model,
        )

    def scores(
        self, folder: Path | None, tasks: list[str], split: str, grid: list[float]
    ) -> dict[str, list[float]]:
        """Per task, accuracy at each lambda of the grid (folder None: the base alone)."""
        from peft import PeftModel

        from mergekit_subspace.merge.select import set_lora_scale

        rows = self.val if split == "val" else self.test
        if folder is None:
            return {t: [self._accuracy(self.model, rows[t])] for t in tasks}
        with quiet_hf():
            model = PeftModel.from_pretrained(copy.deepcopy(self.model), str(folder))
        model.eval()
        out: dict[str, list[float]] = {t: [] for t in tasks}
        for value in grid:
            set_lora_scale(model, value)
            for task in tasks:
                out[task].append(self._accuracy(model, rows[task]))
        return out

    def tune(self, folder: Path, tasks: list[str], grid: list[float], work: Path) -> dict[str, Any]:
        """lambda by the mean validation score (select.choose), then the test score of the folder at that lambda."""
        from mergekit_subspace.merge.select import choose

        val = self.scores(folder, tasks, "val", grid)
        means = [statistics.fmean(val[t][i] for t in tasks) for i in range(len(grid))]
        chosen = choose(grid, means)
        final = scale_folder(folder, work / f"final-{time.monotonic_ns()}", chosen)
        test = {t: s[0] for t, s in self.scores(final, tasks, "test", [1.0]).items()}
        shutil.rmtree(final, ignore_errors=True)
        return {"lambda": chosen, "val_means": means, "test": test}


def delta_of(folder: Path) -> dict[str, Any]:
    """Per module, the folder's (B, A) with its LoRA scale folded into B (for comparing two merges' deltas)."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    out = {}
    for key, value in tensors.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0]
            b = tensors[key.replace(".lora_A.", ".lora_B.")].double()
            out[module] = (b * (config["lora_alpha"] / config["r"]), value.double())
    return out


def relative_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    """||D_a - D_b|| / ||D_a|| over all modules, from the factors (traces of small Gram products)."""
    if set(a) != set(b):
        return float("inf")
    diff = norm = 0.0
    for module, (ba, aa) in a.items():
        bb, ab = b[module]
        gram = lambda b1, a1, b2, a2: float(((b1.T @ b2) * (a1 @ a2.T)).sum())  # noqa: E731 - <B1A1, B2A2>
        daa, dbb, dab = gram(ba, aa, ba, aa), gram(bb, ab, bb, ab), gram(ba, aa, bb, ab)
        diff += daa + dbb - 2 * dab
        norm += daa
    return (max(diff, 0.0) ** 0.5) / max(norm**0.5, 1e-30)


# --------------------------------------------------------------------------------------------- the run


def plans(only: list[str] | None) -> list[tuple[str, str]]:
    """(family, method) in PRIORITY order, then the rest of our registry (so new methods are included)."""
    from mergekit_subspace.merge.methods import METHODS

    everything = [("baseline", "mean")]
    everything += [("ours", m) for m in METHODS if m != "mean"]
    everything += [("mergekit", m) for m in MERGEKIT] + [("peft", m) for m in PEFT]
    order = {label: i for i, label in enumerate(PRIORITY)}
    ranked = sorted(everything, key=lambda p: order.get(f"{p[0]}:{p[1]}", len(order)))
    return [p for p in ranked if not only or f"{p[0]}:{p[1]}" in only]


def subsets_of(sizes: list[int], per_size: int) -> list[tuple[int, tuple[str, ...]]]:
    return [(size, subset) for size in sizes for subset in SUBSETS[size][:per_size]]


def label_of(family: str, method: str) -> str:
    return "plain mean (lambda 1)" if family == "baseline" else f"{family} {method}"


def summarize(row: dict[str, Any], own: dict[str, float]) -> None:
    normalized = {t: row["test"][t] / own[t] if own[t] > 0 else float("nan") for t in row["test"]}
    row["normalized"] = normalized
    row["normalized_mean"] = statistics.fmean(normalized.values())
    row["normalized_worst"] = min(normalized.values())
    row["accuracy_mean"] = statistics.fmean(row["test"].values())


def time_merges(
    todo: list[tuple[str, str]],
    subsets: list[tuple[int, tuple[str, ...]]],
    paths: dict[str, str],
    base: str,
    work: Path,
    module: str = MODULE,
) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Each tool's merges in one fresh interpreter (`module`'s worker_main): seconds, peak RSS, written folder."""
    tool_of = {"baseline": "ours", "ours": "ours", "mergekit": "mergekit", "peft": "peft"}
    timings: dict[tuple[str, str, str], dict[str, Any]] = {}
    for tool in dict.fromkeys(tool_of[f] for f, _ in todo):
        runs = [
            {
                "family": f,
                "method": m,
                "size": size,
                "subset": "+".join(subset),
                "adapters": [paths[t] for t in subset],
                "out": str(work / f"unit-{f}-{m}-{'+'.join(subset)}"),
            }
            for f, m in todo
            if tool_of[f] == tool
            for size, subset in subsets
        ]
        tick = time.perf_counter()
        results = merge_peers.run_worker({"family": tool, "base": base, "runs": runs}, work, module)
        for run, result in zip(runs, results, strict=True):
            timings[(run["family"], run["method"], run["subset"])] = result
        print(f"{tool}: {len(runs)} merges timed ({time.perf_counter() - tick:.0f}s)", flush=True)
    return timings


def score_row(
    family: str,
    method: str,
    size: int,
    subset: tuple[str, ...],
    timing: dict[str, Any],
    ev: Evaluator,
    own: dict[str, float],
    grid: list[float],
    work: Path,
    deltas: dict[str, list[tuple[dict, dict]]],
) -> dict[str, Any]:
    """One merge's row: lambda tuned on validation, test scores, normalized; its folder is removed after.

    A delta equal to one already scored on the subset (in `deltas`, which this extends) reuses its scores.
    """
    tick = time.perf_counter()
    key = "+".join(subset)
    row: dict[str, Any] = {
        "label": label_of(family, method),
        "family": family,
        "method": method,
        "size": size,
        "subset": key,
    } | {k: v for k, v in timing.items() if k not in ("folder", "method", "size", "subset")}
    if "error" in timing:
        print(f"T={size} {row['label']} [{key}]: FAILED {timing['error']}", flush=True)
        return row
    folder = Path(timing["folder"])
    delta = delta_of(folder)
    same = next(
        (
            (prev, diff)
            for prev, other in deltas.get(key, [])
            if (diff := relative_difference(other, delta)) < SAME_DELTA
        ),
        None,
    )
    if family == "baseline":
        row |= {
            "lambda": 1.0,
            "val_means": [],
            "test": {t: s[0] for t, s in ev.scores(folder, list(subset), "test", [1.0]).items()},
        }
    elif same is not None:
        prev, diff = same
        row |= {k: prev[k] for k in ("lambda", "val_means", "test")}
        row["scored_as"] = f"{prev['label']} (same delta, relative difference {diff:.1e})"
    else:
        row |= ev.tune(folder, list(subset), grid, work)
    summarize(row, own)
    if family != "baseline" and same is None:
        deltas.setdefault(key, []).append((row, delta))
    shutil.rmtree(folder.parent if family == "peft" else folder, ignore_errors=True)
    print(
        f"T={size} {row['label']} [{key}]: norm mean {row['normalized_mean']:.3f} worst "
        f"{row['normalized_worst']:.3f} lambda {row['lambda']:g} merge {row['merge_s']:.3f}s "
        f"e2e {row['end_to_end_s']:.2f}s rss {row['peak_rss_mb']:.0f}MB "
        f"(eval {time.perf_counter() - tick:.0f}s){' ' + row['scored_as'] if 'scored_as' in row else ''}",
        flush=True,
    )
    return row


def zoo_entries(zoo: Path, names: list[str]) -> list[dict[str, str]]:
    """The zoo's adapter folders and held-out files for these tasks (a zoo still building serves its done tasks)."""
    entries = [{"name": n, "path": f"adapters/{n}", "eval": f"eval/{n}.jsonl"} for n in names]
    missing = [e["name"] for e in entries if not (zoo / e["path"] / "adapter_model.safetensors").is_file()]
    if missing or not (zoo / "smollm2-135m-instruct").is_dir():
        raise SystemExit(
            f"{zoo}: no adapter for {', '.join(missing) or 'the base'}; build the zoo first: "
            f"python -m benchmarks.zoos.decoder --out {zoo} --n 8"
        )
    return entries


def merged_subsets(previous: list[dict[str, Any]], subsets: list[tuple[int, tuple[str, ...]]]) -> list[dict]:
    """Subsets of earlier (resumed) runs, then this run's new ones."""
    out = list(previous)
    for size, tasks in subsets:
        if {"size": size, "tasks": list(tasks)} not in out:
            out.append({"size": size, "tasks": list(tasks)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--zoo", default=DEFAULT_ZOO, help="decoder zoo folder with 8 tasks (built if missing)"
    )
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8], choices=sorted(SUBSETS))
    parser.add_argument("--subsets", type=int, default=2, help="subsets per size (at most those in SUBSETS)")
    parser.add_argument("--val", type=int, default=DEFAULT_VAL, help="validation lines per task")
    parser.add_argument("--test", type=int, default=DEFAULT_TEST, help="test lines per task (after val)")
    parser.add_argument("--grid", type=float, nargs="+", default=list(DEFAULT_GRID))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--only", nargs="+", help="family:method pairs to run (e.g. ours:ties peft:cat)")
    parser.add_argument("--budget-minutes", type=float, default=None, help="start no new method after this")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out's JSON")
    parser.add_argument("--report-only", action="store_true", help="rewrite markdown and plot from the JSON")
    parser.add_argument(
        "--combine", nargs="+", metavar="DIR", help="with --report-only: join these runs' results into --out"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        folders = [Path(d) for d in args.combine] if args.combine else [out]
        result = combine([json.loads((d / "headless_merge_bench.json").read_text()) for d in folders])
        write_report(result, out, plot_too=True)
        return 0

    import torch

    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    zoo = Path(args.zoo)
    subsets = subsets_of(args.sizes, args.subsets)
    names = list(dict.fromkeys(t for _, subset in subsets for t in subset))
    entries = zoo_entries(zoo, names)
    base = str(zoo / "smollm2-135m-instruct")
    paths = {e["name"]: str(zoo / e["path"]) for e in entries}
    work = Path(tempfile.mkdtemp(prefix="headless-merge-"))
    data = split_eval(zoo, entries, work, args.val, args.test)
    ev = Evaluator(base, data, args.val, args.batch_size)

    previous = {}
    if args.resume and (out / "headless_merge_bench.json").is_file():
        previous = json.loads((out / "headless_merge_bench.json").read_text())
    own = dict(previous.get("own_accuracy", {}))
    base_only = dict(previous.get("base_only_accuracy", {}))
    for task in names:
        if task not in own:
            own[task] = ev.scores(Path(paths[task]), [task], "test", [1.0])[task][0]
        if task not in base_only:
            base_only[task] = ev.scores(None, [task], "test", [1.0])[task][0]
    print(
        f"own test accuracy {statistics.fmean(own.values()):.3f}, base {statistics.fmean(base_only.values()):.3f}"
    )

    from importlib.metadata import version

    result: dict[str, Any] = {
        "command": "python -m benchmarks.headless_merge_bench "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (torch threads {THREADS})",
        "versions": {
            "torch": torch.__version__,
            "peft": version("peft"),
            "transformers": version("transformers"),
            "mergekit": merge_peers.mergekit_version(),
        },
        "zoo": {"path": args.zoo, "tasks": list(own), "val_lines": args.val, "test_lines": args.test},
        "subsets": merged_subsets(previous.get("subsets", []), subsets),
        "grid": args.grid,
        "density": DENSITY,
        "max_new_tokens": ev.max_new_tokens,
        "own_accuracy": own,
        "base_only_accuracy": base_only,
        "rows": list(previous.get("rows", [])),
        "not_run": [],
    }
    done = {(r["family"], r["method"], r["subset"]) for r in result["rows"]}
    todo = [p for p in plans(args.only) if any((*p, "+".join(t)) not in done for _, t in subsets)]
    deltas: dict[str, list[tuple[dict, dict]]] = {}
    timings = time_merges(todo, subsets, paths, base, work)  # all merges first: one interpreter per tool
    for index, (family, method) in enumerate(todo):
        minutes = (time.perf_counter() - started) / 60
        if args.budget_minutes is not None and minutes > args.budget_minutes:
            result["not_run"] = [f"{f}:{m}" for f, m in todo[index:]]
            print(f"budget reached after {minutes:.1f} min; not scored: {result['not_run']}", flush=True)
            break
        for size, subset in subsets:
            key = "+".join(subset)
            if (family, method, key) in done:
                continue
            row = score_row(
                family, method, size, subset, timings[(family, method, key)], ev, own, args.grid, work, deltas
            )
            result["rows"].append(row)
            result["seconds_total"] = time.perf_counter() - started + previous.get("seconds_total", 0.0)
            write_report(result, out, plot_too=False)
    result["seconds_total"] = time.perf_counter() - started + previous.get("seconds_total", 0.0)
    write_report(result, out, plot_too=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------------------------- report


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs of the same settings on different sizes (run side by side on a shared machine)."""
    out = dict(results[0])
    for key in ("grid", "density", "max_new_tokens"):
        if any(r[key] != out[key] for r in results):
            raise SystemExit(f"cannot combine runs with different {key}")
    out["command"] = "; ".join(dict.fromkeys(r["command"] for r in results))
    out["own_accuracy"] = {t: a for r in results for t, a in r["own_accuracy"].items()}
    out["base_only_accuracy"] = {t: a for r in results for t, a in r["base_only_accuracy"].items()}
    out["subsets"] = merged_subsets(
        [], [(s["size"], tuple(s["tasks"])) for r in results for s in r["subsets"]]
    )
    rows = {(row["family"], row["method"], row["subset"]): row for r in results for row in r["rows"]}
    out["rows"] = list(rows.values())  # a resumed run repeats its seed's rows
    out["not_run"] = [
        f"T={'/'.join(str(t) for t in sorted({x['size'] for x in r['subsets'] if x['size'] in sizes_of(r)}))} {m}"
        for r in results
        for m in r.get("not_run", [])
    ]
    out["seconds_total"] = sum(r.get("seconds_total", 0.0) for r in results)
    out["zoo"] = dict(out["zoo"], tasks=list(out["own_accuracy"]))
    return out


def sizes_of(result: dict[str, Any]) -> set[int]:
    """The sizes a run was asked for (its command's --sizes)."""
    words = result["command"].split()
    sizes = words[words.index("--sizes") + 1 :] if "--sizes" in words else ["2", "4", "8"]
    return {int(w) for w in sizes if w.isdigit()} or {2, 4, 8}


def per_subset_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The report's per-subset table: every scored row with its lambda and per-task normalized accuracy."""
    lines = [
        "",
        "## Per subset",
        "",
        "| T | subset | method | lambda | normalized mean | worst | per task |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "normalized_mean" in row:
            per_task = ", ".join(f"{t} {v:.2f}" for t, v in row["normalized"].items())
            lines.append(
                f"| {row['size']} | {row['subset']} | {row['label']} | {row['lambda']:g} | "
                f"{row['normalized_mean']:.3f} | {row['normalized_worst']:.3f} | {per_task} |"
            )
    return lines


def write_report(result: dict[str, Any], out: Path, plot_too: bool) -> None:
    from benchmarks.zoos._common import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "headless_merge_bench.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "headless_merge_bench.md", markdown(result))
    if plot_too and result["rows"]:
        plot(result, out / "headless_merge_bench.png")


def by_size(rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """label -> size -> mean over that size's subsets of normalized mean, normalized worst, lambda, s, MB."""
    grouped: dict[str, dict[int, list[dict]]] = {}
    for row in rows:
        if "normalized_mean" in row:
            grouped.setdefault(row["label"], {}).setdefault(row["size"], []).append(row)
    out: dict[str, dict[int, dict[str, float]]] = {}
    for label, sizes in grouped.items():
        out[label] = {
            size: {
                key: statistics.fmean(r[key] for r in group)
                for key in ("normalized_mean", "normalized_worst", "merge_s", "end_to_end_s", "peak_rss_mb")
            }
            | {"n": len(group)}
            for size, group in sizes.items()
        }
    return out


def method_table(
    table: Iterable[tuple[str, dict[int, dict[str, float]]]], sizes: list[int], base_cells: list[str]
) -> list[str]:
    """The markdown table of `by_size`'s rows in the given order: normalized mean and worst task per size,
    then merge seconds, end-to-end seconds and peak RSS; last, the base alone (`base_cells`, two per size)."""
    header = "| method | " + " | ".join(f"T={t} mean | T={t} worst" for t in sizes)
    header += (
        " | "
        + " | ".join(f"merge s T={t}" for t in sizes)
        + " | "
        + " | ".join(f"e2e s T={t}" for t in sizes)
    )
    header += " | " + " | ".join(f"peak RSS MB T={t}" for t in sizes) + " |"
    lines = [header, "|" + "---|" * (1 + 5 * len(sizes))]
    for label, per in table:
        cells = [label]
        for t in sizes:
            cells += (
                [f"{per[t]['normalized_mean']:.3f}", f"{per[t]['normalized_worst']:.3f}"]
                if t in per
                else ["", ""]
            )
        cells += [f"{per[t]['merge_s']:.3f}" if t in per else "" for t in sizes]
        cells += [f"{per[t]['end_to_end_s']:.2f}" if t in per else "" for t in sizes]
        cells += [f"{per[t]['peak_rss_mb']:.0f}" if t in per else "" for t in sizes]
        lines.append("| " + " | ".join(cells) + " |")
    base = ["base alone (no adapter)", *base_cells]
    lines.append("| " + " | ".join(base + [""] * (3 * len(sizes))) + " |")
    return lines


def reuse_and_failure_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Which rows were scored as another method's identical delta, and which merges failed."""
    lines: list[str] = []
    reused = [r for r in rows if "scored_as" in r]
    failed = [r for r in rows if "error" in r]
    if reused:
        lines += ["", "Scored once, reported under each name (the same merged delta):", ""]
        lines += [f"- T={r['size']} [{r['subset']}] {r['label']} = {r['scored_as']}" for r in reused]
    if failed:
        lines += ["", "Failed merges:", ""] + [f"- T={r['size']} {r['label']}: {r['error']}" for r in failed]
    return lines


def markdown(result: dict[str, Any]) -> str:
    sizes = sorted({s["size"] for s in result["subsets"]})
    lines = [
        "# Headless merge benchmark: SmolLM2-135M causal-LM LoRAs, no per-task head",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; torch {result['versions']['torch']}, peft {result['versions']['peft']}, "
        f"mergekit {result['versions']['mergekit']}. Shared CPU: absolute seconds are noisy.",
        "",
        "Each subset's adapters are merged into one delta, written as one PEFT folder, and every task of the subset "
        "is scored with that folder (greedy exact match; no head, nothing per task). Normalized = merged test "
        "accuracy / the task's own adapter's test accuracy; *mean* and *worst* are over the subset's tasks, then "
        f"averaged over the subsets of a size. Per task {result['zoo']['val_lines']} validation and "
        f"{result['zoo']['test_lines']} test prompts (disjoint slices of the zoo's held-out set); lambda chosen on "
        f"the validation prompts (grid {result['grid']}, same code for every method); the plain mean stays at "
        f"lambda 1. Density {result['density']} for every sparsifying method; PEFT svd/ties_svd at its default "
        f"svd_rank (the largest input rank, 8). At most {result['max_new_tokens']} new tokens, stopping at the "
        "first line break. Seconds and peak RSS: one fresh process per tool, lambda 1, adapter folders on disk "
        "to the tool's output on disk (*e2e*); *merge* = the merge step alone.",
        "",
        "Subsets: " + "; ".join(f"T={s['size']}: {', '.join(s['tasks'])}" for s in result["subsets"]),
        "",
    ]
    base_norm = {
        size: statistics.fmean(
            result["base_only_accuracy"][k] / result["own_accuracy"][k]
            for s in result["subsets"]
            if s["size"] == size
            for k in s["tasks"]
        )
        for size in sizes
    }
    lines += method_table(
        by_size(result["rows"]).items(), sizes, [c for t in sizes for c in (f"{base_norm[t]:.3f}", "")]
    )
    lines += reuse_and_failure_lines(result["rows"])
    if result.get("not_run"):
        lines += ["", f"Not run (time budget): {', '.join(result['not_run'])}"]
    lines += per_subset_lines(result["rows"])
    lines += [
        "",
        "## Reference points (test prompts)",
        "",
        "| task | own adapter | base alone |",
        "|---|---|---|",
    ]
    for task, acc in result["own_accuracy"].items():
        lines.append(f"| {task} | {acc:.3f} | {result['base_only_accuracy'][task]:.3f} |")
    return "\n".join(lines) + "\n"


FAMILY_COLORS = {"ours": "tab:blue", "mergekit": "tab:orange", "peft": "tab:green", "baseline": "tab:gray"}


def plot(result: dict[str, Any], path: Path) -> None:
    """Normalized accuracy (mean over tasks; dashed: worst task) against T, one line per method, one panel
    per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = by_size(result["rows"])
    family = {r["label"]: r["family"] for r in result["rows"]}
    panels = [f for f in ("ours", "mergekit", "peft") if any(family[label] == f for label in table)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        for label, per in table.items():
            if family[label] not in (name, "baseline"):
                continue
            sizes = sorted(per)
            style = {"color": "k", "lw": 2} if family[label] == "baseline" else {}
            (line,) = ax.plot(
                sizes, [per[t]["normalized_mean"] for t in sizes], marker="o", label=label, **style
            )
            ax.plot(sizes, [per[t]["normalized_worst"] for t in sizes], ls=":", color=line.get_color(), lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({s["size"] for s in result["subsets"]}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_title(f"{name} (dotted: worst task)")
        ax.set_xlabel("tasks merged (T)")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("normalized accuracy (merged / own adapter)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
