"""torchrun: 2 gloo processes on loopback give the same store bytes as one; bad input stops every rank."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo on loopback is tested on Linux")


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env.pop("WORLD_SIZE", None)
    return env


def run(args: list[str], procs: int, cwd: Path) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "mergekit_subspace"]
    if procs > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={procs}",
        ]
        launcher += ["-m", "mergekit_subspace"]
    return subprocess.run(
        launcher + args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300, check=False
    )


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_processes_write_the_same_bytes_and_stop_together(
    tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path
) -> None:
    recipe = tmp_path / "recipe.yaml"
    zoo = [str(p) for p in bert_zoo[:4]]
    recipe.write_text(
        f"base_model: {tiny_bert}\nadapters: {zoo}\n"
        "subspace: {k: 8, budget_bytes: 3000, solver: randomized, dtype: int8}\n"
    )
    one = run(["compress", str(recipe), "--out", "one"], 1, tmp_path)
    assert one.returncode == 0, one.stderr
    two = run(["compress", str(recipe), "--out", "two"], 2, tmp_path)
    assert two.returncode == 0, two.stderr
    assert files(tmp_path / "one") == files(tmp_path / "two")
    assert two.stdout.count("task") == one.stdout.count("task")  # only rank 0 prints

    # add under torchrun: the slots of the new adapter are shared out, rank 0 writes
    shutil.copytree(tmp_path / "one", tmp_path / "one-add")
    assert run(["add", "one", str(bert_zoo[4])], 1, tmp_path).returncode == 0
    added = run(["add", "one-add", str(bert_zoo[4])], 2, tmp_path)
    assert added.returncode == 0, added.stderr
    assert files(tmp_path / "one") == files(tmp_path / "one-add")
    assert added.stdout.count("added 'task4'") == 1
    assert "grew the basis" in added.stdout  # the int8 basis grew, identically with 1 and 2 processes

    # merge from adapters: the basis is fit across the ranks, rank 0 merges and writes
    merge = tmp_path / "merge.yaml"
    merge.write_text(
        f"merge_method: ties\nadapters: {zoo[:3]}\nbase_model: {tiny_bert}\n"
        "subspace: {k: 4, solver: randomized}\nparameters: {density: 0.5}\n"
        "output: {format: peft, heads: none}\n"
    )
    assert run(["merge", str(merge), "--quiet", "--out", "m1"], 1, tmp_path).returncode == 0
    merged = run(["merge", str(merge), "--quiet", "--out", "m2"], 2, tmp_path)
    assert merged.returncode == 0, merged.stderr
    assert merged.stdout.count("merged 3 task(s)") == 1
    weights = "adapter_model.safetensors"
    assert (tmp_path / "m1" / weights).read_bytes() == (tmp_path / "m2" / weights).read_bytes()

    # a NaN in one slot of one adapter: whichever rank reads it, every rank stops with the same line
    bad = tmp_path / "bad-zoo"
    shutil.copytree(bert_zoo[3], bad / "task3")
    weights_file = bad / "task3" / "adapter_model.safetensors"
    weights = load_file(weights_file)
    key = next(k for k in sorted(weights) if "layer.1" in k and "lora_B" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, weights_file, metadata={"format": "pt"})
    recipe.write_text(
        f"base_model: {tiny_bert}\nadapters: {zoo[:3] + [str(bad / 'task3')]}\n"
        "subspace: {k: 3, solver: randomized}\n"
    )
    failed = run(["compress", str(recipe), "--out", "never"], 2, tmp_path)
    assert failed.returncode != 0
    lines = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and lines[0] == lines[1], failed.stderr
    assert str(weights_file) in lines[0] and "NaN or Inf" in lines[0]
    assert not (tmp_path / "never").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]
