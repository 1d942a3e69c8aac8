"""Merge methods, recipes and outputs on tiny models: a property per method that a wrong method would break."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import load_base, make_lora, peft_logits

from mergekit_subspace.io.checkpoint import Checkpoint
from mergekit_subspace.io.peft import read_lora_adapter
from mergekit_subspace.merge import METHODS, SlotInputs, merge
from mergekit_subspace.merge.command import merge as merge_command
from mergekit_subspace.merge.methods import (
    dare_linear,
    dare_ties,
    iso_c,
    iso_cts,
    task_arithmetic,
    ties,
    trim_to_density,
    tsv,
)
from mergekit_subspace.merge.params import interpolate
from mergekit_subspace.recipe import SubspaceSettings
from mergekit_subspace.sources import lora_task
from mergekit_subspace.subspace import SubspaceStore

QUERY0 = "bert.encoder.layer.0.attention.self.query"
QUERY1 = "bert.encoder.layer.1.attention.self.query"
VALUE1 = "bert.encoder.layer.1.attention.self.value"
HEAD = "base_model.model.classifier.weight"


# ---- helpers ----------------------------------------------------------------------------------------------


def make_store(tmp_path: Path, base: Path | None, adapters: list[Path], k: int = 64) -> Path:
    out = tmp_path / "store"
    SubspaceStore.from_tasks(
        [lora_task(a) for a in adapters],
        SubspaceSettings(k=k),
        out,
        base=Checkpoint(base) if base else None,
        progress=False,
    )
    return out


def run_recipe(tmp_path: Path, recipe: dict, name: str = "recipe.yaml") -> tuple[int, str]:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(merge_command, [str(path), "--quiet"])
    return result.exit_code, result.output


def dense(folder: Path) -> dict[str, torch.Tensor]:
    return {m: d.to_dense() for m, d in read_lora_adapter(folder).slots.items()}


def slot(cores: list[torch.Tensor], weights: list[float] | None = None, **kw: object) -> SlotInputs:
    n = len(cores)
    return SlotInputs(
        cores=[c.double() for c in cores],
        weights=weights or [1.0] * n,
        density=kw.pop("density", [1.0] * n),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def outer(*pairs: tuple[float, int, int], size: int = 6) -> torch.Tensor:
    """sum of s * e_i f_j^T on a size x size core."""
    core = torch.zeros(size, size, dtype=torch.float64)
    for s, i, j in pairs:
        core[i, j] += s
    return core


@pytest.fixture
def two_bert(tiny_bert: Path, tmp_path: Path) -> list[Path]:
    return [
        make_lora(tiny_bert, tmp_path / "zoo" / "ta", seed=11, r=4, alpha=8),
        make_lora(
            tiny_bert, tmp_path / "zoo" / "tb", seed=12, r=2, alpha=4, targets=("query", "key", "value")
        ),
    ]


# ---- one property per method ----------------------------------------------------------------------------


def test_every_method_is_registered_with_a_reference() -> None:
    expected = {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "tsv",
        "iso_c",
        "iso_cts",
        "mean",
        "knots_ties",
        "knots_dare_ties",
        "core_ties",
        "core_dare_linear",
        "core_dare_ties",
    }
    assert set(METHODS) == expected
    assert all(m.reference for m in METHODS.values())
    help_text = CliRunner().invoke(merge_command, ["--help"]).output
    assert all(name in help_text for name in expected) and "arXiv:2502.04959" in help_text


def test_task_arithmetic_of_one_task_with_weight_one_is_that_task(
    tiny_bert: Path, two_bert: list[Path], tmp_path: Path
) -> None:
    code, output = run_recipe(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "adapters": [str(p) for p in two_bert],
            "tasks": [{"name": "ta", "weight": 1.0}],
            "output": {"path": str(tmp_path / "out")},
        },
    )
    assert code == 0, output
    merged = tmp_path / "out" / "ta"
    original, got = dense(two_bert[0]), dense(merged)
    assert got.keys() == original.keys()
    for module in original:
        torch.testing.assert_close(got[module], original[module], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        peft_logits(tiny_bert, merged), peft_logits(tiny_bert, two_bert[0]), atol=1e-5, rtol=1e-5
    )
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["method"] == "task_arithmetic" and report["lambda"] == 1.0 and report["tasks"] == ["ta"]


def test_linear_is_the_weighted_average_with_absent_modules_as_zero(
    tiny_bert: Path, two_bert: list[Path], tmp_path: Path
) -> None:
    store = make_store(tmp_path, tiny_bert, two_bert)
    result = merge(
        _recipe(
            store, "linear", [{"name": "ta", "weight": 2.0}, {"name": "tb", "weight": 1.0}], tmp_path / "o"
        ),
        progress=False,
    )
    a, b, got = dense(two_bert[0]), dense(two_bert[1]), dense(result.folders["ta"])
    for module in b:  # tb also adapts `key`, which ta does not touch
        expected = (2 * a.get(module, torch.zeros_like(b[module])) + b[module]) / 3
        torch.testing.assert_close(got[module], expected, atol=1e-5, rtol=1e-4)


def test_mean_ignores_weights_and_averages_all_tasks(bert_zoo: list[Path], tmp_path: Path) -> None:
    store = make_store(tmp_path, None, bert_zoo)
    result = merge(_recipe(store, "mean", None, tmp_path / "o", heads="none"), progress=False)
    deltas = [dense(p) for p in bert_zoo]
    got = dense(result.out)
    for module in got:
        expected = sum(d.get(module, torch.zeros_like(got[module])) for d in deltas) / len(deltas)
        torch.testing.assert_close(got[module], expected, atol=1e-5, rtol=1e-4)
    assert HEAD not in read_lora_adapter(result.out).extras
    assert json.loads((result.out / "adapter_config.json").read_text())["modules_to_save"] is None


def test_ties_keeps_only_the_elected_sign_and_averages_agreeing_entries() -> None:
    c1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    c2 = torch.tensor([[-1.0, -4.0], [1.0, 2.0]])
    full = ties(slot([c1, c2]))
    torch.testing.assert_close(full, torch.tensor([[3.0, -2.5], [0.75, 2.0]], dtype=torch.float64))
    trimmed = ties(slot([c1, c2], density=[0.5, 0.5]))  # keeps 3, 2 of c1 and -4, 2 of c2
    torch.testing.assert_close(trimmed, torch.tensor([[3.0, -4.0], [0.0, 2.0]], dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    cores = [torch.randn(8, 8, generator=gen) for _ in range(4)]
    weights = [1.0, 0.5, 2.0, 1.0]
    merged = ties(slot(cores, weights=weights, density=[0.3] * 4))
    tau = [w * trim_to_density(c.double(), 0.3) for w, c in zip(weights, cores, strict=True)]
    elected = torch.where(sum(tau) >= 0, 1.0, -1.0)
    nonzero = merged != 0
    assert int(nonzero.sum()) > 20
    assert bool((torch.sign(merged[nonzero]) == elected[nonzero]).all())  # never the minority sign


def test_dare_drops_and_rescales_reproducibly() -> None:
    core = torch.randn(10, 10, generator=torch.Generator().manual_seed(1)).double()
    same = dare_linear(slot([core], density=[1.0], generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(same, task_arithmetic(slot([core])))
    runs = [
        dare_linear(slot([core], density=[0.5], generator=torch.Generator().manual_seed(s)))
        for s in (7, 7, 8)
    ]
    kept = runs[0] != 0
    torch.testing.assert_close(runs[0][kept], core[kept] / 0.5)
    assert 20 < int(kept.sum()) < 80
    torch.testing.assert_close(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    c1, c2 = torch.ones(4, 4), -0.5 * torch.ones(4, 4)
    signed = dare_ties(slot([c1, c2], generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(
        signed, torch.ones(4, 4, dtype=torch.float64)
    )  # minority sign dropped, not averaged


def test_tsv_sums_orthogonal_tasks_and_does_not_double_count_shared_directions() -> None:
    a, b = outer((3.0, 0, 0)), outer((2.0, 1, 1))
    torch.testing.assert_close(tsv(slot([a, b])), a + b)
    same_a, same_b = outer((3.0, 0, 0)), outer((1.0, 0, 0))
    torch.testing.assert_close(tsv(slot([same_a, same_b])), outer((2.0, 0, 0)))  # interference removed
    assert torch.allclose(task_arithmetic(slot([same_a, same_b])), outer((4.0, 0, 0)))


def test_iso_c_flattens_the_spectrum_in_the_task_arithmetic_subspace() -> None:
    gen = torch.Generator().manual_seed(3)
    cores = [torch.randn(12, 3, generator=gen) @ torch.randn(3, 10, generator=gen) for _ in range(3)]
    ta = task_arithmetic(slot(cores))
    merged = iso_c(slot(cores))
    s_ta, s_iso = torch.linalg.svdvals(ta), torch.linalg.svdvals(merged)
    assert torch.allclose(s_iso[:9], s_ta[:9].mean().expand(9), rtol=1e-9)  # flat, same nuclear norm
    assert s_iso[9:].abs().max() < 1e-9  # the null space is not filled
    U_ta = torch.linalg.svd(ta)[0][:, :9]
    assert torch.allclose(U_ta @ (U_ta.T @ merged), merged, atol=1e-9)  # same column space


def test_iso_cts_leaves_no_task_behind(tmp_path: Path) -> None:
    strong_a = outer((10.0, 0, 0), (5.0, 1, 1))
    strong_b = outer((10.0, 0, 0), (4.0, 2, 2))
    weak = outer((0.1, 3, 3))
    inputs = slot([strong_a, strong_b, weak], options={"common_fraction": 0.5})
    merged = iso_cts(inputs)
    sigma = (20.0 + 5.0 + 4.0 + 0.1) / 4
    torch.testing.assert_close(merged, outer((sigma, 0, 0), (sigma, 1, 1), (sigma, 2, 2), (sigma, 3, 3)))
    truncated = iso_c(slot([strong_a, strong_b, weak], rank=2))
    assert truncated[3, 3] == 0  # Iso-C at the same budget drops the weak task


def test_iso_c_pipeline_writes_a_flat_spectrum(bert_zoo: list[Path], tmp_path: Path) -> None:
    result = merge(_adapters_recipe(bert_zoo[:3], "iso_c", tmp_path / "o", heads="none"), progress=False)
    for delta in dense(result.out).values():
        s = torch.linalg.svdvals(delta)
        s = s[s > 1e-4 * s[0]]
        assert torch.allclose(s, s.mean().expand_as(s), rtol=1e-4)


# ---- recipe features ------------------------------------------------------------------------------------


def test_gradient_over_layers_and_module_filters(
    tiny_bert: Path, two_bert: list[Path], tmp_path: Path
) -> None:
    assert interpolate([0.0, 1.0], 0, 2) == 0.0 and interpolate([0.0, 1.0], 1, 2) == 1.0
    assert interpolate([0.0, 1.0, 0.0], 2, 5) == 1.0
    result = merge(
        {
            "merge_method": "task_arithmetic",
            "adapters": [str(two_bert[0])],
            "tasks": [{"name": "ta", "weight": [0.0, 1.0]}],
            "output": {"path": str(tmp_path / "g")},
        },
        progress=False,
    )
    got, original = dense(result.folders["ta"]), dense(two_bert[0])
    assert float(got[QUERY0].abs().max()) < 1e-6
    torch.testing.assert_close(got[QUERY1], original[QUERY1], atol=1e-5, rtol=1e-5)
    filtered = merge(
        {
            "merge_method": "task_arithmetic",
            "adapters": [str(two_bert[0])],
            "parameters": {"weight": [{"filter": "query", "value": 0.5}, {"value": 1.0}]},
            "output": {"path": str(tmp_path / "f"), "heads": "none"},
        },
        progress=False,
    )
    got = dense(filtered.out)
    torch.testing.assert_close(got[QUERY1], 0.5 * original[QUERY1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[VALUE1], original[VALUE1], atol=1e-5, rtol=1e-5)


def test_heads_per_task_none_and_named(two_bert: list[Path], tmp_path: Path) -> None:
    heads = {p.name: read_lora_adapter(p).extras[HEAD] for p in two_bert}
    per_task = merge(_adapters_recipe(two_bert, "ties", tmp_path / "p"), progress=False)
    assert sorted(per_task.folders) == ["ta", "tb"]
    for name, folder in per_task.folders.items():
        assert torch.equal(read_lora_adapter(folder).extras[HEAD], heads[name])
    named = merge(_adapters_recipe(two_bert, "ties", tmp_path / "n", heads="tb"), progress=False)
    assert torch.equal(read_lora_adapter(named.out).extras[HEAD], heads["tb"])
    assert (named.out / "merge_report.json").is_file() and (named.out / "adapter_config.json").is_file()


def test_output_rank_caps_every_module(bert_zoo: list[Path], tmp_path: Path) -> None:
    result = merge(
        _adapters_recipe(bert_zoo, "task_arithmetic", tmp_path / "r", heads="none", rank=2), progress=False
    )
    adapter = read_lora_adapter(result.out)
    assert max(adapter.ranks.values()) == 2
    assert all(0 < s["kept_energy"] <= 1 for s in result.report["slots"].values())


def test_full_output_equals_base_plus_merged_adapter(
    tiny_bert: Path, two_bert: list[Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    adapter = merge(_adapters_recipe(two_bert, "dare_ties", tmp_path / "a", heads="ta"), progress=False)
    recipe = _adapters_recipe(two_bert, "dare_ties", tmp_path / "full", heads="ta")
    recipe["base_model"] = str(tiny_bert)
    recipe["output"] |= {"format": "full", "max_shard_size": "40KB"}
    full = merge(recipe, progress=False)
    assert (full.out / "model.safetensors.index.json").is_file() and (full.out / "config.json").is_file()
    assert len(full.report["full"]["merged"]["shards"]) > 1
    model = AutoModelForSequenceClassification.from_pretrained(full.out).eval()
    ids = torch.randint(3, 90, (4, 12), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, peft_logits(tiny_bert, adapter.out), atol=1e-4, rtol=1e-4)


def test_full_output_respects_fan_in_fan_out(tiny_gpt2: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    adapters = [
        make_lora(tiny_gpt2, tmp_path / "z" / f"g{i}", seed=i, targets=("c_attn",), fan_in_fan_out=True)
        for i in range(2)
    ]
    peft_out = merge(_adapters_recipe(adapters, "tsv", tmp_path / "p", heads="none"), progress=False)
    recipe = _adapters_recipe(adapters, "tsv", tmp_path / "full", heads="none")
    recipe["base_model"] = str(tiny_gpt2)
    recipe["output"]["format"] = "full"
    full = merge(recipe, progress=False)
    ids = torch.randint(3, 90, (4, 12), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(full.out).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, peft_logits(tiny_gpt2, peft_out.out), atol=1e-4, rtol=1e-4)


def test_lambda_is_chosen_on_validation_data(tiny_bert: Path, two_bert: list[Path], tmp_path: Path) -> None:
    """Labels are what the task predicts at lambda = 2 through a head centred there; the grid must find 2."""
    base = _bert_with_tokenizer(tiny_bert, tmp_path / "tiny-bert-tok")
    texts = _texts(48)
    task = _head_centred_at(base, two_bert[0], texts, 2.0, tmp_path / "zoo2" / "ta")
    labels = _predict(base, task, texts, scale=2.0)
    assert len(set(labels)) > 1
    data = tmp_path / "val.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels, strict=True))
    )
    code, output = run_recipe(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "adapters": [str(task)],
            "base_model": str(base),
            "tasks": [{"name": "ta", "validation": str(data)}],
            "validation": {"lambda_grid": [0.5, 1.0, 2.0]},
            "output": {"path": str(tmp_path / "chosen")},
        },
    )
    assert code == 0, output
    report = json.loads((tmp_path / "chosen" / "merge_report.json").read_text())
    assert report["lambda"] == 2.0 and report["lambda_source"] == "validation"
    scores = report["validation"]["task_scores"]["ta"]
    assert scores[2] == 1.0 and max(scores[:2]) < 1.0
    chosen, original = dense(tmp_path / "chosen" / "ta"), dense(task)
    for module, delta in original.items():
        torch.testing.assert_close(chosen[module], 2.0 * delta, atol=1e-5, rtol=1e-5)


# ---- bad input: a clear error and nothing written -------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"merge_method": "slerp"}, "unknown merge method 'slerp' (known: linear, task_arithmetic, ties"),
        ({"tasks": [{"name": "nope"}]}, "has no task 'nope' (known: ta, tb)"),
        ({"tasks": [{"name": "ta", "weight": [1, 0.5, 0.2, 0.1, 0]}]}, "a gradient of 5 values"),
        ({"parameters": {"density": 0.0}}, "density must lie in (0, 1], got 0.0"),
        ({"parameters": {"density": 1.5}}, "density must lie in (0, 1], got 1.5"),
        (
            {"tasks": [{"name": "ta", "parameters": {"density": [{"filter": "query", "value": [0.5, 2]}]}}]},
            "density must lie in (0, 1]",
        ),
        ({"parameters": {"gamma": 0.1}}, "method 'ties' takes no parameter 'gamma'"),
        ({"output": {"format": "full"}}, "`full` output needs the base model folder"),
        ({"output": {"heads": "nobody"}}, "output.heads 'nobody' is not per_task, none, or a merged task"),
        ({"validation": {"lambda_grid": []}}, "validation.lambda_grid"),
    ],
)
def test_bad_recipes_fail_clearly_and_write_nothing(
    two_bert: list[Path], tmp_path: Path, change: dict, message: str
) -> None:
    store = make_store(tmp_path, None, two_bert)
    recipe = {"merge_method": "ties", "store": str(store), "output": {"path": str(tmp_path / "out")}}
    for key, value in change.items():
        recipe[key] = recipe[key] | value if isinstance(value, dict) and key == "output" else value
    code, output = run_recipe(tmp_path, recipe)
    assert code == 2 and "error:" in output and message in output, output
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_adapters_of_different_base_models_are_refused(
    tiny_bert: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    bert = make_lora(tiny_bert, tmp_path / "zoo" / "b", seed=1)
    llama = make_lora(tiny_llama, tmp_path / "zoo" / "l", seed=2, targets=("q_proj",))
    code, output = run_recipe(
        tmp_path,
        {
            "merge_method": "mean",
            "adapters": [str(bert), str(llama)],
            "output": {"path": str(tmp_path / "out")},
        },
    )
    assert code == 2 and "adapters of different base models" in output, output
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_without_overwrite(two_bert: list[Path], tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, output = run_recipe(tmp_path, _adapters_recipe(two_bert, "mean", tmp_path / "out"))
    assert code == 2 and "already exists" in output
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# ---- small builders -------------------------------------------------------------------------------------


def _recipe(store: Path, method: str, tasks: list | None, out: Path, heads: str = "per_task") -> dict:
    recipe: dict = {"merge_method": method, "store": str(store), "output": {"path": str(out), "heads": heads}}
    if tasks is not None:
        recipe["tasks"] = tasks
    return recipe


def _adapters_recipe(
    adapters: list[Path], method: str, out: Path, heads: str = "per_task", rank: int | None = None
) -> dict:
    output: dict = {"path": str(out), "heads": heads}
    if rank is not None:
        output["rank"] = rank
    return {"merge_method": method, "adapters": [str(p) for p in adapters], "output": output}


def _bert_with_tokenizer(tiny_bert: Path, out: Path) -> Path:
    """The tiny BERT plus a word-level vocabulary, so text validation data can be tokenized."""
    import shutil

    from transformers import BertTokenizer

    shutil.copytree(tiny_bert, out)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(115)]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(out)
    return out


def _texts(n: int) -> list[str]:
    gen = torch.Generator().manual_seed(5)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, 115, (10,), generator=gen)) for _ in range(n)]


def _classifier_model(base: Path, adapter: Path, scale: float) -> torch.nn.Module:
    from peft import PeftModel

    from mergekit_subspace.merge.select import set_lora_scale

    model = PeftModel.from_pretrained(load_base(base), adapter).eval()
    set_lora_scale(model, scale)
    return model


def _predict(base: Path, adapter: Path, texts: list[str], scale: float = 1.0) -> list[int]:
    from transformers import AutoTokenizer

    model = _classifier_model(base, adapter, scale)
    with torch.no_grad():
        logits = model(**AutoTokenizer.from_pretrained(base)(texts, return_tensors="pt", padding=True)).logits
    return [int(i) for i in logits.argmax(-1)]


def _head_centred_at(base: Path, adapter: Path, texts: list[str], scale: float, out: Path) -> Path:
    """A copy of `adapter` whose head is large and centred on the mean pooled output at `scale`, so its
    predictions vary by example there and collapse towards one class at other scales."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    model = _classifier_model(base, adapter, scale)
    pooled: list[torch.Tensor] = []
    classifier = model.base_model.model.classifier
    handle = classifier.register_forward_hook(lambda _m, args, _o: pooled.append(args[0].detach()))
    with torch.no_grad():
        model(**AutoTokenizer.from_pretrained(base)(texts, return_tensors="pt", padding=True))
    handle.remove()
    centre = pooled[0].mean(dim=0)
    shutil.copytree(adapter, out)
    weights = load_file(out / "adapter_model.safetensors")
    head = torch.randn(weights[HEAD].shape, generator=torch.Generator().manual_seed(9)) * 1000
    weights[HEAD] = head
    weights[HEAD.replace("weight", "bias")] = -(head @ centre)
    save_file(weights, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def test_budget_bytes_sizes_the_in_memory_basis_as_compress_does(
    two_bert: list[Path], tmp_path: Path
) -> None:
    """Merging from adapters fits the same SubspaceBasis as compress, so a byte budget means the same."""
    from mergekit_subspace.fit import SubspaceBasis
    from mergekit_subspace.recipe import SubspaceSettings
    from mergekit_subspace.sources import lora_task

    settings = {"k": 8, "budget_bytes": 2_000}
    recipe = _adapters_recipe(two_bert, "task_arithmetic", tmp_path / "out")
    recipe["subspace"] = settings
    code, output = run_recipe(tmp_path, recipe)
    assert code == 0, output
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["basis"]["budget_bytes"] == 2_000
    chosen = SubspaceBasis(SubspaceSettings(**settings)).fit([lora_task(p) for p in two_bert]).k_
    assert len(set(chosen.values())) > 1  # the budget gave the slots different sizes
    ranks = {m: s["rank"] for m, s in report["slots"].items()}
    assert all(ranks[m] <= chosen[m][0] for m in ranks)
