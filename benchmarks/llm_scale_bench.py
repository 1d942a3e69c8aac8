"""Scale benchmark of `compress` on LLM-shaped zoos: wall time and peak memory against the cost of reading the zoo.

    python -m benchmarks.llm_scale_bench --n 16 64 256 1000 --layers 8 --repeats 3 --procs 1 2
                                         --out benchmarks/results/llm-scale [--cache DIR] [--k 16]
                                         [--dtype float16] [--hidden 4096] [--kv-dim 1024]
                                         [--timeout 3600] [--no-cold] [--keep-stores]

For each N the synthetic Mistral-7B-shaped zoo of ``benchmarks/zoos/llm_synth.py`` is built or reused (adapter
i never depends on N, so a larger N only writes the missing adapters), a compress recipe is written per
process count (``OUT/recipes/n{N}-p{P}.yaml``, store in the ignored ``OUT/stores/``), and each repeat measures,
every run in a fresh subprocess with OMP_NUM_THREADS = MKL_NUM_THREADS = 1:

- the read floor: a child that imports torch first (import seconds are reported apart), then opens every
  adapter's safetensors with ``safe_open`` and reads every tensor once, timed inside the child; warm (page
  cache), and cold after ``sync; echo 3 > /proc/sys/vm/drop_caches`` when that file is writable;
- ``mergekit-subspace compress RECIPE --overwrite`` (P = 1) and ``torchrun --nproc-per-node P --standalone
  -m mergekit_subspace compress RECIPE --overwrite`` (P > 1), warm cache. Each runs under its own small
  launcher process that times it, takes the exact peak RSS of its descendants from ``getrusage
  (RUSAGE_CHILDREN)`` and polls ``/proc/*/status`` VmHWM for the peak of each process (each rank).

A run that fails (non-zero exit, timeout) is recorded with its error and the benchmark goes on. Medians over
repeats; ratios compress / read floor (warm, cold), speedup of P processes over 1, peak RSS relative to the
smallest N, and a byte-identity check (sha256 of every store file, 1 process against P). Results go to
OUT/results.json (rewritten after every N), OUT/report.md and OUT/scale.png; logs of every child stay in the
git-ignored folder `work/logs` under OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.zoos.llm_synth import DEFAULT_CACHE, WEIGHTS, LlmSynthSpec, build_llm_zoo
from mergekit_subspace.io.files import atomic_write_bytes, json_bytes, sha256_file

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "llm-scale"
THREADS = 1  # per process; two OpenMP threads spin on each other on the shared 2-core machine
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
TARGET_LAYERS = 32  # Mistral-7B's depth, for the extrapolation

# The read-floor child: torch first, so its import is not part of the timed read.
READ_CHILD = (
    "import sys, time; t0 = time.perf_counter(); import torch; "
    "from benchmarks.llm_scale_bench import read_floor_child; read_floor_child(t0, sys.argv[1])"
)

# The launcher: a tiny process (no torch) whose only child is the measured command, so RUSAGE_CHILDREN's
# ru_maxrss is that command's peak (or, under torchrun, the largest of torchrun and its ranks).
LAUNCHER = r"""
import json, os, resource, subprocess, sys, threading, time

result_path, cmd = sys.argv[1], sys.argv[2:]


def children():
    kids = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(name))
    return kids


def descendants(root):
    kids, out, todo = children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def read(path, mode="r"):
    try:
        with open(path, mode) as f:
            return f.read()
    except OSError:
        return None


def sample(pid, seen):
    status = read(f"/proc/{pid}/status")
    if status is None:
        return
    hwm = next((int(l.split()[1]) * 1024 for l in status.splitlines() if l.startswith("VmHWM:")), None)
    if hwm is None:
        return
    info = seen.setdefault(pid, {"pid": pid, "hwm_bytes": 0, "rank": None, "cmd": ""})
    info["hwm_bytes"] = max(info["hwm_bytes"], hwm)
    cmdline = read(f"/proc/{pid}/cmdline", "rb")
    if cmdline:
        info["cmd"] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()[:300]
    environ = read(f"/proc/{pid}/environ", "rb") or b""
    for item in environ.split(b"\0"):
        if item.startswith(b"RANK="):
            info["rank"] = int(item[5:])


seen, done = {}, threading.Event()
started = time.perf_counter()
proc = subprocess.Popen(cmd)


