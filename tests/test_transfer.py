"""Basis transfer (`subspace.transfer_from`): the math against a dense reference, the leave-one-out choice
of the weight, and the command end to end, bad sources included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import _save_base, make_lora, peft_logits, write_recipe
from transformers import BertConfig, BertForSequenceClassification

from mergekit_subspace import transfer
from mergekit_subspace.basis import fit_slot_basis, task_weights
from mergekit_subspace.cli import main
from mergekit_subspace.lowrank import LowRankDelta
from mergekit_subspace.recipe import SubspaceSettings
from mergekit_subspace.subspace import SubspaceStore

F64 = torch.float64


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=F64))[0]


def _deltas_in(U: torch.Tensor, V: torch.Tensor, count: int, rank: int, seed: int) -> list[LowRankDelta]:
    """Rank-`rank` deltas whose columns lie in span(U) and rows in span(V), of varied scales."""
    generator = torch.Generator().manual_seed(seed)
    return [
        LowRankDelta(
            B=U @ torch.randn(U.shape[1], rank, generator=generator, dtype=F64) * (1 + i),
            A=torch.randn(rank, V.shape[1], generator=generator, dtype=F64) @ V.T,
        )
        for i in range(count)
    ]


def _projector(basis: torch.Tensor) -> torch.Tensor:
    return basis @ basis.T


def test_prior_columns_give_the_regularized_eigenvectors() -> None:
    """U and V are the top eigenvectors of sum w^2 D D^T + a E / k_s U_s U_s^T (dense reference here only)."""
    m, n, k, a = 24, 18, 5, 0.7
    generator = torch.Generator().manual_seed(3)
    deltas = [
        LowRankDelta(
            B=torch.randn(m, 3, generator=generator, dtype=F64),
            A=torch.randn(3, n, generator=generator, dtype=F64),
            scale=2.0,
        )
        for _ in range(3)
    ]
    U_s, V_s = _orthonormal(m, 6, 1), _orthonormal(n, 4, 2)
    settings = SubspaceSettings(k=k, transfer_from="unused", transfer_weight=a)
    basis, weight = transfer.fit_slot(deltas, (U_s, V_s), settings, k, None, 0, None)
    assert weight == a
    weights = task_weights(deltas, True)
    energy = sum(w * w * d.norm_sq() for w, d in zip(weights, deltas, strict=True))
    dense = [w * d.to_dense() for w, d in zip(weights, deltas, strict=True)]
    M_out = sum(D @ D.T for D in dense) + a * energy / 6 * _projector(U_s)
    M_in = sum(D.T @ D for D in dense) + a * energy / 4 * _projector(V_s)
    ref_out = torch.linalg.eigh(M_out)[1][:, -k:]
    ref_in = torch.linalg.eigh(M_in)[1][:, -k:]
    assert torch.allclose(_projector(basis.U), _projector(ref_out), atol=1e-9)
    assert torch.allclose(_projector(basis.V), _projector(ref_in), atol=1e-9)


def test_weight_zero_is_the_plain_fit_and_a_large_weight_the_source() -> None:
    m, n, k = 20, 16, 4
    deltas = _deltas_in(_orthonormal(m, 8, 4), _orthonormal(n, 8, 5), count=3, rank=2, seed=6)
    U_s, V_s = _orthonormal(m, k, 7), _orthonormal(n, k, 8)
    plain = fit_slot_basis(deltas, k=k)
    zero = SubspaceSettings(k=k, transfer_from="unused", transfer_weight=0)
    basis, _ = transfer.fit_slot(deltas, (U_s, V_s), zero, k, None, 0, None)
    assert torch.equal(basis.U, plain.U) and torch.equal(basis.V, plain.V)
    heavy = SubspaceSettings(k=k, transfer_from="unused", transfer_weight=1e8)
    basis, _ = transfer.fit_slot(deltas, (U_s, V_s), heavy, k, None, 0, None)
    assert torch.allclose(_projector(basis.U), _projector(U_s), atol=1e-6)
    assert torch.allclose(_projector(basis.V), _projector(V_s), atol=1e-6)


def test_auto_weight_follows_held_out_energy() -> None:
    """Tasks drawn from the source's span: the prior wins clearly. An unrelated prior: a small weight at most,
    and the heaviest weight loses to none at all."""
    m, n, k = 40, 30, 6
    U_s, V_s = _orthonormal(m, k, 10), _orthonormal(n, k, 11)
    deltas = _deltas_in(U_s, V_s, count=3, rank=2, seed=12)
    weight, shares = transfer.choose_weight(deltas, (U_s, V_s), k, k, True)
    assert weight > 0 and shares[weight] > shares[0.0] + 0.2
    assert shares[weight] == pytest.approx(1.0)  # the source's span holds every held-out task
    unrelated = (_orthonormal(m, k, 13), _orthonormal(n, k, 14))
    weight, shares = transfer.choose_weight(deltas, unrelated, k, k, True)
    assert weight <= 0.3
    assert shares[max(transfer.GRID)] < shares[0.0]
    assert transfer.choose_weight(deltas[:1], unrelated, k, k, True) == (transfer.DEFAULT_WEIGHT, {})


def test_settings_refuse_what_transfer_cannot_do() -> None:
    assert SubspaceSettings(k=4, transfer_from="s").transfer_weight == "auto"
    for bad in (
        dict(k=4, transfer_weight=1.0),
        dict(k=4, transfer_from="s", transfer_weight=-0.1),
        dict(k=4, transfer_from="s", transfer_weight="often"),
        dict(k=4, transfer_from="s", transfer_weight=True),
        dict(energy=0.9, transfer_from="s"),
        dict(k=4, refine=1, transfer_from="s"),
        dict(k=4, solver="randomized", transfer_from="s"),
    ):
        with pytest.raises(ValueError):
            SubspaceSettings(**bad)


def _compress(tmp_path: Path, name: str, base: Path | None, adapters: list[Path], extra: str = ""):
    out = tmp_path / name
    lines = [f"base_model: {base}"] if base is not None else []
    lines += ["adapters:"] + [f"  - {a}" for a in adapters]
    lines += ["subspace:", "  k: 4"] + [f"  {line}" for line in extra.splitlines() if line]
    lines += [f"output: {out}"]
    recipe = write_recipe(tmp_path / f"{name}.yaml", "\n".join(lines) + "\n")
    return CliRunner().invoke(main, ["compress", str(recipe)]), out


@pytest.fixture(scope="module")
def source_store(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store fit on four adapters of the tiny BERT (query and value only), shared by the tests here."""
    folder = tmp_path_factory.mktemp("transfer-source")
    adapters = [make_lora(tiny_bert, folder / "src" / f"s{i}", seed=100 + i) for i in range(4)]
    result, out = _compress(folder, "source", tiny_bert, adapters)
    assert result.exit_code == 0, result.output
    return out


