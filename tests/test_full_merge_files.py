"""A `full` merge is a model folder that stands alone: the base's auxiliary files and sentence-transformers
modules are there, its weights and its model card are not, and README.md describes the merge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import randomize_trainable

from benchmarks.zoos.text import minilm_path
from mergekit_subspace import __version__
from mergekit_subspace.io.checkpoint import Checkpoint
from mergekit_subspace.merge import merge
from mergekit_subspace.merge.full import copy_model_files

MINILM = Path(minilm_path())
pytestmark = pytest.mark.skipif(not (MINILM / "config.json").is_file(), reason="the MiniLM model is not here")


def _minilm_lora(out: Path, seed: int) -> Path:
    """A real PEFT LoRA on the MiniLM encoder (no head), with random factors as if trained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    model = get_peft_model(
        AutoModel.from_pretrained(MINILM), LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"])
    )
    randomize_trainable(model, seed, 0.05)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("full-minilm")
    adapters = [_minilm_lora(root / "zoo" / f"task{i}", seed=i) for i in range(2)]
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(MINILM),
        "adapters": [str(p) for p in adapters],
        "tasks": [{"name": "task0", "weight": 0.7}, {"name": "task1", "weight": 0.3}],
        "output": {"path": str(root / "full"), "format": "full", "heads": "none"},
    }
    full = merge(recipe, progress=False)
    peft_recipe = recipe | {"output": {"path": str(root / "peft"), "heads": "none"}}
    return {"full": full, "peft": merge(peft_recipe, progress=False).out}


def test_sentence_transformers_files_are_copied(merged: dict) -> None:
    out = merged["full"].out
    assert (out / "1_Pooling" / "config.json").read_bytes() == (
        MINILM / "1_Pooling" / "config.json"
    ).read_bytes()
    for name in ("modules.json", "sentence_bert_config.json", "tokenizer.json", "vocab.txt", "config.json"):
        assert (out / name).read_bytes() == (MINILM / name).read_bytes(), name
    assert not (out / ".gitattributes").exists()
    assert "1_Pooling/config.json" in merged["full"].report["full"]["merged"]["copied_files"]
    assert "README.md" not in merged["full"].report["full"]["merged"]["copied_files"]


def test_readme_is_our_card(merged: dict) -> None:
    card = (merged["full"].out / "README.md").read_text()
    assert card != (MINILM / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card
    for fact in ("task_arithmetic", "`task0` (weight 0.7)", "`task1` (weight 0.3)", str(MINILM), __version__):
        assert fact in card, fact
    assert "SentenceTransformer(" in card  # modules.json: it loads as a sentence-transformers model


def test_merged_folder_loads_and_equals_base_plus_merged_adapter(merged: dict) -> None:
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    out = merged["full"].out
    tokenizer = AutoTokenizer.from_pretrained(out)  # the copied tokenizer
    batch = tokenizer(["a cat sat on the mat", "stocks fell sharply"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = AutoModel.from_pretrained(out).eval()(**batch).last_hidden_state
        peft = PeftModel.from_pretrained(AutoModel.from_pretrained(MINILM), merged["peft"]).eval()
        want = peft(**batch).last_hidden_state
        base = AutoModel.from_pretrained(MINILM).eval()(**batch).last_hidden_state
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    assert not torch.allclose(got, base, atol=1e-3)  # the merge changed the model


def test_weight_exports_are_left_out_and_module_weights_kept(tiny_bert: Path, tmp_path: Path) -> None:
    """onnx/ holds weights of the unmerged base (left out); 2_Dense/ is a module modules.json names (kept)."""
    base = tmp_path / "base"
    shutil.copytree(tiny_bert, base)
    (base / "README.md").write_text("the base's card")
    (base / ".gitattributes").write_text("*.bin filter=lfs")
    (base / "onnx").mkdir()
    (base / "onnx" / "model.onnx").write_bytes(b"\0" * 8)
    for sub in ("1_Pooling", "2_Dense"):
        (base / sub).mkdir()
        (base / sub / "config.json").write_text("{}")
    (base / "2_Dense" / "model.safetensors").write_bytes(b"dense")
    modules = [{"idx": i, "name": str(i), "path": p} for i, p in enumerate(["", "1_Pooling", "2_Dense"])]
    (base / "modules.json").write_text(json.dumps(modules))
    out = tmp_path / "out"
    out.mkdir()
    copied = copy_model_files(Checkpoint(base), out)
    assert (
        "2_Dense/model.safetensors" in copied
        and (out / "2_Dense" / "model.safetensors").read_bytes() == b"dense"
    )
    assert (out / "1_Pooling" / "config.json").is_file() and (out / "config.json").is_file()
    assert not any(
        (out / name).exists() for name in ("onnx", "README.md", ".gitattributes", "model.safetensors")
    )