def poll():
    while not done.is_set():
        for pid in descendants(proc.pid):
            sample(pid, seen)
        done.wait(0.2)


thread = threading.Thread(target=poll, daemon=True)
thread.start()
rc = proc.wait()
wall = time.perf_counter() - started
done.set()
thread.join()
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(result_path, "w") as f:
    json.dump({"rc": rc, "wall_s": wall, "maxrss_bytes": usage.ru_maxrss * 1024,
               "cpu_s": usage.ru_utime + usage.ru_stime, "processes": sorted(seen.values(), key=lambda p: p["pid"])}, f)
sys.exit(0)
"""


def log(message: str) -> None:
    print(f"[llm-scale] {message}", file=sys.stderr, flush=True)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(THREADS),
        MKL_NUM_THREADS=str(THREADS),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
    )
    return env


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------ the read floor


def read_floor(paths: list[Path]) -> dict[str, Any]:
    """Open every adapter's safetensors and read every tensor once (in this process); timed."""
    from safetensors import safe_open

    files = tensors = tensor_bytes = file_bytes = 0
    started = time.perf_counter()
    for folder in paths:
        weights = Path(folder) / WEIGHTS
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                tensors += 1
                tensor_bytes += tensor.numel() * tensor.element_size()
        files += 1
        file_bytes += weights.stat().st_size
    seconds = time.perf_counter() - started
    return {
        "read_s": seconds,
        "files": files,
        "tensors": tensors,
        "tensor_bytes": tensor_bytes,
        "file_bytes": file_bytes,
        "gb_per_s": file_bytes / seconds / 1e9 if seconds > 0 else None,
    }


def read_floor_child(t0: float, list_file: str) -> None:
    """Entry point of the read-floor child (READ_CHILD): prints one JSON line."""
    imported = time.perf_counter()
    paths = [Path(p) for p in json.loads(Path(list_file).read_text())]
    result = read_floor(paths)
    result["import_s"] = imported - t0
    print(json.dumps(result), flush=True)


def drop_caches() -> str | None:
    """Empty the page cache; returns why not when it cannot (not root, read-only /proc/sys)."""
    if not os.access(DROP_CACHES, os.W_OK):
        return f"{DROP_CACHES} is not writable"
    try:
        os.sync()
        DROP_CACHES.write_text("3\n")
    except OSError as exc:
        return f"writing {DROP_CACHES} failed: {exc}"
    return None


def measure_read_floor(
    paths: list[Path], work: Path, cold: bool = False, timeout: float = 3600
) -> dict[str, Any]:
    """The read floor in a fresh child; with cold=True the page cache is dropped first."""
    work.mkdir(parents=True, exist_ok=True)
    list_file = work / "read-floor-paths.json"
    list_file.write_text(json.dumps([str(p) for p in paths]))
    if cold:
        why = drop_caches()
        if why is not None:
            return {"ok": False, "error": why, "unavailable": True}
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", READ_CHILD, str(list_file)],
            cwd=REPO,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"ok": False, "rc": done.returncode, "error": "\n".join(done.stderr.splitlines()[-15:])}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"ok": True, "child_wall_s": wall, **result}


# ------------------------------------------------------------------------------------ measured compress


def shown_command(cmd: list[str]) -> str:
    """A child's command as results record it: programs by name, not by this machine's install path."""
    return " ".join(
        Path(part).name if Path(part).is_absolute() and Path(part).is_file() else part for part in cmd
    )


def compress_command(recipe: Path, procs: int) -> list[str]:
    """`mergekit-subspace compress RECIPE --overwrite`, under torchrun when procs > 1."""
    if procs == 1:
        script = Path(sys.executable).parent / "mergekit-subspace"
        head = [str(script)] if script.is_file() else [sys.executable, "-m", "mergekit_subspace.cli"]
        return [*head, "compress", str(recipe), "--overwrite"]
    return [*torchrun_head(procs), "-m", "mergekit_subspace", "compress", str(recipe), "--overwrite"]


