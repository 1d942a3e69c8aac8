"""Calibration: byte budgets and targets sized by output error on the base model's own activations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import WORDS, load_base, write_recipe

from mergekit_subspace.calibration import (
    capture_inputs,
    output_shares,
    read_texts,
    store_output_error,
)
from mergekit_subspace.cli import main
from mergekit_subspace.fit import SubspaceBasis
from mergekit_subspace.lowrank import LowRankDelta
from mergekit_subspace.recipe import CalibrationSettings, SubspaceSettings
from mergekit_subspace.sources import lora_task
from mergekit_subspace.subspace import SubspaceStore


def _texts(path: Path, count: int = 24, seed: int = 0) -> Path:
    generator = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(count):
        n = int(torch.randint(3, 11, (1,), generator=generator))
        ids = torch.randint(0, len(WORDS), (n,), generator=generator).tolist()
        lines.append(json.dumps({"text": " ".join(WORDS[i] for i in ids)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_output_shares_equal_the_dense_output_error() -> None:
    generator = torch.Generator().manual_seed(0)
    m, n, rows = 20, 16, 40
    deltas = [
        LowRankDelta(
            B=torch.randn(m, r, generator=generator, dtype=torch.float64),
            A=torch.randn(r, n, generator=generator, dtype=torch.float64),
            scale=s,
        )
        for r, s in ((3, 0.5), (5, 2.0), (2, 1.0))
    ]
    U = torch.linalg.qr(torch.randn(m, 8, generator=generator, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, 6, generator=generator, dtype=torch.float64)).Q
    X = torch.randn(rows, n, generator=generator, dtype=torch.float64)
    X = X @ torch.diag(torch.linspace(0.1, 3, n, dtype=torch.float64))
    Xs = X * (n / float((X**2).sum())) ** 0.5  # scaled to mean squared row norm n, as documented
    sizes = [(1, 1), (4, 3), (8, 6)]
    for normalize in (True, False):
        shares, total = output_shares(deltas, U, V, X, sizes, normalize)
        kept_dense = dict.fromkeys(sizes, 0.0)
        total_dense = 0.0
        for d in deltas:
            D = d.B @ d.A * d.scale
            energy = float(((D @ Xs.T) ** 2).sum())
            w = 1 / float((D**2).sum()) if normalize else 1.0
            total_dense += w * energy
            for a, b in sizes:
                approx = U[:, :a] @ (U[:, :a].T @ D @ V[:, :b]) @ V[:, :b].T
                err = float((((D - approx) @ Xs.T) ** 2).sum())
                kept_dense[(a, b)] += w * (energy - err)
        assert total == pytest.approx(total_dense, rel=1e-9)
        for size in sizes:
            assert shares[size] == pytest.approx(kept_dense[size] / total_dense, rel=1e-7, abs=1e-9)
        assert shares[(8, 6)] > shares[(1, 1)]
    # isotropic inputs give back the weight energy the fit weighs
    iso = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64)).Q * n**0.5
    _, total = output_shares(deltas, U, V, iso, sizes, normalize=False)
    assert total == pytest.approx(sum(float(((d.B @ d.A * d.scale) ** 2).sum()) for d in deltas), rel=1e-9)


def test_capture_keeps_a_bounded_sample_of_real_inputs_shared_by_qkv(tiny_bert: Path, tmp_path: Path) -> None:
    data = _texts(tmp_path / "calib.jsonl")
    modules = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]
    everything = capture_inputs(
        CalibrationSettings(data=str(data), max_rows=4096), tiny_bert, "classify", modules, progress=False
    )
    sampled = capture_inputs(
        CalibrationSettings(data=str(data), max_rows=32), tiny_bert, "classify", modules, progress=False
    )
    # the real inputs: every non-padding token's hidden state entering layer 0's attention
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    texts = read_texts(data)
    model, seen = load_base(tiny_bert), []
    layer = model.bert.encoder.layer[0].attention.self.query
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        for start in range(0, len(texts), 16):
            batch = tokenizer(texts[start : start + 16], return_tensors="pt", padding=True)
            model(**batch)
            mask = batch["attention_mask"].reshape(-1).bool()
            seen[-1] = seen[-1].reshape(-1, seen[-1].shape[-1])[mask]
    handle.remove()
    real = torch.cat(seen).double()
    first = modules[0]
    assert everything[first].shape == real.shape
    assert torch.allclose(everything[first].double().sort(dim=0).values, real.sort(dim=0).values, atol=1e-5)
    assert sampled[first].shape == (32, 32)
    assert sampled[first] is sampled[first.replace("query", "value")]  # one sample for one input tensor
    assert not torch.equal(sampled[first], sampled["bert.encoder.layer.1.attention.self.query"])
    rows = {tuple(r.tolist()) for r in everything[first].round(decimals=4)}
    assert all(tuple(r.tolist()) in rows for r in sampled[first].round(decimals=4))


def test_budget_gives_no_bytes_to_a_slot_whose_inputs_its_deltas_cannot_see(
    tiny_bert: Path, bert_zoo: list[Path]
) -> None:
    tasks = [lora_task(p) for p in bert_zoo[:3]]
    settings = SubspaceSettings(k=8, budget_bytes=6000, dtype="float32")
    plain = SubspaceBasis(settings).fit(tasks)
    blind, seen = "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query"
    generator = torch.Generator().manual_seed(0)
    rows = {m: torch.randn(64, 32, generator=generator) for m in plain.shapes_}
    # inputs orthogonal to every task's lora_A rows in the blind slot: its outputs do not change at all
    A = torch.cat([t.slots[blind].A.double() for t in tasks if blind in t.shapes])
    Q = torch.linalg.qr(A.T, mode="complete").Q[:, A.shape[0] :]
    rows[blind] = (torch.randn(64, Q.shape[1], generator=generator, dtype=torch.float64) @ Q.T).float()
    sized = SubspaceBasis(settings, inputs=rows).fit(tasks)
    assert plain.k_[blind][0] > 1
    assert sized.k_[blind][0] == 1
    assert sized.k_[seen][0] >= plain.k_[seen][0]
    assert sum(k for k, _ in sized.k_.values()) >= sum(k for k, _ in plain.k_.values())


def test_target_with_calibration_meets_the_output_error_and_says_so(
    tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path
) -> None:
    data = _texts(tmp_path / "calib.jsonl", count=80)  # more token rows than max_rows
    adapters = "\n".join(f"  - {p}" for p in bert_zoo)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"adapters:\n{adapters}\nsubspace:\n  target: {{max_rel_error: 0.3}}\n"
        f"  calibration: {{data: {data}, max_rows: 256}}\n",
    )
    result = CliRunner().invoke(main, ["compress", str(recipe), "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    store = SubspaceStore(tmp_path / "s")
    chosen = store.manifest["settings"]["target"]["chosen"]
    assert chosen["sized_by"].startswith("output energy on 256 calibration rows")
    assert store.manifest["settings"]["calibration"]["max_rows"] == 256
    tasks = [lora_task(p) for p in bert_zoo]
    inputs = capture_inputs(
        CalibrationSettings(data=str(data), max_rows=256),
        tiny_bert,
        "classify",
        store.slots,
        progress=False,
    )
    assert store_output_error(store, tasks, inputs) <= 0.3


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("", "no text"),
        ('{"text": "w1"}\n{"label": 3}\n', 'line 2 has no string field "text"'),
        ('{"text": "w1"}\nnot json\n', "line 2 is not JSON"),
    ],
)
def test_bad_calibration_data_is_one_line_and_writes_nothing(
    bert_zoo: list[Path], tmp_path: Path, body: str, message: str
) -> None:
    data = tmp_path / "calib.jsonl"
    data.write_text(body)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"adapters: [{bert_zoo[0]}]\nsubspace:\n  target: {{max_rel_error: 0.5}}\n  calibration: {{data: {data}}}\n",
    )
    result = CliRunner().invoke(main, ["compress", str(recipe), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert message in result.output and str(data) in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_calibration_needs_a_target_or_budget(bert_zoo: list[Path], tmp_path: Path) -> None:
    data = _texts(tmp_path / "calib.jsonl")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"adapters: [{bert_zoo[0]}]\nsubspace:\n  k: 4\n  calibration: {{data: {data}}}\n",
    )
    result = CliRunner().invoke(main, ["compress", str(recipe), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "calibration sizes slots under a target or budget_bytes" in result.output
    missing = write_recipe(
        tmp_path / "m.yaml",
        f"adapters: [{bert_zoo[0]}]\nsubspace:\n  budget_bytes: 4000\n  calibration: {{data: nowhere.jsonl}}\n",
    )
    result = CliRunner().invoke(main, ["compress", str(missing), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "calibration data not found" in result.output
    assert not (tmp_path / "s").exists()