def test_compress_with_transfer_end_to_end(tiny_bert: Path, source_store: Path, tmp_path: Path) -> None:
    """Auto weight per slot, recorded in the manifest and the report line; slots the source lacks (key)
    fit plainly; the store reconstructs to a PEFT folder that loads."""
    zoo = [
        make_lora(tiny_bert, tmp_path / "zoo" / f"t{i}", seed=i, targets=("query", "key", "value"))
        for i in range(3)
    ]
    result, out = _compress(tmp_path, "target", tiny_bert, zoo, f"transfer_from: {source_store}")
    assert result.exit_code == 0, result.output
    assert "transfer from" in result.output and "fit plainly" in result.output
    manifest = SubspaceStore(out).manifest
    assert manifest["settings"]["transfer_from"] == str(source_store)
    assert manifest["settings"]["transfer_weight"] == "auto"
    for module, meta in manifest["slots"].items():
        if ".key" in module:
            assert "transfer_weight" not in meta
        else:
            assert meta["transfer_weight"] in transfer.GRID
    store = SubspaceStore(out)
    info = store.info()
    assert set(info["per_task"]) == {"t0", "t1", "t2"}
    assert {m: s.get("transfer_weight") for m, s in info["slots"].items()} == {
        m: meta.get("transfer_weight") for m, meta in manifest["slots"].items()
    }
    store.reconstruct("t0", tmp_path / "t0-back")
    assert torch.isfinite(peft_logits(tiny_bert, tmp_path / "t0-back")).all()
    plain, plain_out = _compress(tmp_path, "plain", tiny_bert, zoo)
    assert plain.exit_code == 0, plain.output
    assert "transfer_from" not in SubspaceStore(plain_out).manifest["settings"]