def torchrun_head(procs: int) -> list[str]:
    torchrun = Path(sys.executable).parent / "torchrun"
    head = [str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    return [*head, "--nproc-per-node", str(procs), "--standalone"]


def run_measured(cmd: list[str], logs: Path, label: str, timeout: float = 3600) -> dict[str, Any]:
    """Run cmd under the launcher: wall seconds, exact peak RSS of its process tree, peak per process."""
    logs.mkdir(parents=True, exist_ok=True)
    result_file = logs / f"{label}.json"
    result_file.unlink(missing_ok=True)
    out_log, err_log = logs / f"{label}.stdout", logs / f"{label}.stderr"
    started = time.perf_counter()
    with open(out_log, "wb") as out, open(err_log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(result_file), *cmd],
            cwd=REPO,
            env=child_env(),
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group, so a timeout can end torchrun and every rank
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"ok": False, "error": f"timed out after {timeout:.0f} s", "stderr_log": str(err_log)}
    outer = time.perf_counter() - started
    if not result_file.is_file():
        return {"ok": False, "error": f"launcher failed: {_tail(err_log)}", "stderr_log": str(err_log)}
    result = json.loads(result_file.read_text())
    result["outer_wall_s"] = outer
    result["stderr_log"] = str(err_log)
    result["ok"] = result["rc"] == 0
    if not result["ok"]:
        result["error"] = f"exit status {result['rc']}: {_tail(err_log)}"
    return result


def store_hashes(store: Path) -> dict[str, str]:
    """sha256 of every file in a store folder, by relative path."""
    return {str(p.relative_to(store)): sha256_file(p) for p in sorted(store.rglob("*")) if p.is_file()}


def compare_stores(first: dict[str, str], second: dict[str, str]) -> dict[str, Any]:
    differing = sorted(name for name in set(first) | set(second) if first.get(name) != second.get(name))
    return {"compared": True, "identical": not differing, "files": len(first), "differing": differing[:50]}


def write_recipe(path: Path, adapters: list[str], k: int, dtype: str, store: Path) -> Path:
    recipe = {"adapters": adapters, "subspace": {"k": k, "dtype": dtype}, "output": str(store)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, yaml.safe_dump(recipe, sort_keys=False).encode())
    return path


