"""The peers our merge benchmarks compare against, run the same way by each benchmark.

- mergekit 0.1.5 (`merge_state_dicts`) on the full weights of the adapted modules, W_i = W_base + D_i;
- PEFT's `add_weighted_adapter` on the adapters loaded into one model;
- one fresh interpreter per tool (`run_worker`), so import costs and memory are not shared, with each merge's
  peak RSS read from /proc after a reset.

mergekit is not a dependency of this package; a benchmark finds it installed or in MERGEKIT_SITE (a
`pip install --target` folder under benchmarks/cache, git-ignored), see `mergekit_pythonpath`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MERGEKIT_VERSION = "0.1.5"
MERGEKIT_SITE = Path(__file__).resolve().parent / "cache" / f"mergekit-{MERGEKIT_VERSION}"
INSTALL_HINT = (
    f"pip install --no-deps --target {Path('benchmarks/cache') / MERGEKIT_SITE.name} "
    f"mergekit=={MERGEKIT_VERSION} immutables==0.21"
)


def mergekit_pythonpath() -> str | None:
    """The folder to put on PYTHONPATH for mergekit (None: it is installed); raises with the install line."""
    import importlib.util

    if importlib.util.find_spec("mergekit") is not None:
        return None
    if (MERGEKIT_SITE / "mergekit").is_dir():
        return str(MERGEKIT_SITE)
    raise ImportError(
        f"mergekit {MERGEKIT_VERSION} not found; install it beside the repo with: {INSTALL_HINT}"
    )


def status_mb(field: str) -> float:
    """VmHWM / VmRSS of this process from /proc (ru_maxrss would include the parent's peak after fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak() -> bool:
    """Reset VmHWM (Linux >= 4.0), so each merge in one worker gets its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def dense_to_factors(delta, rank_tol: float = 1e-5):
    """Exact (B, A) factors of a dense delta at its numerical rank, so a peer's merge is written as PEFT."""
    import torch

    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = max(1, int((rank_tol * S[0] < S).sum())) if float(S[0]) > 0 else 1
    root = S[:rank].sqrt()
    return (U[:, :rank] * root).float(), (root[:, None] * Vh[:rank]).float()


def mergekit_params(method: str, density: float) -> dict[str, Any]:
    """mergekit's parameters for a method: weight 1, lambda 1 (chosen later on the grid), density for the rest."""
    params: dict[str, Any] = {"weight": 1.0, "lambda": 1.0}
    if method != "task_arithmetic":
        params["density"] = density
    return params


def mergekit_merge(
    adapter_paths: list[str], base_dir: str, method: str, density: float, out: Path | None
) -> dict[str, Any]:
    """mergekit on full weights of the adapted modules; timed to its own output (merged safetensors on disk).

    With `out`, the merged delta is also written (not timed) as an exact PEFT folder there.
    """
    import tempfile

    import torch
    from mergekit.merge_methods.api import merge_state_dicts
    from safetensors.torch import save_file

    from mergekit_subspace.io.checkpoint import Checkpoint
    from mergekit_subspace.io.peft import read_lora_adapter, write_lora_adapter

    start = time.perf_counter()
    adapters = [read_lora_adapter(p) for p in adapter_paths]
    base = Checkpoint(base_dir)
    modules = sorted({m for a in adapters for m in a.slots})
    keys = {m: base.resolve_module(m) for m in modules}
    base_sd = {m: base.tensor(keys[m]).float() for m in modules}
    models: dict[str, dict[str, torch.Tensor]] = {"base": base_sd}
    for i, adapter in enumerate(adapters):
        models[f"t{i}"] = {
            m: base_sd[m] + adapter.slots[m].to_dense().float() if m in adapter.slots else base_sd[m].clone()
            for m in modules
        }
    materialized = time.perf_counter()
    torch.manual_seed(0)
    with torch.no_grad():
        merged = merge_state_dicts(models, method, parameters=mergekit_params(method, density), base="base")
    merged_at = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        save_file({m: merged[m].contiguous() for m in modules}, Path(tmp) / "merged.safetensors")
    written = time.perf_counter()
    if out is not None:
        factors = {m: dense_to_factors(merged[m].double() - base_sd[m].double()) for m in modules}
        write_lora_adapter(out, factors, {}, dict(adapters[0].config, modules_to_save=None))
    return {
        "merge_s": merged_at - materialized,
        "end_to_end_s": written - start,
        "phases": {
            "read_and_materialize": materialized - start,
            "merge": merged_at - materialized,
            "write": written - merged_at,
        },
    }


def peft_merge(
    adapter_paths: list[str], load_model: Callable[[], Any], method: str, density: float, out: Path
) -> dict[str, Any]:
    """PEFT add_weighted_adapter (weights 1, default svd_rank); the merged adapter is saved as `out/merged`."""
    import torch
    from peft import PeftModel

    start = time.perf_counter()
    paths = [Path(p) for p in adapter_paths]
    names = [p.name for p in paths]
    peft_model = PeftModel.from_pretrained(load_model(), str(paths[0]), adapter_name=names[0])
    for name, path in zip(names[1:], paths[1:], strict=True):
        peft_model.load_adapter(str(path), adapter_name=name)
    loaded = time.perf_counter()
    kwargs: dict[str, Any] = {"density": density} if method == "ties_svd" else {}
    with torch.no_grad():
        peft_model.add_weighted_adapter(
            names, [1.0] * len(names), "merged", combination_type=method, **kwargs
        )
    merged_at = time.perf_counter()
    peft_model.save_pretrained(out, selected_adapters=["merged"])
    end = time.perf_counter()
    return {
        "merge_s": merged_at - loaded,
        "end_to_end_s": end - start,
        "phases": {"load": loaded - start, "merge": merged_at - loaded, "save": end - merged_at},
    }


def worker_loop(job: dict[str, Any], workers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> None:
    """Run one family's merges in this process, recording each merge's time and peak RSS."""
    baseline = status_mb("VmRSS")
    results = []
    for part in job["runs"]:
        before = status_mb("VmRSS")
        reset = reset_peak()
        result = workers[job["family"]](job | part)
        results.append(
            result
            | {
                "method": part["method"],
                "size": part["size"],
                "peak_rss_mb": status_mb("VmHWM"),
                "rss_before_mb": before,
                "baseline_rss_mb": baseline,
                "peak_reset": reset,
            }
            | ({"subset": part["subset"]} if "subset" in part else {})
        )
    Path(job["result"]).write_text(json.dumps(results))


def run_worker(job: dict[str, Any], work: Path, module: str) -> list[dict[str, Any]]:
    """Run `module.worker_main(job)` in a fresh interpreter (mergekit on its path where needed)."""
    job_file = work / f"job-{job['family']}.json"
    job["result"] = str(job_file.with_suffix(".result.json"))
    job_file.write_text(json.dumps(job))
    imports = "import torch, transformers, peft, mergekit_subspace.merge"
    env = dict(os.environ)
    if job["family"] == "mergekit":
        imports += ", mergekit.merge_methods.api"
        extra = mergekit_pythonpath()
        if extra is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, env.get("PYTHONPATH")) if p)
    code = f"{imports}; from {module} import worker_main; worker_main({str(job_file)!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path.cwd(), env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {job['family']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(Path(job["result"]).read_text())


def mergekit_version() -> str:
    """The mergekit version the workers run (from its installed metadata or the MERGEKIT_SITE folder)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mergekit")
    except PackageNotFoundError:
        extra = mergekit_pythonpath()
        return distribution_version(extra) if extra else "unknown"


def distribution_version(site: str) -> str:
    from importlib.metadata import distributions

    for dist in distributions(path=[site]):
        if dist.metadata["Name"] == "mergekit":
            return dist.version
    return "unknown"
