"""Store format 2: factored cores, int8 with scales, heads in the store dtype, the compact manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ids_for, load_base, make_lora, peft_logits
from test_store import compress_zoo, dense_deltas

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.io.codec import assemble_cores, encode_core, split_core, unpack_cores
from mergekit_subspace.io.store import MANIFEST, compact_manifest, expand_manifest
from mergekit_subspace.serve import attach
from mergekit_subspace.subspace import SubspaceStore


def _rel_error(original: dict[str, torch.Tensor], rebuilt: dict[str, torch.Tensor]) -> float:
    num = sum(float(((original[m] - rebuilt[m]) ** 2).sum()) for m in original)
    den = sum(float((original[m] ** 2).sum()) for m in original)
    return (num / den) ** 0.5


def test_low_rank_cores_are_stored_as_factors_without_loss() -> None:
    generator = torch.Generator().manual_seed(0)
    low = torch.randn(32, 3, generator=generator, dtype=torch.float64) @ torch.randn(
        3, 32, generator=generator, dtype=torch.float64
    )
    full = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    assert split_core(full, rank=4) is None  # 4 * 8 numbers as factors is not smaller than 16 dense
    (core_b, readback_b), (core_a, _) = (
        encode_core("b", full, 4, "float32"),
        encode_core("a", low, 3, "float32"),
    )
    packed = assemble_cores([core_b, core_a], "float32")  # slot order is restored by module name
    assert [layout.rho for layout in packed.layouts] == [3, 0]
    assert packed.flat.numel() == 3 * 64 + 16  # instead of 32 * 32 + 16
    matrices = unpack_cores(packed)
    torch.testing.assert_close((matrices["a"][0] @ matrices["a"][1]).double(), low, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(readback_b, full, atol=1e-6, rtol=1e-6)


def test_factored_store_is_exact_through_peft(tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path) -> None:
    store = SubspaceStore(compress_zoo(tmp_path, tiny_bert, bert_zoo, "k: 64"))
    rhos = [s["rho"] for entry in store.manifest["tasks"].values() for s in entry["slots"].values()]
    assert any(rho > 0 for rho in rhos)  # k exceeds most ranks, so those cores are kept as factors
    for i, source in enumerate(bert_zoo):
        out = store.reconstruct(f"task{i}", tmp_path / f"rebuilt{i}")
        torch.testing.assert_close(
            peft_logits(tiny_bert, out), peft_logits(tiny_bert, source), atol=1e-4, rtol=1e-4
        )


def test_int8_store_reports_the_error_of_what_it_wrote(
    tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path
) -> None:
    fp32 = SubspaceStore(compress_zoo(tmp_path / "f32", tiny_bert, bert_zoo, "k: 64"))
    int8 = SubspaceStore(compress_zoo(tmp_path / "i8", tiny_bert, bert_zoo, "k: 64\n  dtype: int8"))
    assert int8.info()["bytes"]["store"] < 0.5 * fp32.info()["bytes"]["store"]
    for i, source in enumerate(bert_zoo):
        reported = int8.info()["per_task"][f"task{i}"]["rel_error"]
        assert 0 < reported < 0.05  # quantization noise only: k covers every rank
        out = int8.reconstruct(f"task{i}", tmp_path / f"t{i}")
        assert abs(_rel_error(dense_deltas(source), dense_deltas(out)) - reported) < 1e-4
    basis_file = json.loads((int8.path / MANIFEST).read_text())
    assert basis_file["settings"]["dtype"] == "int8"


def test_heads_are_kept_in_the_store_dtype_and_returned_in_their_own(
    tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path
) -> None:
    from safetensors import safe_open

    store = SubspaceStore(compress_zoo(tmp_path, tiny_bert, bert_zoo, "k: 64\n  dtype: float16"))
    with safe_open(str(store.path / "tasks" / "task0.safetensors"), framework="pt") as handle:
        stored = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
    heads = {key: dtype for key, dtype in stored.items() if key.startswith("extra:")}
    assert heads and set(heads.values()) == {"F16"}
    extras = store.extras("task0")
    assert {t.dtype for t in extras.values()} == {torch.float32}  # the adapter's own dtype on the way out
    out = store.reconstruct("task0", tmp_path / "t0")
    torch.testing.assert_close(
        peft_logits(tiny_bert, out), peft_logits(tiny_bert, bert_zoo[0]), atol=5e-3, rtol=5e-3
    )


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_int_stores_keep_heads_as_int8_rows_with_row_scales(
    tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path, dtype: str
) -> None:
    """A head (a float matrix) of an int store is int8 rows, each with its own float32 scale: within half a
    level of its row's absmax, counted at its real bytes; a bias stays float16; a bad scale is refused."""
    from safetensors.torch import load_file

    from mergekit_subspace.io.codec import extra_bytes
    from mergekit_subspace.io.store import StoreFiles
    from mergekit_subspace.sources import lora_task

    store = SubspaceStore(compress_zoo(tmp_path, tiny_bert, bert_zoo, f"k: 8\n  dtype: {dtype}"))
    file = store.path / "tasks" / "task0.safetensors"
    stored = load_file(str(file))
    source = lora_task(bert_zoo[0]).extras
    heads = [key for key, value in source.items() if value.dim() == 2]
    assert heads
    for key, value in source.items():
        held = stored[f"extra:{key}"]
        if value.dim() == 2:
            scales = stored[f"extra_scale:{key}"]
            assert held.dtype == torch.int8 and scales.dtype == torch.float32
            assert scales.shape == (value.shape[0],)
            assert held.numel() + 4 * scales.numel() == extra_bytes(value, dtype)
        else:
            assert held.dtype == torch.float16 and f"extra_scale:{key}" not in stored
        back = store.extras("task0")[key]
        assert back.dtype == value.dtype
        step = value.abs().amax(dim=-1, keepdim=True) / 127 if value.dim() == 2 else value.abs().max() * 1e-3
        assert bool(((back - value).abs() <= step / 2 + 1e-6).all()), key
    out = store.reconstruct("task0", tmp_path / "t0")
    assert out.is_dir()
    entry = store.manifest["tasks"]["task0"]  # a file whose digest matches but whose scales do not fit
    short = stored | {f"extra_scale:{heads[0]}": stored[f"extra_scale:{heads[0]}"][:-1]}
    with pytest.raises(SubspaceError, match="scales do not fit"):
        StoreFiles._extras(entry, short, file)
    unscaled = {k: v for k, v in stored.items() if k != f"extra_scale:{heads[0]}"}
    with pytest.raises(SubspaceError, match="without row scales"):
        StoreFiles._extras(entry, unscaled, file)