def recipe_adapters(zoo_root: Path, paths: list[Path]) -> list[str]:
    """`<zoo>/adapters/*` when the zoo holds exactly these adapters, else the explicit list of the first N."""
    folder = zoo_root / "adapters"
    present = sum(1 for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [str(folder / "*")] if present == len(paths) else [str(p) for p in paths]


# ------------------------------------------------------------------------------------------ one N


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get("ok") and r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize_mode(runs: list[dict[str, Any]], hashes: list[dict[str, str]]) -> dict[str, Any]:
    ok = [r for r in runs if r.get("ok")]
    summary: dict[str, Any] = {
        "ok": bool(ok) and len(ok) == len(runs),
        "repeats": len(runs),
        "succeeded": len(ok),
    }
    if not ok:
        summary["error"] = next((r.get("error") for r in runs if r.get("error")), "no run")
        return summary
    summary["median_s"] = _median(ok, "wall_s")
    summary["min_s"] = min(r["wall_s"] for r in ok)
    summary["max_s"] = max(r["wall_s"] for r in ok)
    summary["median_cpu_s"] = _median(ok, "cpu_s")
    summary["peak_rss_bytes"] = max(r["maxrss_bytes"] for r in ok)
    ranks: dict[str, int] = {}
    for r in ok:
        for p in r.get("processes", []):
            if p.get("rank") is not None:
                key = str(p["rank"])
                ranks[key] = max(ranks.get(key, 0), p["hwm_bytes"])
    if ranks:
        summary["peak_rss_per_rank_bytes"] = dict(sorted(ranks.items()))
    if hashes:
        summary["repeats_byte_identical"] = all(h == hashes[0] for h in hashes)
    if len(ok) < len(runs):
        summary["error"] = next(r.get("error") for r in runs if not r.get("ok"))
    return summary


def summarize_floor(items: list[dict[str, Any]], kind: str, cold_reason: str | None) -> dict[str, Any]:
    if not items:
        return {"ok": False, "error": f"not measured ({cold_reason})" if kind == "cold" else "no run"}
    ok = [f for f in items if f.get("ok")]
    summary: dict[str, Any] = {
        "ok": bool(ok),
        "median_s": _median(ok, "read_s"),
        "median_import_s": _median(ok, "import_s"),
        "median_child_wall_s": _median(ok, "child_wall_s"),
        "runs": items,
    }
    if ok:
        summary.update({key: ok[0][key] for key in ("files", "tensors", "tensor_bytes", "file_bytes")})
    else:
        summary["error"] = items[0].get("error")
    return summary


def measure_n(
    n: int, args: argparse.Namespace, spec: LlmSynthSpec, out: Path, cold: dict[str, Any]
) -> dict[str, Any]:
    """Every measurement of one N; ``cold`` ({"ok", "reason"}) turns off once dropping the cache fails."""
    zoo = build_llm_zoo(args.cache, n, spec, progress=True)
    log(f"N={n}: zoo {zoo.root} ({zoo.built} written, {zoo.reused} reused, {zoo.seconds:.1f} s)")
    work = out / "work" / f"n{n}"
    logs = out / "work" / "logs"
    adapters = recipe_adapters(zoo.root, zoo.paths)
    recipes = {
        p: write_recipe(
            out / "recipes" / f"n{n}-p{p}.yaml", adapters, args.k, args.dtype, out / "stores" / f"n{n}-p{p}"
        )
        for p in args.procs
    }
    # warm the page cache once (untimed) so the first warm measurement is warm too
    for path in zoo.paths:
        with open(path / WEIGHTS, "rb") as handle:
            while handle.read(1 << 24):
                pass
    floors: dict[str, list[dict[str, Any]]] = {"warm": [], "cold": []}
    runs: dict[int, list[dict[str, Any]]] = {p: [] for p in args.procs}
    hashes: dict[int, list[dict[str, str]]] = {p: [] for p in args.procs}
    failed: set[int] = set()
    for repeat in range(args.repeats):
        tag = f"N={n} repeat {repeat + 1}/{args.repeats}"
        if cold["ok"]:
            floor_cold = measure_read_floor(zoo.paths, work, cold=True, timeout=args.timeout)
            if floor_cold.get("unavailable"):
                cold.update(ok=False, reason=floor_cold["error"])
                log(f"cold read floor unavailable: {floor_cold['error']}")
            else:
                floors["cold"].append(floor_cold)
                log(f"{tag}: read floor cold {floor_cold.get('read_s', float('nan')):.3f} s")
        warm = measure_read_floor(zoo.paths, work, cold=False, timeout=args.timeout)
        floors["warm"].append(warm)
        log(
            f"{tag}: read floor warm {warm.get('read_s', float('nan')):.3f} s (import {warm.get('import_s', 0):.2f} s)"
        )
        for p in args.procs:
            if p in failed:
                continue  # a mode that failed once is not retried (the error is recorded)
            run = run_measured(compress_command(recipes[p], p), logs, f"n{n}-p{p}-r{repeat}", args.timeout)
            runs[p].append(run)
            if run["ok"]:
                hashes[p].append(store_hashes(out / "stores" / f"n{n}-p{p}"))
                log(
                    f"{tag}: compress p={p} {run['wall_s']:.2f} s, peak RSS {run['maxrss_bytes'] / 2**20:.0f} MiB"
                )
            else:
                failed.add(p)
                log(f"{tag}: compress p={p} FAILED: {run['error'].splitlines()[-1] if run['error'] else ''}")

    floor = {kind: summarize_floor(items, kind, cold["reason"]) for kind, items in floors.items()}
    compress = {
        str(p): {
            **summarize_mode(runs[p], hashes[p]),
            "command": shown_command(compress_command(recipes[p], p)),
            "runs": runs[p],
        }
        for p in args.procs
    }

    ratios: dict[str, Any] = {}
    for p in args.procs:
        t = compress[str(p)].get("median_s")
        for kind in ("warm", "cold"):
            f = floor[kind].get("median_s")
            ratios[f"p{p}_over_{kind}_floor"] = t / f if t and f else None
    speedup = {}
    t1 = compress.get("1", {}).get("median_s")
    for p in args.procs:
        tp = compress[str(p)].get("median_s")
        if p != 1:
            speedup[str(p)] = t1 / tp if t1 and tp else None
    identity: dict[str, Any] = {}
    if 1 in args.procs:
        for p in args.procs:
            if p == 1:
                continue
            if hashes[1] and hashes[p]:
                identity[str(p)] = compare_stores(hashes[1][-1], hashes[p][-1])
            else:
                identity[str(p)] = {
                    "compared": False,
                    "reason": f"a {'1' if not hashes[1] else p}-process run failed",
                }
    if not args.keep_stores:
        for p in args.procs:
            shutil.rmtree(out / "stores" / f"n{n}-p{p}", ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "n": n,
        "zoo": str(zoo.root),
        "zoo_built": zoo.built,
        "zoo_reused": zoo.reused,
        "zoo_build_s": zoo.seconds,
        "slots": len(spec.modules()),
        "recipe_adapters": "glob" if len(adapters) == 1 and adapters[0].endswith("*") else "explicit list",
        "recipes": {str(p): str(r) for p, r in recipes.items()},
        "read_floor": floor,
        "compress": compress,
        "ratios": ratios,
        "speedup": speedup,
        "identity": identity,
    }


def add_rss_ratios(results: dict[str, Any]) -> None:
    runs = results["runs"]
    for p in results["procs"]:
        base = next(
            (
                r["compress"][str(p)].get("peak_rss_bytes")
                for r in runs
                if r["compress"][str(p)].get("peak_rss_bytes")
            ),
            None,
        )
        for r in runs:
            peak = r["compress"][str(p)].get("peak_rss_bytes")
            r.setdefault("rss_ratio_to_smallest", {})[str(p)] = peak / base if peak and base else None


# ------------------------------------------------------------------------------------------ machine


def machine_note() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
            platform.processor(),
        )
        meminfo = Path("/proc/meminfo").read_text()
        info["mem_total_bytes"] = next(
            int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemTotal:")
        )
    except (OSError, StopIteration):
        pass
    try:
        import safetensors
        import torch

        info["torch"] = torch.__version__
        info["safetensors"] = safetensors.__version__
    except ImportError:
        pass
    return info


