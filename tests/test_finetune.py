"""Full fine-tunes as tasks: low-rank slots, lora_B biases, whole changed modules, energy dropped reported."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner
from conftest import ids_for, load_base, make_lora, peft_logits, write_recipe

from mergekit_subspace.cli import main
from mergekit_subspace.subspace import SubspaceStore


def make_finetune(base: Path, out: Path, seed: int, rank: int) -> Path:
    """A 'fine-tune' whose matrices moved by a rank-`rank` delta, plus changed biases and a LayerNorm."""
    model = load_base(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("attention.self.query.weight") or name.endswith("output.dense.weight"):
                m, n = param.shape
                B = torch.randn(m, rank, generator=generator) * 0.1
                A = torch.randn(rank, n, generator=generator) * 0.1
                param.add_(B @ A)
            if name.endswith("attention.self.query.bias"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
            if name == "bert.encoder.layer.0.attention.output.LayerNorm.weight":
                param.mul_(1.1)
    model.save_pretrained(out)
    return out


def finetuned_logits(folder: Path, base: Path) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=ids_for(base)).logits


def test_finetunes_and_adapters_in_one_store(tiny_bert: Path, tmp_path: Path) -> None:
    tuned = make_finetune(tiny_bert, tmp_path / "ft" / "legal", seed=1, rank=3)
    adapter = make_lora(tiny_bert, tmp_path / "zoo" / "lora0", seed=2)
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        f"base_model: {tiny_bert}\nadapters: [{adapter}]\n"
        f"finetunes:\n  - {{path: {tuned}, name: legal, max_rank: 8}}\n"
        f"subspace: {{k: 64}}\noutput: {tmp_path / 'store'}\n",
    )
    result = CliRunner().invoke(main, ["compress", str(recipe)])
    assert result.exit_code == 0, result.output
    store = SubspaceStore(tmp_path / "store")
    entry = store.manifest["tasks"]["legal"]
    assert entry["kind"] == "finetune" and entry["energy_dropped"] < 1e-10  # true rank 3 <= max_rank 8
    assert "bert.encoder.layer.0.attention.output.LayerNorm" in entry["peft_config"]["modules_to_save"]
    assert entry["peft_config"]["lora_bias"] is True
    out = store.reconstruct("legal", tmp_path / "legal-peft")
    torch.testing.assert_close(
        peft_logits(tiny_bert, out), finetuned_logits(tuned, tiny_bert), atol=1e-4, rtol=1e-4
    )
    lora_out = store.reconstruct("lora0", tmp_path / "lora0-peft")
    torch.testing.assert_close(
        peft_logits(tiny_bert, lora_out), peft_logits(tiny_bert, adapter), atol=1e-5, rtol=1e-5
    )


def test_finetune_truncation_reports_energy_dropped(tiny_bert: Path, tmp_path: Path) -> None:
    tuned = make_finetune(tiny_bert, tmp_path / "ft" / "wide", seed=3, rank=6)
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        f"base_model: {tiny_bert}\nfinetunes:\n  - {{path: {tuned}, max_rank: 2}}\noutput: {tmp_path / 'store'}\n",
    )
    assert CliRunner().invoke(main, ["compress", str(recipe)]).exit_code == 0
    info = SubspaceStore(tmp_path / "store").info()
    assert 0.05 < info["per_task"]["wide"]["energy_dropped"] < 1


def test_finetune_needs_base(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", f"finetunes: [{tmp_path}]\noutput: {tmp_path / 'store'}\n")
    result = CliRunner().invoke(main, ["compress", str(recipe)])
    assert result.exit_code != 0 and "finetunes need base_model" in result.output
