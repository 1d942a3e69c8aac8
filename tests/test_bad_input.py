"""Every bad input gets a clear message naming the file and the problem, a non-zero exit, and no output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_lora, write_recipe
from safetensors.torch import load_file, save_file

from mergekit_subspace.cli import main


@pytest.fixture
def good(tiny_bert: Path, tmp_path: Path) -> list[Path]:
    return [make_lora(tiny_bert, tmp_path / "zoo" / f"ok{i}", seed=i) for i in range(2)]


def run_compress(
    tmp_path: Path, base: Path, adapters: list[str], extra_args: tuple[str, ...] = (), body: str = ""
):
    listed = "\n".join(f"  - {a}" for a in adapters)
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        f"base_model: {base}\nadapters:\n{listed}\nsubspace:\n  k: 4\noutput: {tmp_path / 'out' / 'store'}\n{body}",
    )
    return CliRunner().invoke(main, ["compress", str(recipe), *extra_args])


def assert_refused(result, *fragments: str, out: Path) -> None:
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)
    leftovers = list(out.parent.glob("*")) if out.parent.exists() else []
    assert leftovers == [], f"partial output left behind: {leftovers}"


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_adapter_folder(tiny_bert: Path, good: list[Path], tmp_path: Path) -> None:
    result = run_compress(tmp_path, tiny_bert, [str(good[0]), str(tmp_path / "nope")])
    assert_refused(result, "nope", "adapter folder not found", out=tmp_path / "out" / "store")


def test_missing_config_and_weights(tiny_bert: Path, good: list[Path], tmp_path: Path) -> None:
    no_config = copy_adapter(good[0], tmp_path / "noconfig")
    (no_config / "adapter_config.json").unlink()
    result = run_compress(tmp_path, tiny_bert, [str(no_config)])
    assert_refused(result, "noconfig/adapter_config.json", "file not found", out=tmp_path / "out" / "store")
    no_weights = copy_adapter(good[0], tmp_path / "noweights")
    (no_weights / "adapter_model.safetensors").unlink()
    result = run_compress(tmp_path, tiny_bert, [str(no_weights)])
    assert_refused(result, "noweights", "no adapter_model.safetensors", out=tmp_path / "out" / "store")


def test_config_not_json(tiny_bert: Path, good: list[Path], tmp_path: Path) -> None:
    bad = copy_adapter(good[0], tmp_path / "badjson")
    (bad / "adapter_config.json").write_text("{not json")
    result = run_compress(tmp_path, tiny_bert, [str(bad)])
    assert_refused(result, "badjson/adapter_config.json", "is not valid JSON", out=tmp_path / "out" / "store")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft_type": "IA3"}, "is a IA3 adapter; only LoRA"),
        ({"peft_type": "PREFIX_TUNING"}, "is a PREFIX_TUNING adapter"),
        ({"use_dora": True}, "DoRA"),
    ],
)
def test_not_a_plain_lora(
    tiny_bert: Path, good: list[Path], tmp_path: Path, change: dict, message: str
) -> None:
    bad = copy_adapter(good[0], tmp_path / "other")
    config = json.loads((bad / "adapter_config.json").read_text())
    config.update(change)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    result = run_compress(tmp_path, tiny_bert, [str(good[1]), str(bad)])
    assert_refused(result, "other/adapter_config.json", message, out=tmp_path / "out" / "store")


def test_truncated_and_corrupt_safetensors(tiny_bert: Path, good: list[Path], tmp_path: Path) -> None:
    truncated = copy_adapter(good[0], tmp_path / "truncated")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    result = run_compress(tmp_path, tiny_bert, [str(truncated)])
    assert_refused(
        result,
        "truncated/adapter_model.safetensors",
        "not a readable safetensors",
        out=tmp_path / "out" / "store",
    )
    garbage = copy_adapter(good[0], tmp_path / "garbage")
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    result = run_compress(tmp_path, tiny_bert, [str(garbage)])
    assert_refused(
        result,
        "garbage/adapter_model.safetensors",
        "not a readable safetensors",
        out=tmp_path / "out" / "store",
    )


def test_nan_in_tensor(tiny_bert: Path, good: list[Path], tmp_path: Path) -> None:
    bad = copy_adapter(good[0], tmp_path / "nan")
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")
    result = run_compress(tmp_path, tiny_bert, [str(bad)])
    assert_refused(result, "nan/adapter_model.safetensors", key, "NaN or Inf", out=tmp_path / "out" / "store")


def test_shapes_that_do_not_fit_base(
    tiny_bert: Path, tiny_llama: Path, good: list[Path], tmp_path: Path
) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    wider = tmp_path / "wider-bert"
    BertForSequenceClassification(
        BertConfig(
            vocab_size=120,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=48,
            num_labels=3,
        )
    ).save_pretrained(wider)
    misfit = make_lora(wider, tmp_path / "misfit", seed=0)
    result = run_compress(tmp_path, tiny_bert, [str(good[0]), str(misfit)])
    assert_refused(result, "misfit", "shapes do not fit the base model", out=tmp_path / "out" / "store")
    foreign = make_lora(tiny_llama, tmp_path / "foreign", seed=0, targets=("q_proj",))
    result = run_compress(tmp_path, tiny_bert, [str(foreign)])
    assert_refused(result, "foreign", "does not exist in the base model", out=tmp_path / "out" / "store")


def test_duplicate_and_unsafe_names(tiny_bert: Path, good: list[Path], tmp_path: Path) -> None:
    store = tmp_path / "out" / "store"
    duplicate = [f"{{path: {good[0]}, name: same}}", f"{{path: {good[1]}, name: same}}"]
    assert_refused(run_compress(tmp_path, tiny_bert, duplicate), "two tasks are named 'same'", out=store)
    for name in ("../x", "a/b", ".."):
        entry = [f"{{path: {good[0]}, name: '{name}'}}"]
        assert_refused(
            run_compress(tmp_path, tiny_bert, entry),
            f"task name '{name}' is not a plain file name",
            out=store,
        )


def test_pickle_refused_unless_allowed(tiny_bert: Path, good: list[Path], tmp_path: Path) -> None:
    pickled = copy_adapter(good[0], tmp_path / "pickled")
    tensors = load_file(pickled / "adapter_model.safetensors")
    (pickled / "adapter_model.safetensors").unlink()
    torch.save(tensors, pickled / "adapter_model.bin")
    result = run_compress(tmp_path, tiny_bert, [str(pickled)])
    assert_refused(
        result, "pickled/adapter_model.bin", "pickle", "--allow-pickle", out=tmp_path / "out" / "store"
    )
    allowed = run_compress(tmp_path, tiny_bert, [str(pickled)], ("--allow-pickle",))
    assert allowed.exit_code == 0, allowed.output
    assert (tmp_path / "out" / "store" / "manifest.json").is_file()


def test_recipe_errors(tiny_bert: Path, good: list[Path], tmp_path: Path) -> None:
    store = tmp_path / "out" / "store"
    result = run_compress(tmp_path, tiny_bert, [str(good[0])], body="mystery: 1\n")
    assert_refused(result, "recipe.yaml", "mystery: unknown key", out=store)
    recipe = write_recipe(
        tmp_path / "k0.yaml", f"adapters: [{good[0]}]\nsubspace: {{k: 0}}\noutput: {store}\n"
    )
    result = CliRunner().invoke(main, ["compress", str(recipe)])
    assert_refused(result, "k0.yaml", "subspace.k", "greater than or equal to 1", out=store)
    recipe = write_recipe(tmp_path / "empty.yaml", f"adapters: []\noutput: {store}\n")
    assert_refused(CliRunner().invoke(main, ["compress", str(recipe)]), "the zoo is empty", out=store)
    recipe = write_recipe(tmp_path / "noglob.yaml", f"adapters: ['{tmp_path}/none-*']\noutput: {store}\n")
    assert_refused(CliRunner().invoke(main, ["compress", str(recipe)]), "matched no folder", out=store)
    missing = CliRunner().invoke(main, ["compress", str(tmp_path / "absent.yaml")])
    assert_refused(missing, "absent.yaml", "recipe not found", out=store)


def test_failed_overwrite_keeps_previous_store(
    tiny_bert: Path, good: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok = run_compress(tmp_path, tiny_bert, [str(g) for g in good])
    assert ok.exit_code == 0, ok.output
    store = tmp_path / "out" / "store"
    before = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}

    import mergekit_subspace.subspace as subspace

    real = subspace._task_file_and_entry
    calls = {"n": 0}

    def crash_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash while writing tasks")
        return real(*args, **kwargs)

    monkeypatch.setattr(subspace, "_task_file_and_entry", crash_midway)
    result = run_compress(tmp_path, tiny_bert, [str(g) for g in good], ("--overwrite",))
    assert result.exit_code != 0
    after = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in store.parent.iterdir()) == ["store"]


def test_existing_store_needs_overwrite(tiny_bert: Path, good: list[Path], tmp_path: Path) -> None:
    assert run_compress(tmp_path, tiny_bert, [str(good[0])]).exit_code == 0
    again = run_compress(tmp_path, tiny_bert, [str(good[0])])
    assert again.exit_code != 0 and "already exists" in again.output


def test_add_errors_leave_store_untouched(
    tiny_bert: Path, tiny_llama: Path, good: list[Path], tmp_path: Path
) -> None:
    assert run_compress(tmp_path, tiny_bert, [str(good[0])]).exit_code == 0
    store = tmp_path / "out" / "store"
    manifest = (store / "manifest.json").read_bytes()
    runner = CliRunner()
    same = runner.invoke(main, ["add", str(store), str(good[0])])
    assert same.exit_code != 0 and "already in the store" in same.output
    foreign = make_lora(tiny_llama, tmp_path / "foreign", seed=0, targets=("q_proj",))
    result = runner.invoke(main, ["add", str(store), str(foreign)])
    assert result.exit_code != 0 and "no basis for" in result.output
    bad_name = runner.invoke(main, ["add", str(store), str(good[1]), "--name", "../evil"])
    assert bad_name.exit_code != 0 and "not a plain file name" in bad_name.output
    assert (store / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in (store / "tasks").iterdir()) == ["ok0.safetensors"]
    missing = runner.invoke(main, ["reconstruct", str(store), "ghost", "--out", str(tmp_path / "ghost")])
    assert missing.exit_code != 0 and "has no task 'ghost' (known: ok0)" in missing.output
    assert not (tmp_path / "ghost").exists()