IMPORT_ONLY = "import torch, mergekit_subspace.subspace\n"


def startup_baseline(work: Path, procs: int, repeats: int) -> dict[str, Any]:
    """Seconds and peak RSS of a run that only imports torch and the package (under torchrun for procs > 1).

    The fixed cost every compress run pays before it reads a byte; the extrapolation subtracts it.
    """
    script = work / "import_only.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(IMPORT_ONLY)
    cmd = [sys.executable, str(script)] if procs == 1 else [*torchrun_head(procs), str(script)]
    runs = [run_measured(cmd, work / "logs", f"startup-p{procs}-r{i}", 600) for i in range(repeats)]
    ok = [r for r in runs if r.get("ok")]
    summary: dict[str, Any] = {"ok": bool(ok), "command": shown_command(cmd), "runs": runs}
    if ok:
        summary.update(
            wall_s=_median(ok, "wall_s"),
            min_s=min(r["wall_s"] for r in ok),  # load on the machine only adds: the least is the start-up
            maxrss_bytes=max(r["maxrss_bytes"] for r in ok),
        )
    else:
        summary["error"] = runs[0].get("error")
    return summary


# ------------------------------------------------------------------------------------------ report


def _s(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value / 2**20:,.0f}"


def _gb(value: float | None) -> str:
    return "—" if value is None else f"{value / 1e9:.2f}"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _mode_cell(mode: dict[str, Any]) -> str:
    if mode.get("median_s") is None:
        return "failed"
    return _s(mode["median_s"])


