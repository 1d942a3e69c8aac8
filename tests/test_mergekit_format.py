"""mergekit YAMLs as they are: converted before validation, they give the same factors as our native recipe."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.merge import merge
from mergekit_subspace.merge.command import merge as merge_command
from mergekit_subspace.merge.mergekit_format import convert, is_mergekit
from tests.conftest import make_lora

TARGETS = ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def llama_loras(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three real PEFT LoRAs on the tiny Llama (different ranks), as `base+lora` merges in mergekit."""
    zoo = tmp_path_factory.mktemp("mk-zoo")
    return [
        make_lora(tiny_llama, zoo / name, seed=seed, r=r, alpha=2 * r, targets=TARGETS)
        for name, seed, r in (("math", 1, 4), ("code", 2, 2), ("chat", 3, 4))
    ]


def run_mergekit(tmp_path: Path, config: dict, out: str = "mk-out") -> tuple[int, str, Path]:
    """`mergekit-subspace merge mergekit.yaml --out DIR`, the YAML exactly as mergekit reads it."""
    path = tmp_path / "mergekit.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = CliRunner().invoke(merge_command, [str(path), "--out", str(tmp_path / out), "--quiet"])
    return result.exit_code, result.output, tmp_path / out


def native(tmp_path: Path, recipe: dict, out: str = "native-out") -> dict:
    merge(recipe, out=tmp_path / out, progress=False)
    return load_file(tmp_path / out / "adapter_model.safetensors")


def assert_same_factors(folder: Path, expected: dict) -> None:
    got = load_file(folder / "adapter_model.safetensors")
    assert sorted(got) == sorted(expected) and got
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype
        assert got[key].equal(tensor), key


def test_mergekit_ties_example_gives_our_ties(
    tiny_llama: Path, llama_loras: list[Path], tmp_path: Path
) -> None:
    """The shape of mergekit's examples/ties.yml: density and weight gradients, a filter list, normalize,
    int8_mask, dtype, each model as base+lora."""
    math, code, chat = (str(p) for p in llama_loras)
    config = {
        "models": [
            {"model": f"{tiny_llama}+{math}", "parameters": {"density": [1, 0.3], "weight": 1.0}},
            {"model": f"{tiny_llama}+{code}", "parameters": {"density": 0.5, "weight": [0.3, 1]}},
            {
                "model": f"{tiny_llama}+{chat}",
                "parameters": {
                    "density": 0.33,
                    "weight": [{"filter": "v_proj", "value": 0.5}, {"value": 0.8}],
                },
            },
        ],
        "merge_method": "ties",
        "base_model": str(tiny_llama),
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float16",
    }
    code_rc, output, out = run_mergekit(tmp_path, config)
    assert code_rc == 0, output
    expected = native(
        tmp_path,
        {
            "merge_method": "ties",
            "base_model": str(tiny_llama),
            "adapters": [math, code, chat],
            "tasks": [
                {"name": "math", "parameters": {"density": [1, 0.3], "weight": 1.0}},
                {"name": "code", "parameters": {"density": 0.5, "weight": [0.3, 1]}},
                {
                    "name": "chat",
                    "parameters": {
                        "density": 0.33,
                        "weight": [{"filter": "v_proj", "value": 0.5}, {"value": 0.8}],
                    },
                },
            ],
            "output": {"format": "peft", "heads": "none", "dtype": "float16"},
        },
    )
    assert_same_factors(out, expected)
    assert all(tensor.dtype == torch.float16 for tensor in expected.values())  # mergekit's `dtype`