def test_manifest_keeps_each_peft_config_once(tiny_bert: Path, tmp_path: Path) -> None:
    zoo = [make_lora(tiny_bert, tmp_path / "z" / f"same{i}", seed=i) for i in range(4)]
    store = SubspaceStore(compress_zoo(tmp_path, tiny_bert, zoo, "k: 8"))
    raw = json.loads((store.path / MANIFEST).read_text())
    assert len(raw["peft_configs"]) == 1  # four adapters, one config
    assert all(isinstance(t["peft_config"], str) for t in raw["tasks"].values())
    # the in-memory view is the plain nested one, and survives a compaction round trip
    manifest = store.manifest
    assert manifest["tasks"]["same0"]["peft_config"]["r"] == 4
    assert sorted(manifest["slots"]["bert.encoder.layer.0.attention.self.query"]["tasks"]) == [
        f"same{i}" for i in range(4)
    ]
    again = expand_manifest(json.loads(json.dumps(compact_manifest(manifest))), store.path / MANIFEST)
    assert again["tasks"] == manifest["tasks"] and again["slots"] == manifest["slots"]


def test_store_of_another_format_is_refused_by_name(
    tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path
) -> None:
    store_path = compress_zoo(tmp_path, tiny_bert, bert_zoo, "k: 8")
    manifest = json.loads((store_path / MANIFEST).read_text())
    manifest["format"] = "mergekit-subspace/1"
    (store_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SubspaceError, match="recompress"):
        SubspaceStore(store_path)


def test_int8_store_serves_what_it_reconstructs(
    tiny_bert: Path, bert_zoo: list[Path], tmp_path: Path
) -> None:
    store = SubspaceStore(compress_zoo(tmp_path, tiny_bert, bert_zoo, "k: 6\n  dtype: int8"))
    rows = ["task0", "task1", "task2", "task3"]
    ids = ids_for(tiny_bert)
    with torch.no_grad():
        served = attach(load_base(tiny_bert), store).forward(rows, input_ids=ids).logits
    for i, name in enumerate(rows):
        rebuilt = store.reconstruct(name, tmp_path / f"rebuilt-{name}")
        torch.testing.assert_close(served[i], peft_logits(tiny_bert, rebuilt)[i], atol=1e-4, rtol=1e-4)