def markdown(results: dict[str, Any]) -> str:
    runs, procs = results["runs"], results["procs"]
    spec, machine = results["spec"], results["machine"]
    lines = [
        "# compress at LLM scale (synthetic Mistral-7B-shaped zoo)",
        "",
        f"Zoo: `benchmarks/zoos/llm_synth.py`, {spec['layers']} layers x q/k/v/o = {runs[0]['slots'] if runs else '?'} "
        f"slots, hidden {spec['hidden']}, k/v out {spec['kv_dim']}, r = {spec['rank']}, alpha {spec['alpha']}, "
        f"bfloat16, shared rank {spec['shared_rank']} per slot. Store: k = {results['k']}, {results['dtype']}. "
        f"Medians of {results['repeats']} repeat(s), each run a fresh process with {results['threads_per_process']} "
        "torch/OpenMP thread; every compress run is warm (page cache).",
        "",
        "Command:",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores')} cores (shared with other work), "
        f"{_gb(machine.get('mem_total_bytes'))} GB RAM, {machine.get('platform')}, torch {machine.get('torch')}, "
        f"safetensors {machine.get('safetensors')}. Load average at start {machine['loadavg_start'][0]:.2f}, "
        f"at end {machine.get('loadavg_end', [float('nan')])[0]:.2f}. Cold read floor: "
        + (
            "measured (page cache dropped before each cold read)."
            if results["cold_available"]
            else f"not measured ({results.get('cold_reason')})."
        )
        + " Fixed start (a run that only imports torch and the package): "
        + "; ".join(
            f"{p} process{'es under torchrun' if int(p) > 1 else ''} median {_s(b.get('wall_s'))} s "
            f"(fastest {_s(b.get('min_s'))} s), peak {_mib(b.get('maxrss_bytes'))} MiB"
            for p, b in results["startup"].items()
        )
        + ".",
        "",
        "## Summary (seconds are medians; ratios are compress / read floor)",
        "",
    ]
    headers = ["N", "zoo GB", "floor warm s", "floor cold s"]
    for p in procs:
        headers += [f"compress {p}p s", f"{p}p / warm", f"{p}p / cold", f"peak RSS {p}p MiB"]
    headers += [f"speedup {p}p" for p in procs if p != 1]
    rows = []
    for r in runs:
        fl = r["read_floor"]
        row = [
            str(r["n"]),
            _gb(fl["warm"].get("file_bytes")),
            _s(fl["warm"].get("median_s"), 3),
            _s(fl["cold"].get("median_s"), 3),
        ]
        for p in procs:
            mode = r["compress"][str(p)]
            row += [
                _mode_cell(mode),
                _x(r["ratios"].get(f"p{p}_over_warm_floor")),
                _x(r["ratios"].get(f"p{p}_over_cold_floor")),
                _mib(mode.get("peak_rss_bytes")),
            ]
        row += [_x(r["speedup"].get(str(p))) for p in procs if p != 1]
        rows.append(row)
    lines += _table(headers, rows)
    lines += [""]

    for r in runs:
        fl = r["read_floor"]
        lines += [
            f"## N = {r['n']}",
            "",
            f"{r['read_floor']['warm'].get('files', '?')} adapters, {r['read_floor']['warm'].get('tensors', '?')} tensors, "
            f"{_gb(fl['warm'].get('file_bytes'))} GB on disk; zoo {r['zoo_built']} adapters written and "
            f"{r['zoo_reused']} reused ({r['zoo_build_s']:.1f} s); recipe lists adapters as {r['recipe_adapters']}.",
            "",
        ]
        rows = []
        for kind in ("warm", "cold"):
            f = fl[kind]
            if f.get("median_s") is None:
                rows.append([f"read floor {kind}", "—", "—", "—", "—", f.get("error") or "not measured"])
                continue
            ok = [x["read_s"] for x in f["runs"] if x.get("ok")]
            rows.append(
                [
                    f"read floor {kind}",
                    _s(f["median_s"], 3),
                    f"{min(ok):.3f}-{max(ok):.3f}",
                    "—",
                    "—",
                    f"torch import {_s(f.get('median_import_s'))} s (not timed); "
                    f"{f['file_bytes'] / f['median_s'] / 1e9:.2f} GB/s",
                ]
            )
        for p in procs:
            mode = r["compress"][str(p)]
            ratio_w, ratio_c = (
                r["ratios"].get(f"p{p}_over_warm_floor"),
                r["ratios"].get(f"p{p}_over_cold_floor"),
            )
            if mode.get("median_s") is None:
                error = (mode.get("error") or "").strip().splitlines()
                rows.append(
                    [
                        "compress 1 process" if p == 1 else f"compress {p} processes (torchrun)",
                        "failed",
                        "—",
                        "—",
                        "—",
                        f"`{error[-1][:200] if error else '?'}`",
                    ]
                )
                continue
            notes = [
                f"CPU {_s(mode.get('median_cpu_s'))} s",
                f"{ratio_w:.2f}x warm floor" if ratio_w else "",
                f"{ratio_c:.2f}x cold floor" if ratio_c else "",
            ]
            ranks = mode.get("peak_rss_per_rank_bytes")
            if ranks:
                notes.append(
                    "per rank "
                    + ", ".join(f"{k}: {_mib(v)} MiB" for k, v in ranks.items())
                    + " (VmHWM polled every 0.2 s)"
                )
            if "repeats_byte_identical" in mode:
                notes.append("repeats byte-identical" if mode["repeats_byte_identical"] else "repeats DIFFER")
            if mode.get("error"):
                notes.append("some repeats failed")
            rows.append(
                [
                    "compress 1 process" if p == 1 else f"compress {p} processes (torchrun)",
                    _s(mode["median_s"]),
                    f"{mode['min_s']:.2f}-{mode['max_s']:.2f}",
                    _mib(mode.get("peak_rss_bytes")),
                    _x(r.get("rss_ratio_to_smallest", {}).get(str(p))),
                    "; ".join(n for n in notes if n),
                ]
            )
        lines += _table(["measure", "median s", "range s", "peak RSS MiB", "RSS / smallest N", "notes"], rows)
        for p, ident in r["identity"].items():
            if ident.get("compared"):
                verdict = (
                    "byte-identical"
                    if ident["identical"]
                    else f"DIFFER in {len(ident['differing'])} files: {', '.join(ident['differing'][:8])}"
                )
                lines += [
                    "",
                    f"Store of 1 process vs {p} processes ({ident['files']} files, sha256): {verdict}.",
                ]
            else:
                lines += ["", f"Store of 1 process vs {p} processes: not compared ({ident['reason']})."]
        lines += [""]

    lines += extrapolation(results)
    return "\n".join(lines) + "\n"