def test_fixed_weight_moves_the_basis_toward_the_source(
    tiny_bert: Path, source_store: Path, tmp_path: Path
) -> None:
    zoo = [make_lora(tiny_bert, tmp_path / "zoo" / f"t{i}", seed=i) for i in range(2)]
    source = SubspaceStore(source_store)

    def overlap(store: Path) -> float:
        """Mean squared cosine between the stores' left bases over the slots."""
        values = []
        for module in source.slots:
            U, U_s = SubspaceStore(store).basis(module)[0].double(), source.basis(module)[0].double()
            values.append(float(torch.sum((U.T @ U_s) ** 2)) / U.shape[1])
        return sum(values) / len(values)

    plain, plain_out = _compress(tmp_path, "plain", tiny_bert, zoo)
    pulled, pulled_out = _compress(
        tmp_path, "pulled", tiny_bert, zoo, f"transfer_from: {source_store}\ntransfer_weight: 100"
    )
    assert plain.exit_code == 0 and pulled.exit_code == 0, pulled.output
    assert overlap(pulled_out) > overlap(plain_out) + 0.3
    weights = {m["transfer_weight"] for m in SubspaceStore(pulled_out).manifest["slots"].values()}
    assert weights == {100.0}


def _assert_refused(result, out: Path, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and "Traceback" not in line, line
    for fragment in fragments:
        assert fragment in line, line
    assert not out.exists()


def test_bad_sources_are_refused_in_one_line(
    tiny_bert: Path, tiny_llama: Path, source_store: Path, tmp_path: Path
) -> None:
    zoo = [make_lora(tiny_bert, tmp_path / "zoo" / f"t{i}", seed=i) for i in range(2)]
    result, out = _compress(tmp_path, "a", tiny_bert, zoo, f"transfer_from: {tmp_path / 'absent'}")
    _assert_refused(result, out, "transfer_from is not a readable store", "store folder not found")
    (tmp_path / "not-a-store").mkdir()
    result, out = _compress(tmp_path, "b", tiny_bert, zoo, f"transfer_from: {tmp_path / 'not-a-store'}")
    _assert_refused(result, out, "transfer_from is not a readable store")
    result, out = _compress(
        tmp_path, "c", tiny_bert, zoo, f"transfer_from: {source_store}\ntransfer_weight: -1"
    )
    _assert_refused(result, out, "transfer_weight")
    result, out = _compress(tmp_path, "d", tiny_bert, zoo, "transfer_weight: 0.5")
    _assert_refused(result, out, "transfer_weight goes with subspace.transfer_from")

    llama = [
        make_lora(tiny_llama, tmp_path / "llama" / f"l{i}", seed=i, targets=("q_proj",)) for i in range(2)
    ]
    made, llama_store = _compress(tmp_path, "llama-store", tiny_llama, llama)
    assert made.exit_code == 0, made.output
    result, out = _compress(tmp_path, "e", tiny_bert, zoo, f"transfer_from: {llama_store}")
    _assert_refused(result, out, "another base model")
    result, out = _compress(tmp_path, "f", None, zoo, f"transfer_from: {llama_store}")
    _assert_refused(result, out, "holds none of this zoo's slots")


def test_slot_shapes_must_match(tiny_bert: Path, tmp_path: Path) -> None:
    """Same module names, another width: refused, naming the slot (no base recorded on either side)."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=120, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24
    )
    narrow = _save_base(BertForSequenceClassification(config), tmp_path / "narrow-bert")
    other = [make_lora(narrow, tmp_path / "other" / f"o{i}", seed=i) for i in range(2)]
    made, other_store = _compress(tmp_path, "other-store", None, other)
    assert made.exit_code == 0, made.output
    zoo = [make_lora(tiny_bert, tmp_path / "zoo" / f"t{i}", seed=i) for i in range(2)]
    result, out = _compress(tmp_path, "g", None, zoo, f"transfer_from: {other_store}")
    _assert_refused(result, out, "slot 'bert.encoder.layer.0.attention.self.query'", "(16, 16)", "(32, 32)")
    assert json.loads((other_store / "manifest.json").read_text())["settings"].get("transfer_from") is None
