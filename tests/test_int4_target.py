"""int4 stores (packed nibbles, group scales) and recipes that state a target (ratio, bytes, max error)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import write_recipe
from safetensors.torch import load_file, save_file
from test_store import compress_zoo, dense_deltas

from mergekit_subspace.cli import main
from mergekit_subspace.io.codec import (
    INT4_GROUP,
    ITEM_BYTES,
    assemble_cores,
    decode,
    encode,
    encode_core,
    pack_nibbles,
    unpack_cores,
    unpack_nibbles,
)
from mergekit_subspace.io.files import sha256_file
from mergekit_subspace.io.store import MANIFEST, manifest_digest
from mergekit_subspace.subspace import SubspaceStore


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_int4_round_trip_error_is_bounded_and_above_int8() -> None:
    x = torch.randn(48, 37, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (q4, s4), (q8, s8) = encode(x, "int4"), encode(x, "int8")
    e4, e8 = _rel(decode(q4, s4), x), _rel(decode(q8, s8), x)
    assert e8 < 0.01 < e4 < 0.15  # Gaussian, groups of 64: about 10%; int8 with one scale: about 0.5%
    assert s4.numel() == -(-48 * 37 // INT4_GROUP)
    err = (decode(q4, s4).double() - x).abs().reshape(-1)
    scale = torch.repeat_interleave(s4.double(), INT4_GROUP)[: x.numel()]
    inside = x.abs().reshape(-1) <= 7 * scale  # what the group's scale covers: within half a level
    assert bool((err[inside] <= scale[inside] / 2 + 1e-7).all())
    # the scales are chosen by squared error: never worse than absmax / 7, better on Gaussian groups
    groups = torch.nn.functional.pad(x.reshape(-1), (0, s4.numel() * INT4_GROUP - x.numel())).reshape(
        -1, INT4_GROUP
    )
    absmax = (groups.abs().amax(dim=1) / 7).float().double()[:, None]
    absmax_err = ((torch.round(groups / absmax).clamp(-7, 7) * absmax - groups) ** 2).sum(dim=1)
    chosen_err = (err**2).sum()
    assert float(chosen_err) < 0.95 * float(absmax_err.sum())
    assert not bool(inside.all())  # some groups clip their largest value
    assert float(torch.tensor(s8, dtype=torch.float64)) <= float(x.abs().max()) / 127 + 1e-12
    assert torch.equal(unpack_nibbles(pack_nibbles(q4), q4.numel()).reshape(q4.shape), q4)
    assert pack_nibbles(q4).numel() == -(-48 * 37 // 2)
    zero, scale = encode(torch.zeros(3, 5), "int4")
    assert bool((decode(zero, scale) == 0).all())


def test_int4_cores_pack_and_refuse_wrong_lengths() -> None:
    generator = torch.Generator().manual_seed(1)
    cores = [
        encode_core("a", torch.randn(5, 7, generator=generator, dtype=torch.float64), 8, "int4"),
        encode_core("b", torch.randn(3, 3, generator=generator, dtype=torch.float64), 8, "int4"),
    ]
    packed = assemble_cores([c for c, _ in cores], "int4")
    assert packed.flat.dtype == torch.uint8 and packed.flat.numel() == -(-(35 + 9) // 2)
    out = unpack_cores(packed)
    torch.testing.assert_close(out["a"][0].double(), cores[0][1], atol=1e-6, rtol=1e-6)
    short = type(packed)(packed.flat[:-1], packed.scales, packed.layouts, "int4")
    with pytest.raises(ValueError, match="bytes"):
        unpack_cores(short)
    assert packed.scales is not None
    fewer = type(packed)(packed.flat, packed.scales[:-1], packed.layouts, "int4")
    with pytest.raises(ValueError, match="scales"):
        unpack_cores(fewer)


def test_int4_store_round_trips_through_peft(tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path) -> None:
    from conftest import ids_for, load_base, peft_logits

    from mergekit_subspace.serve import attach

    int4 = SubspaceStore(compress_zoo(tmp_path / "i4", tiny_bert, bert_zoo, "k: 64\n  dtype: int4"))
    assert int4.verify() == []
    ids = ids_for(tiny_bert)
    for i, source in enumerate(bert_zoo):
        reported = int4.info()["per_task"][f"task{i}"]["rel_error"]
        assert 0.01 < reported < 0.3  # k covers every rank: int4 noise only
        out = int4.reconstruct(f"task{i}", tmp_path / f"t{i}")  # a real PEFT folder
        assert (
            abs(
                _rel(
                    torch.cat([v.reshape(-1) for v in dense_deltas(out).values()]),
                    torch.cat([v.reshape(-1) for v in dense_deltas(source).values()]),
                )
                - reported
            )
            < 1e-3
        )
        with torch.no_grad():  # serving reads the same int4 store: the same logits as the PEFT folder
            served = attach(load_base(tiny_bert), int4).forward([f"task{i}"], input_ids=ids).logits
        torch.testing.assert_close(served[0], peft_logits(tiny_bert, out)[0], atol=1e-4, rtol=1e-4)
    tensors = load_file(str(int4.path / "tasks" / "task0.safetensors"))
    assert tensors["cores"].dtype == torch.uint8 and tensors["core_scales"].dtype == torch.float32
    assert int4.stored_numbers() * ITEM_BYTES["int4"] < int4.info()["bytes"]["store"]


def test_int8_cores_beside_int4_bases(tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path) -> None:
    """`core_dtype: int8` keeps the cores finer than the int4 bases: less error at a few more bytes, the
    same PEFT folders and served logits; an add encodes its cores the same way, and a task file whose
    cores are in another dtype is refused."""
    from conftest import ids_for, load_base, peft_logits

    from mergekit_subspace.serve import attach

    both4 = SubspaceStore(compress_zoo(tmp_path / "i4", tiny_bert, bert_zoo[:3], "k: 64\n  dtype: int4"))
    finer = SubspaceStore(
        compress_zoo(tmp_path / "i48", tiny_bert, bert_zoo[:3], "k: 64\n  dtype: int4\n  core_dtype: int8")
    )
    assert finer.verify() == []
    assert finer.manifest["settings"]["core_dtype"] == "int8"
    tensors = load_file(str(finer.path / "tasks" / "task0.safetensors"))
    assert tensors["cores"].dtype == torch.int8  # int8 levels with one scale per matrix, not packed nibbles
    basis = load_file(str(finer.path / "basis.safetensors"))
    assert {t.dtype for k, t in basis.items() if not k.endswith(".scale")} == {torch.uint8}  # int4 bases
    for i in range(3):
        error = finer.info()["per_task"][f"task{i}"]["rel_error"]
        assert error < 0.9 * both4.info()["per_task"][f"task{i}"]["rel_error"]
    assert finer.stored_numbers() == both4.stored_numbers()
    basis_numbers = sum(U.numel() + V.numel() for U, V in (finer.basis(m) for m in finer.slots))
    core_numbers = finer.stored_numbers() - basis_numbers
    assert finer.payload_bytes() == pytest.approx(basis_numbers * ITEM_BYTES["int4"] + core_numbers, abs=1)
    assert finer.payload_bytes() > both4.payload_bytes()
    out = finer.reconstruct("task0", tmp_path / "t0")
    with torch.no_grad():
        served = attach(load_base(tiny_bert), finer).forward(["task0"], input_ids=ids_for(tiny_bert)).logits
    torch.testing.assert_close(served[0], peft_logits(tiny_bert, out)[0], atol=1e-4, rtol=1e-4)
    add = ["add", str(finer.path), str(bert_zoo[3]), "--policy", "project", "--max-rel-error", "1"]
    result = CliRunner().invoke(main, add)
    assert result.exit_code == 0, result.output
    entry = SubspaceStore(finer.path).manifest["tasks"]["task3"]
    assert load_file(str(finer.path / entry["file"]))["cores"].dtype == torch.int8
    _rewrite(
        finer.path, "tasks/task0.safetensors", lambda t: t.update(cores=pack_nibbles(t["cores"].clamp(-7, 7)))
    )
    result = CliRunner().invoke(main, ["reconstruct", str(finer.path), "task0", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "not a flat int8 tensor" in result.output, result.output
    assert not (tmp_path / "o").exists()


def _rewrite(store: Path, rel: str, change) -> None:
    """Damage one file of a store, then re-hash it (so only the format checks can tell)."""
    tensors = load_file(str(store / rel))
    change(tensors)
    save_file(tensors, str(store / rel))
    raw = json.loads((store / MANIFEST).read_text())
    raw["files"][rel] = sha256_file(store / rel)
    raw.pop("manifest_sha256")
    raw["manifest_sha256"] = manifest_digest(raw)
    (store / MANIFEST).write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("rel", "change", "message"),
    [
        ("tasks/task0.safetensors", lambda t: t.update(cores=t["cores"][:-1].clone()), "does not match"),
        ("tasks/task0.safetensors", lambda t: t.pop("core_scales"), "core_scales"),
        ("basis.safetensors", lambda t: t.pop(sorted(k for k in t if k.endswith(".scale"))[0]), "scales"),
    ],
)
def test_damaged_int4_files_are_refused(
    tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path, rel: str, change, message: str
) -> None:
    path = compress_zoo(tmp_path, tiny_bert, bert_zoo[:2], "k: 4\n  dtype: int4")
    _rewrite(path, rel, change)
    result = CliRunner().invoke(main, ["reconstruct", str(path), "task0", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def _target_store(tmp_path: Path, base: Path, zoo: list[Path], target: str) -> tuple[SubspaceStore, str]:
    listed = "\n".join(f"  - {p}" for p in zoo)
    tmp_path.mkdir(parents=True)
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        f"base_model: {base}\nadapters:\n{listed}\nsubspace:\n  target: {target}\noutput: {tmp_path / 's'}\n",
    )
    result = CliRunner().invoke(main, ["compress", str(recipe)])
    assert result.exit_code == 0, result.output
    return SubspaceStore(tmp_path / "s"), result.output


def _mean_error(store: SubspaceStore) -> float:
    return sum(e["rel_error"] for e in store.manifest["tasks"].values()) / len(store.tasks)


def test_each_target_kind_meets_its_target(tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path) -> None:
    store, output = _target_store(tmp_path / "r", tiny_bert, bert_zoo, "{ratio: 2}")
    info = store.info()
    sources = info["bytes"]["sources"]
    assert info["ratio"] >= 2
    chosen = store.manifest["settings"]["target"]["chosen"]
    assert store.manifest["settings"]["dtype"] == chosen["dtype"] in ("float16", "int8", "int4")
    # the cores are kept as fine as the bases or finer; the manifest names them only where they differ
    assert (store.manifest["settings"]["core_dtype"] or chosen["dtype"]) == chosen["core_dtype"]
    assert set(chosen["candidates"]) == {
        "float16",
        "int8",
        "int8/float16",
        "int4",
        "int4/int8",
        "int4/float16",
    }
    assert chosen["predicted_rel_error"] == min(
        c["predicted_rel_error"] for c in chosen["candidates"].values()
    )
    assert "target ratio 2: chose" in output
    budget = sources // 2
    store, _ = _target_store(tmp_path / "b", tiny_bert, bert_zoo, f"{{bytes: {budget}}}")
    assert store.files.bytes_on_disk() <= budget
    store, output = _target_store(tmp_path / "e", tiny_bert, bert_zoo, "{max_rel_error: 0.3}")
    assert _mean_error(store) <= 0.3
    assert "max_rel_error 0.3" in output
    looser, _ = _target_store(tmp_path / "e2", tiny_bert, bert_zoo, "{max_rel_error: 0.6}")
    assert looser.files.bytes_on_disk() <= store.files.bytes_on_disk()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("{ratio: 1}", "greater than 1"),
        ("{max_rel_error: 0}", "greater than 0"),
        ("{bytes: 1000}", "cannot be met"),
        ("{ratio: 100000}", "cannot be met"),
        ("{ratio: 2, bytes: 10}", "exactly one"),
        ("{ratio: 2}\n  k: 4", "not both"),
        ("{max_rel_error: 0.001}\n  dtype: int4", "cannot be met"),  # int4 noise alone is above it
    ],
)
def test_unreachable_targets_are_refused_before_writing(
    tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path, target: str, message: str
) -> None:
    listed = "\n".join(f"  - {p}" for p in bert_zoo[:2])
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        f"base_model: {tiny_bert}\nadapters:\n{listed}\nsubspace:\n  target: {target}\n"
        f"output: {tmp_path / 's'}\n",
    )
    result = CliRunner().invoke(main, ["compress", str(recipe)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "recipe.yaml" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_default_settings_record_has_no_target() -> None:
    from mergekit_subspace.recipe import SubspaceSettings, settings_record

    assert "target" not in settings_record(SubspaceSettings(dtype="int4"))