def extrapolation(results: dict[str, Any]) -> list[str]:
    runs = [
        r
        for r in results["runs"]
        if r["compress"].get("1", {}).get("median_s") or r["read_floor"]["warm"].get("median_s")
    ]
    if not runs:
        return []
    layers = results["spec"]["layers"]
    factor = TARGET_LAYERS / layers
    base = results["startup"].get("1", {}).get("maxrss_bytes")
    fixed = {p: results["startup"].get(str(p), {}).get("min_s") or 0.0 for p in results["procs"]}
    mem = results["machine"].get("mem_total_bytes")
    lines = [
        f"## Extrapolation to {TARGET_LAYERS} layers (Mistral-7B depth: {factor:g}x the slots of L = {layers})",
        "",
        f"Arithmetic, not a measurement. Bytes and the read floor (timed without imports) scale with the number "
        f"of slots: {factor:g} x. Compress is a fixed start s0 (the fastest run that only imports torch and the package: "
        + ", ".join(f"{p} proc{'s' if p > 1 else ''} {s0:.2f} s" for p, s0 in fixed.items())
        + f") plus per-slot work that does not change with depth: t32 = s0 + {factor:g} x (t - s0). Peak RSS: if the fit streams slot by slot it stays at "
        f"the measured peak; if it holds every slot at once it grows to import + {factor:g} x (peak - import), "
        f"with import = {_mib(base)} MiB (the import-only process).",
        "",
    ]
    rows = []
    for r in runs:
        fl = r["read_floor"]
        cells = [str(r["n"])]
        size = fl["warm"].get("file_bytes")
        cells.append(
            f"{factor:g} x {_gb(size)} = {_gb(size * factor) if size else '—'}"
            + (" (> RAM: no warm cache)" if size and mem and size * factor > 0.8 * mem else "")
        )
        for kind in ("warm", "cold"):
            t = fl[kind].get("median_s")
            cells.append(f"{factor:g} x {t:.3f} = {t * factor:.2f}" if t else "—")
        for p in results["procs"]:
            t = r["compress"][str(p)].get("median_s")
            s0 = fixed[p]
            if not t:
                cells.append("—")
            elif t <= s0:
                cells.append(f"≈ {t:.2f} (no more than the start-up {s0:.2f})")
            else:
                cells.append(f"{s0:.2f} + {factor:g} x {t - s0:.2f} = {s0 + factor * (t - s0):.1f}")
        peak = r["compress"].get("1", {}).get("peak_rss_bytes")
        if peak and base:
            cells.append(
                f"{_mib(peak)} .. {_mib(base)} + {factor:g} x {_mib(peak - base)} = {_mib(base + factor * (peak - base))}"
            )
        else:
            cells.append("—")
        rows.append(cells)
    headers = ["N", "zoo GB", "read floor warm s", "read floor cold s"]
    headers += [f"compress {p}p s" for p in results["procs"]]
    headers += ["peak RSS 1p MiB (streaming .. all slots)"]
    lines += _table(headers, rows)
    return [*lines, ""]


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    ns = [r["n"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8))

    def series(values: list[float | None]) -> tuple[list[int], list[float]]:
        pairs = [(n, v) for n, v in zip(ns, values, strict=True) if v is not None]
        return [n for n, _ in pairs], [v for _, v in pairs]

    for kind, style in (("warm", "s--"), ("cold", "v:")):
        xs, ys = series([r["read_floor"][kind].get("median_s") for r in runs])
        if xs:
            left.plot(
                xs, ys, style, color="grey" if kind == "warm" else "black", label=f"read floor, {kind} cache"
            )
    for p in results["procs"]:
        label = "compress, 1 process" if p == 1 else f"compress, torchrun {p} processes"
        xs, ys = series([r["compress"][str(p)].get("median_s") for r in runs])
        if xs:
            left.plot(xs, ys, "o-", label=label)
        xs, ys = series([(r["compress"][str(p)].get("peak_rss_bytes") or 0) / 2**20 or None for r in runs])
        if xs:
            right.plot(xs, ys, "o-", label=label + (" (largest process)" if p > 1 else ""))
    base = results["startup"].get("1", {}).get("maxrss_bytes")
    if base:
        right.axhline(base / 2**20, color="grey", linestyle=":", label="import torch + package only")
    start = results["startup"].get("1", {}).get("wall_s")
    if start:
        left.axhline(start, color="grey", linestyle="-.", linewidth=1, label="start: import torch + package")
    left.set_ylabel("seconds (median)")
    left.set_title("Wall time vs N")
    right.set_ylabel("peak RSS (MiB)")
    right.set_title("Peak memory vs N")
    for axis in (left, right):
        axis.set_xscale("log")
        axis.set_xlabel("N adapters")
        axis.set_xticks(ns)
        axis.set_xticklabels([str(n) for n in ns])
        axis.minorticks_off()
        axis.grid(True, which="both", alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    left.set_yscale("log")
    spec = results["spec"]
    fig.suptitle(
        f"compress on a synthetic {spec['layers']}-layer Mistral-7B-shaped zoo "
        f"(q/k/v/o, r={spec['rank']}, bf16), k={results['k']} {results['dtype']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_outputs(results: dict[str, Any], out: Path) -> None:
    add_rss_ratios(results)
    atomic_write_bytes(out / "results.json", json_bytes(results))
    atomic_write_bytes(out / "report.md", markdown(results).encode())
    plot(results, out / "scale.png")


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[16, 64, 256, 1000])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--kv-dim", type=int, default=None, help="k/v out size (default hidden / 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16", "int8"])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per measured run")
    parser.add_argument("--no-cold", action="store_true", help="do not drop the page cache (no cold floor)")
    parser.add_argument("--keep-stores", action="store_true", help="keep OUT/stores/ after hashing")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite report.md and scale.png from results.json"
    )
    args = parser.parse_args(argv)
    out = args.out
    if args.report_only:
        results = json.loads((out / "results.json").read_text())
        write_outputs(results, out)
        print((out / "report.md").read_text())
        return 0
    args.procs = sorted(set(args.procs))
    if min(args.procs) < 1 or args.repeats < 1:
        parser.error("--procs and --repeats must be positive")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(THREADS)
    spec = LlmSynthSpec(layers=args.layers, hidden=args.hidden, kv_dim=args.kv_dim)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("work", "stores", "recipes"):
        shutil.rmtree(out / stale, ignore_errors=True)
    command = (
        "python -m benchmarks." + Path(__file__).stem + " " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    if args.no_cold:
        cold: dict[str, Any] = {"ok": False, "reason": "--no-cold"}
    elif os.access(DROP_CACHES, os.W_OK):
        cold = {"ok": True, "reason": None}
    else:
        cold = {"ok": False, "reason": f"{DROP_CACHES} is not writable"}
    results: dict[str, Any] = {
        "command": command,
        "spec": spec.params(),
        "k": args.k,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "procs": args.procs,
        "threads_per_process": THREADS,
        "cache": str(args.cache),
        "machine": machine_note(),
        "startup": {str(p): startup_baseline(out / "work", p, args.repeats) for p in args.procs},
        "runs": [],
    }
    for p, base in results["startup"].items():
        log(
            f"start-up only, {p} proc: {base.get('wall_s') or float('nan'):.2f} s, "
            f"peak RSS {(base.get('maxrss_bytes') or 0) / 2**20:.0f} MiB"
        )
    started = time.perf_counter()
    for n in sorted(set(args.n)):
        results["runs"].append(measure_n(n, args, spec, out, cold))
        results["cold_available"], results["cold_reason"] = cold["ok"], cold["reason"]
        results["machine"]["loadavg_end"] = list(os.getloadavg())
        results["seconds"] = time.perf_counter() - started
        write_outputs(results, out)  # after every N, so an interrupted run leaves a consistent record
    if not args.keep_stores:
        shutil.rmtree(out / "stores", ignore_errors=True)
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