def test_task_arithmetic_normalize_is_our_weighted_average_and_density_is_ignored(
    tiny_llama: Path, llama_loras: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    math, code, _ = (str(p) for p in llama_loras)
    config = {
        "base_model": str(tiny_llama),
        "merge_method": "task_arithmetic",
        "models": [
            {"model": str(tiny_llama)},  # the base itself: no task vector, as in mergekit
            {"model": f"{tiny_llama}+{math}", "parameters": {"weight": 0.7, "density": 0.4}},
            {"model": f"{tiny_llama}+{code}", "parameters": {"weight": 0.3}},
        ],
        "parameters": {"normalize": True, "lambda": 1.5},
    }
    with caplog.at_level(logging.WARNING, logger="mergekit_subspace.merge"):
        code_rc, output, out = run_mergekit(tmp_path, config)
    assert code_rc == 0, output
    assert "density is ignored by task_arithmetic" in caplog.text
    expected = native(
        tmp_path,
        {
            "merge_method": "linear",
            "base_model": str(tiny_llama),
            "adapters": [math, code],
            "tasks": [{"name": "math", "weight": 0.7}, {"name": "code", "weight": 0.3}],
            "parameters": {"lambda": 1.5},
            "output": {"heads": "none"},
        },
    )
    assert_same_factors(out, expected)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_on_adapter_folders_alone_gives_our_dare(
    method: str, tiny_llama: Path, llama_loras: list[Path], tmp_path: Path
) -> None:
    """`model: path/to/lora` (no base+) and global weight / density defaults, as mergekit allows."""
    config = {
        "models": [{"model": str(p)} for p in llama_loras[:2]]
        + [{"model": str(llama_loras[2]), "parameters": {"density": 0.9}}],
        "merge_method": method,
        "parameters": {"weight": 0.5, "density": 0.6},
    }
    code_rc, output, out = run_mergekit(tmp_path, config)
    assert code_rc == 0, output
    expected = native(
        tmp_path,
        {
            "merge_method": method,
            "adapters": [str(p) for p in llama_loras],
            "tasks": [{"name": "math"}, {"name": "code"}, {"name": "chat", "parameters": {"density": 0.9}}],
            "parameters": {"weight": 0.5, "density": 0.6},
            "output": {"heads": "none"},
        },
    )
    assert_same_factors(out, expected)


def test_linear_and_ties_without_density_use_mergekits_defaults() -> None:
    """mergekit's density defaults to 1 (no trimming), ours to 0.2: the converter says 1."""
    ties = convert({"models": [{"model": "b+zoo/x", "parameters": {"weight": 1}}], "merge_method": "ties"})
    assert ties["parameters"] == {"density": 1.0} and ties["base_model"] == "b"
    assert ties["adapters"] == [{"path": "zoo/x", "name": "x"}]
    linear = convert(
        {
            "models": [{"model": "a/x"}, {"model": "b/x@v2"}],
            "merge_method": "linear",
            "parameters": {"weight": 1},
        }
    )
    assert linear["merge_method"] == "linear" and [a["name"] for a in linear["adapters"]] == ["x", "x-2"]
    assert linear["adapters"][1]["path"] == "b/x@v2" and linear["output"] == {
        "format": "peft",
        "heads": "none",
    }
    structured = convert(
        {
            "models": [
                {
                    "model": {"model": {"path": "b"}, "lora": {"path": "o/l", "revision": "r1"}},
                    "parameters": {"weight": 1},
                }
            ],
            "merge_method": "task_arithmetic",
        }
    )
    assert structured["adapters"] == [{"path": "o/l@r1", "name": "l"}] and structured["base_model"] == "b"
    ours = {"merge_method": "ties", "adapters": ["zoo/x"]}
    assert not is_mergekit(ours) and convert(ours) is ours


def test_tokenizer_source_base_is_a_note_and_the_merge_runs(
    tiny_llama: Path, llama_loras: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = {
        "models": [{"model": f"{tiny_llama}+{p}", "parameters": {"weight": 1.0}} for p in llama_loras[:2]],
        "merge_method": "linear",
        "tokenizer_source": "base",
        "dtype": "bfloat16",
    }
    with caplog.at_level(logging.WARNING, logger="mergekit_subspace.merge"):
        code_rc, output, out = run_mergekit(tmp_path, config)
    assert code_rc == 0, output
    assert "tokenizer_source: base" in caplog.text
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"merge_method": "breadcrumbs"}, "merge_method 'breadcrumbs' has no equivalent"),
        ({"merge_method": "della"}, "closest: dare_ties"),
        ({"merge_method": "slerp"}, "merge_method 'slerp' has no equivalent"),
        ({"parameters": {"normalize": False}}, "parameters.normalize: false with ties has no equivalent"),
        ({"parameters": {"rescale": True}}, "parameters.rescale: true with ties has no equivalent"),
        ({"parameters": {"weight": 1, "gamma": 0.1}}, "parameters.gamma has no equivalent"),
        ({"tokenizer_source": "union"}, "tokenizer_source: 'union' has no equivalent"),
        ({"dtype": "float64"}, "dtype 'float64' has no equivalent"),
        ({"slices": []}, "`slices:` (layer ranges per model) has no equivalent"),
        ({"merge_methd": "ties"}, "merge_methd: unknown key"),
        ({"models": [{"model": "{base}+{lora}"}]}, "has no weight (ties requires one"),
        ({"models": [{"model": "{base}"}]}, "lists no adapter besides the base model"),
        ({"models": [{"model": "{base}+a+b", "parameters": {"weight": 1}}]}, "is not 'model' or 'base+lora'"),
        ({"models": [{"model": "elsewhere+{lora}", "parameters": {"weight": 1}}]}, "but base_model is"),
    ],
)
def test_what_has_no_equivalent_is_one_line_and_writes_nothing(
    change: dict, fragment: str, tiny_llama: Path, llama_loras: list[Path], tmp_path: Path
) -> None:
    config: dict = {
        "models": [
            {"model": f"{tiny_llama}+{llama_loras[0]}", "parameters": {"weight": 1.0, "density": 0.5}}
        ],
        "merge_method": "ties",
        "base_model": str(tiny_llama),
    }
    text = (
        yaml.safe_dump({**config, **change})
        .replace("{base}", str(tiny_llama))
        .replace("{lora}", str(llama_loras[0]))
    )
    path = tmp_path / "mergekit.yaml"
    path.write_text(text)
    result = CliRunner().invoke(merge_command, [str(path), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output
    assert fragment in lines[0] and str(path) in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_a_full_model_where_an_adapter_belongs_is_named(tiny_llama: Path, llama_loras: list[Path]) -> None:
    with pytest.raises(SubspaceError, match="is a full model, not a LoRA adapter"):
        convert(
            {"models": [{"model": str(tiny_llama), "parameters": {"weight": 1}}], "merge_method": "linear"}
        )
    with pytest.raises(SubspaceError, match="base model itself: in a linear merge"):
        convert(
            {
                "models": [
                    {"model": str(tiny_llama), "parameters": {"weight": 1}},
                    {"model": str(llama_loras[0]), "parameters": {"weight": 1}},
                ],
                "merge_method": "linear",
                "base_model": str(tiny_llama),
            }
        )


def test_the_example_recipe_converts(tmp_path: Path) -> None:
    """recipes/mergekit-ties.yaml is a plain mergekit config: it converts and validates without its inputs."""
    from mergekit_subspace.merge.recipe import MergeRecipe

    data = yaml.safe_load((Path(__file__).parent.parent / "recipes" / "mergekit-ties.yaml").read_text())
    assert is_mergekit(data)
    recipe = MergeRecipe.model_validate(convert(data))
    assert recipe.merge_method == "ties" and len(recipe.adapters) >= 2
