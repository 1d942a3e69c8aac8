"""Property-based fuzzing (hypothesis) of recipes, adapter configs and store manifests: whatever the input, the
result is a value or a SubspaceError with one line, never another exception (a traceback on the command line).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from conftest import make_lora, write_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_subspace.cli import main
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.io.peft import read_lora_adapter
from mergekit_subspace.io.store import MANIFEST, manifest_digest
from mergekit_subspace.merge.methods import METHODS
from mergekit_subspace.merge.recipe import merge_recipe_from_dict
from mergekit_subspace.recipe import parse_compress_recipe
from mergekit_subspace.subspace import SubspaceStore

# random exploration on a developer's machine; on CI a fixed, reproducible set (a red run must be re-runnable)
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

NASTY_TEXT = st.sampled_from(
    [
        "",
        "../x",
        "/etc/passwd",
        "tasks/../../x.safetensors",
        "load",
        "int4",
        "float16",
        "(",
        "[",
        "*",
        "a" * 300,
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | NASTY_TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | NASTY_TEXT, inner, max_size=4)
    ),
    max_leaves=12,
)


def one_line_error(exc: SubspaceError) -> None:
    text = str(exc)
    assert "\n" not in text and len(text) <= 2100, text[:300]


# ---- recipes --------------------------------------------------------------------------------------------

SETTINGS_KEYS = [
    "k",
    "k_in",
    "budget_bytes",
    "energy",
    "normalize",
    "refine",
    "dtype",
    "solver",
    "oversample",
]


def _mapping(keys: list[str]) -> st.SearchStrategy[dict]:
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), JSON, max_size=len(keys))


COMPRESS = st.fixed_dictionaries(
    {},
    optional={
        "base_model": JSON,
        "adapters": st.lists(JSON | _mapping(["path", "name"]), max_size=3) | JSON,
        "finetunes": st.lists(_mapping(["path", "name", "max_rank"]), max_size=2) | JSON,
        "subspace": _mapping(SETTINGS_KEYS) | JSON,
        "output": JSON,
        "junk": JSON,
    },
)
PARAMETER = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4)
    | st.lists(_mapping(["filter", "value"]), max_size=3)
    | JSON
)
PARAMETERS = st.dictionaries(
    st.sampled_from(["weight", "density", "lambda", "seed", "common_fraction"]) | st.text(max_size=5),
    PARAMETER,
    max_size=4,
)
MERGE = st.fixed_dictionaries(
    {"merge_method": st.sampled_from(sorted(METHODS)) | JSON},
    optional={
        "store": JSON,
        "adapters": st.lists(JSON, max_size=3) | JSON,
        "base_model": JSON,
        "tasks": st.lists(
            st.fixed_dictionaries(
                {"name": st.text(max_size=6) | JSON},
                optional={"weight": PARAMETER, "parameters": PARAMETERS, "validation": JSON},
            ),
            max_size=3,
        )
        | JSON,
        "parameters": PARAMETERS | JSON,
        "validation": _mapping(["lambda_grid", "max_examples", "batch_size"]) | JSON,
        "output": _mapping(["path", "format", "rank", "heads", "max_shard_size", "dtype"]) | JSON,
        "subspace": _mapping(SETTINGS_KEYS) | JSON,
    },
)


@FUZZ
@given(data=COMPRESS)
def test_compress_recipes(tmp_path_factory: pytest.TempPathFactory, data: dict) -> None:
    path = tmp_path_factory.mktemp("fuzz-recipe") / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    try:
        parse_compress_recipe(path)
    except SubspaceError as exc:
        one_line_error(exc)


@FUZZ
@given(data=MERGE)
def test_merge_recipes(data: dict) -> None:
    try:
        merge_recipe_from_dict(data, "merge.yaml")
    except SubspaceError as exc:
        one_line_error(exc)


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_recipe_text(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("fuzz-text") / "recipe.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        parse_compress_recipe(path)
    except SubspaceError as exc:
        one_line_error(exc)


# ---- adapter configs ------------------------------------------------------------------------------------

CONFIG_KEYS = [
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "modules_to_save",
    "fan_in_fan_out",
    "use_dora",
    "bias",
    "layers_to_transform",
    "task_type",
]


@pytest.fixture(scope="module")
def adapter(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora(tiny_bert, tmp_path_factory.mktemp("fuzz-adapter") / "a", seed=0, r=4)


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON, max_size=4),
    dropped=st.lists(st.sampled_from(CONFIG_KEYS), max_size=2),
)
def test_adapter_configs(
    adapter: Path, tmp_path_factory: pytest.TempPathFactory, changes: dict, dropped: list
) -> None:
    folder = tmp_path_factory.mktemp("fuzz-config") / "a"
    shutil.copytree(adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    for key in dropped:
        config.pop(key, None)
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    try:
        read = read_lora_adapter(folder)
    except SubspaceError as exc:
        one_line_error(exc)
        return
    for module in read.slots:  # an accepted config gives finite, positive scales
        delta = read.slots[module]
        assert delta.scale > 0 and delta.scale == delta.scale and delta.scale != float("inf")
    shutil.rmtree(folder.parent)


# ---- manifests ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-store")
    for i, r in enumerate((4, 2)):
        make_lora(tiny_bert, root / "zoo" / f"t{i}", seed=i, r=r)
    recipe = write_recipe(
        root / "recipe.yaml",
        f"adapters: ['{root}/zoo/*']\nsubspace: {{k: 3, dtype: int8}}\noutput: {root / 's'}\n",
    )
    assert CliRunner().invoke(main, ["compress", str(recipe)]).exit_code == 0
    return root / "s"


def paths_of(tree: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += paths_of(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found += paths_of(value, (*prefix, index))
    return found


def mutate(raw: dict, path: tuple, action: str, value: Any) -> None:
    if not path:
        return
    parent = raw
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "add" and isinstance(parent[last], dict):
        parent[last][str(value)[:20]] = value
    else:
        parent[last] = value


@FUZZ
@given(data=st.data())
def test_manifests(store: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    """A manifest with one random change (its own digest recomputed, as by someone who knows the format):
    open, info, verify and reconstruct either work or raise SubspaceError."""
    pristine = json.loads((store / MANIFEST).read_text())
    work = tmp_path_factory.mktemp("fuzz-manifest") / "s"
    shutil.copytree(store, work)
    raw = copy.deepcopy(pristine)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = paths_of(raw)
        path = data.draw(st.sampled_from(paths))
        mutate(raw, path, data.draw(st.sampled_from(["replace", "delete", "add"])), data.draw(JSON))
    if data.draw(st.booleans()):
        raw["manifest_sha256"] = manifest_digest(raw)
    (work / MANIFEST).write_text(json.dumps(raw))
    try:
        opened = SubspaceStore(work)
        opened.info()
        opened.verify()
        for name in opened.tasks:
            opened.reconstruct(name, work.parent / f"out-{name}")
    except SubspaceError as exc:
        one_line_error(exc)
    shutil.rmtree(work.parent)
