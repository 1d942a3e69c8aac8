"""`analyze`: planted structure is found beyond the nulls and random zoos are not; shared-init pairs; the
on/off-principal shares on a constructed case; the command's files and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergekit_subspace.analyze import (
    AnalyzeOptions,
    Zoo,
    analyze_zoo,
    principal_shares,
    top_singular,
)
from mergekit_subspace.cli import main
from mergekit_subspace.lowrank import LowRankDelta
from mergekit_subspace.recipe import SubspaceSettings
from mergekit_subspace.sources import delta_task
from tests.conftest import make_lora, write_recipe

FAST = AnalyzeOptions(k=24, seeds=2, progress=False)


def _zoo(
    planted: bool, n: int = 8, shape: tuple[int, int] = (48, 40), rank: int = 4, n_slots: int = 2
) -> Zoo:
    """n tasks on n_slots slots; planted: every B in one shared 4-dim column space, every A in one row space."""
    g = torch.Generator().manual_seed(0)
    m, dim = shape
    left = torch.linalg.qr(torch.randn(m, 4, generator=g, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(dim, 4, generator=g, dtype=torch.float64))[0]
    tasks = []
    for i in range(n):
        slots = {}
        for module in [f"layer.{j}.q" for j in range(n_slots)]:
            if planted:
                B = left @ torch.randn(4, rank, generator=g, dtype=torch.float64)
                A = torch.randn(rank, 4, generator=g, dtype=torch.float64) @ right.T
                B = B + 0.01 * torch.randn(m, rank, generator=g, dtype=torch.float64)
            else:
                B = torch.randn(m, rank, generator=g, dtype=torch.float64)
                A = torch.randn(rank, dim, generator=g, dtype=torch.float64)
            slots[module] = LowRankDelta(B=B, A=A, scale=float(i + 1))  # norms differ; the fit normalizes
        tasks.append(delta_task(f"t{i}", slots))
    return Zoo("recipe", "memory", tasks, SubspaceSettings())


def test_planted_structure_is_beyond_the_null_and_random_is_not() -> None:
    planted = analyze_zoo(_zoo(True), options=FAST)
    noise = analyze_zoo(_zoo(False, n_slots=1), options=FAST)
    for module, record in planted["slots"].items():
        assert record["capture"][3] > 0.99  # 4 shared directions hold it all
        for kind in ("spectrum", "gaussian"):
            assert record["null"][kind]["beyond_null"], (module, kind)
            assert (
                record["null"][kind]["levels"]["0.8"]["null_mean"]
                > 2 * record["null"][kind]["levels"]["0.8"]["zoo"]
            )
        assert record["stats_out"]["effective_rank"] < 6
    for record in noise["slots"].values():
        assert not record["null"]["spectrum"]["beyond_null"]
        assert not record["null"]["gaussian"]["beyond_null"]
        assert record["stats_out"]["effective_rank"] > 20  # 32 random directions in 48 dims
    assert planted["zoo"]["nulls"]["spectrum"]["slots_beyond_null"] == 2
    assert noise["zoo"]["nulls"]["gaussian"]["slots_beyond_null"] == 0


def test_leverage_names_the_task_that_owns_a_direction() -> None:
    zoo = _zoo(False)
    g = torch.Generator().manual_seed(5)
    spike = torch.zeros(48, 1, dtype=torch.float64)
    spike[7] = 1.0
    # t3's update is one strong direction plus weak noise: it owns the slot's first direction
    B = torch.cat([spike * 10, 0.01 * torch.randn(48, 3, generator=g, dtype=torch.float64)], 1)
    zoo.tasks[3] = delta_task(
        "t3",
        {
            m: LowRankDelta(B=B, A=torch.randn(4, 40, generator=g, dtype=torch.float64))
            for m in ("layer.0.q", "layer.1.q")
        },
    )
    result = analyze_zoo(zoo, options=FAST)
    for record in result["slots"].values():
        first = record["leverage_out"]["directions"][0]
        assert first["owners"][0][0] == "t3" and first["owners"][0][1] > 0.5
        shares = record["leverage_out"]["task_share"]
        assert abs(sum(shares.values()) - 1.0) < 1e-9
    assert result["zoo"]["leverage"]["owns_first_direction"]["t3"] == 2


def test_principal_shares_sum_to_one_and_match_a_constructed_case() -> None:
    m, n, k = 6, 5, 2
    eye_m, eye_n = torch.eye(m, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
    U, V = eye_m[:, :k], eye_n[:, :k]  # the base's top-2 directions are the first coordinates
    # D = 3 e1 e1^T (on/on) + 2 e5 e4^T (off/off) + 1 e2 e5^T (on/off): energies 9, 4, 1
    B = torch.stack([3 * eye_m[0], 2 * eye_m[4], eye_m[1]], 1)
    A = torch.stack([eye_n[0], eye_n[3], eye_n[4]])
    shares = principal_shares(U, V, LowRankDelta(B=B, A=A))
    assert shares["on_on"] == pytest.approx(9 / 14)
    assert shares["off_off"] == pytest.approx(4 / 14)
    assert shares["on_off"] == pytest.approx(1 / 14)
    assert shares["off_on"] == pytest.approx(0.0, abs=1e-12)
    # a random case: the four blocks sum to 1 and agree with the dense projections
    g = torch.Generator().manual_seed(1)
    delta = LowRankDelta(
        B=torch.randn(m, 3, generator=g, dtype=torch.float64),
        A=torch.randn(3, n, generator=g, dtype=torch.float64),
        scale=0.5,
    )
    got = principal_shares(U, V, delta)
    D = delta.to_dense()
    P, Q = U @ U.T, V @ V.T
    total = float(D.square().sum())
    assert got["on_on"] + got["on_off"] + got["off_on"] + got["off_off"] == pytest.approx(1.0)
    assert got["left_on"] == pytest.approx(float((P @ D).square().sum()) / total)
    assert got["off_on"] == pytest.approx(float(((eye_m - P) @ D @ Q).square().sum()) / total)


def test_krylov_top_subspace_matches_the_dense_svd() -> None:
    g = torch.Generator().manual_seed(2)
    m, n, k = 70, 60, 5
    left = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    W = left @ torch.diag(0.7 ** torch.arange(n, dtype=torch.float64)) @ right.T
    delta = LowRankDelta(
        B=0.05 * torch.randn(m, 2, generator=g, dtype=torch.float64),
        A=torch.randn(2, n, generator=g, dtype=torch.float64),
    )
    U0, S0, V0, method0 = top_singular(W, delta, k, dense_limit=m * n)
    U1, S1, V1, method1 = top_singular(W, delta, k, dense_limit=0, start=V0)
    assert (method0, method1) == ("dense", "block-krylov")
    assert torch.allclose(S0, S1, rtol=1e-8)
    assert torch.allclose(torch.linalg.svdvals(U0.T @ U1), torch.ones(k, dtype=torch.float64), atol=1e-8)


@pytest.fixture
def bert_pair_zoo(tiny_bert: Path, tmp_path: Path) -> Path:
    """Four real PEFT adapters on the tiny BERT; task1's lora_A is task0's (a shared initialization)."""
    folders = [make_lora(tiny_bert, tmp_path / "zoo" / f"task{i}", seed=i) for i in range(4)]
    first = load_file(folders[0] / "adapter_model.safetensors")
    second = load_file(folders[1] / "adapter_model.safetensors")
    for key in second:
        if "lora_A" in key:
            second[key] = first[key].clone()
    save_file(second, str(folders[1] / "adapter_model.safetensors"))
    entries = "\n".join(f"  - {f}" for f in folders)
    return write_recipe(tmp_path / "recipe.yaml", f"adapters:\n{entries}\nsubspace:\n  k: 4\n")


def test_command_writes_the_files_and_finds_the_shared_init_pair(
    bert_pair_zoo: Path, tiny_bert: Path, tmp_path: Path
) -> None:
    out = tmp_path / "analysis"
    result = CliRunner().invoke(
        main,
        [
            "analyze",
            str(bert_pair_zoo),
            "--out",
            str(out),
            "--base",
            str(tiny_bert),
            "--k",
            "8",
            "--seeds",
            "1",
            "--base-k",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "analysis.json",
        "leverage.png",
        "principal.png",
        "scree.png",
        "summary.md",
    ]
    data = json.loads((out / "analysis.json").read_text())
    pairs = data["zoo"]["shared_init"]
    assert pairs["fraction_affected"] == 1.0  # every slot: task0 and task1 share lora_A
    assert [p["tasks"] for p in pairs["pairs"]] == [["task0", "task1"]]
    assert pairs["pairs"][0]["mean_overlap"] > 0.999
    base = data["zoo"]["base"]
    assert set(base["per_layer"]) == {"0", "1"}
    for record in data["slots"].values():
        for entry in record["base"]["tasks"].values():
            assert entry["on_on"] + entry["on_off"] + entry["off_on"] + entry["off_off"] == pytest.approx(1.0)
    assert "Shared initialization" in (out / "summary.md").read_text()
    # a store of the same zoo analyses too (its tasks read back from basis + cores)
    store = tmp_path / "store"
    assert CliRunner().invoke(main, ["compress", str(bert_pair_zoo), "--out", str(store)]).exit_code == 0
    again = CliRunner().invoke(
        main, ["analyze", str(store), "--out", str(tmp_path / "from-store"), "--k", "8", "--seeds", "1"]
    )
    assert again.exit_code == 0, again.output
    stored = json.loads((tmp_path / "from-store" / "analysis.json").read_text())
    assert stored["source"]["kind"] == "store" and stored["zoo"]["shared_init"] is None
    assert all(abs(r["capture"][-1] - 1.0) < 1e-4 for r in stored["slots"].values())  # inside the basis


def test_command_refuses_bad_input_with_one_line(bert_pair_zoo: Path, tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    wrong = tmp_path / "wrong-base"
    BertForSequenceClassification(
        BertConfig(
            vocab_size=120, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24
        )
    ).save_pretrained(wrong)
    not_store = tmp_path / "plain"
    not_store.mkdir()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    cases = [
        ([str(tmp_path / "missing.yaml")], "not found"),
        ([str(not_store)], "not a store"),
        ([str(bert_pair_zoo), "--base", str(wrong)], "shapes do not fit"),
        ([str(bert_pair_zoo), "--base", str(tmp_path / "nobase")], "model folder not found"),
    ]
    for args, expected in cases:
        out = tmp_path / "out"
        result = CliRunner().invoke(main, ["analyze", *args, "--out", str(out), "--seeds", "1"])
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output and result.output.count("\n") == 1, result.output
        assert not out.exists()
    result = CliRunner().invoke(main, ["analyze", str(bert_pair_zoo), "--out", str(full)])
    assert result.exit_code == 2 and "not empty" in result.output
    assert sorted(p.name for p in full.iterdir()) == ["keep.txt"]
