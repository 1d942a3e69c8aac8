"""Hub ids (`org/name[@revision]`) read from a Hugging Face cache laid out in tmp_path, never the network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from mergekit_subspace import hub
from mergekit_subspace.cli import main
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.merge import merge
from mergekit_subspace.serve.command import serve
from mergekit_subspace.subspace import SubspaceStore
from tests.conftest import make_lora

COMMIT_BASE = "1" * 40
COMMIT_LORA = "a" * 40
COMMIT_LORA_V2 = "b" * 40
TARGETS = ("q_proj", "v_proj")


def cache_repo(
    cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)
) -> Path:
    """`folder` as the hub cache holds a download: models--org--name/snapshots/<commit>/, refs/<ref>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def loras(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    zoo = tmp_path_factory.mktemp("hub-zoo")
    return [make_lora(tiny_llama, zoo / f"lora{i}", seed=i, targets=TARGETS) for i in range(3)]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama: Path, loras: list[Path]) -> Path:
    """HF_HUB_CACHE in tmp_path with a base model and an adapter at two revisions; the cwd is tmp_path/work."""
    root = tmp_path / "hf" / "hub"
    root.mkdir(parents=True)
    cache_repo(root, "org/tiny-llama", tiny_llama, COMMIT_BASE)
    cache_repo(root, "org/tiny-lora", loras[0], COMMIT_LORA)
    cache_repo(root, "org/tiny-lora", loras[1], COMMIT_LORA_V2, refs=("v2",))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return root


def snapshot(cache: Path, repo_id: str, commit: str) -> Path:
    return cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit


def test_hub_ids_resolve_to_cached_snapshots_by_ref_or_commit(cache: Path) -> None:
    lora = snapshot(cache, "org/tiny-lora", COMMIT_LORA)
    assert hub.resolve("org/tiny-lora") == lora
    assert hub.resolve("org/tiny-lora@main") == lora
    assert hub.resolve(f"org/tiny-lora@{COMMIT_LORA_V2}") == snapshot(cache, "org/tiny-lora", COMMIT_LORA_V2)
    assert hub.resolve("org/tiny-lora@v2") == snapshot(cache, "org/tiny-lora", COMMIT_LORA_V2)
    assert hub.hub_origin(lora) == {"hub_id": "org/tiny-lora", "commit": COMMIT_LORA}
    # not spelled like a hub id: left to the caller, which reports a missing folder as before
    for path in ("missing", "a/b/c", "./a/b", "/abs/x"):
        assert hub.resolve(path) == Path(path)


def test_hf_home_is_respected(cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub.cache_dir() == cache
    assert hub.resolve("org/tiny-llama") == snapshot(cache, "org/tiny-llama", COMMIT_BASE)


def test_an_uncached_id_says_how_to_fetch_it(cache: Path) -> None:
    with pytest.raises(SubspaceError) as info:
        hub.resolve("org/absent", "recipe.yaml")
    message = str(info.value)
    assert message.startswith("recipe.yaml: 'org/absent' is neither a folder here nor a model in the")
    assert "huggingface-cli download org/absent" in message and str(cache) in message
    with pytest.raises(SubspaceError, match=r"at revision 'dev'.*--revision dev"):
        hub.resolve("org/tiny-lora@dev")


def test_a_local_folder_wins_over_the_hub_id_of_the_same_spelling(cache: Path, loras: list[Path]) -> None:
    shutil.copytree(loras[2], Path("org/tiny-lora"))
    assert hub.resolve("org/tiny-lora") == Path("org/tiny-lora")
    store = SubspaceStore.compress(
        _recipe({"adapters": ["org/tiny-lora"], "subspace": {"k": 4}, "output": "store"}), progress=False
    )
    entry = store.manifest["tasks"]["tiny-lora"]
    assert entry["source"] == "org/tiny-lora" and "source_hub_id" not in entry


def _recipe(data: dict, name: str = "recipe.yaml") -> Path:
    path = Path(name)
    path.write_text(yaml.safe_dump(data))
    return path


def test_compress_records_hub_ids_and_commits_in_the_manifest(cache: Path, loras: list[Path]) -> None:
    recipe = _recipe(
        {
            "base_model": "org/tiny-llama",
            "adapters": ["org/tiny-lora", {"path": "org/tiny-lora@v2", "name": "second"}, str(loras[2])],
            "subspace": {"k": 4},
            "output": "store",
        }
    )
    result = CliRunner().invoke(main, ["compress", str(recipe)])
    assert result.exit_code == 0, result.output
    manifest = json.loads(Path("store/manifest.json").read_text())
    base = manifest["base_model"]
    assert base["hub_id"] == "org/tiny-llama" and base["commit"] == COMMIT_BASE
    assert base["path"] == str(snapshot(cache, "org/tiny-llama", COMMIT_BASE))
    tasks = manifest["tasks"]
    assert sorted(tasks) == ["lora2", "second", "tiny-lora"]  # a hub adapter is named after its repository
    assert tasks["tiny-lora"]["source_hub_id"] == "org/tiny-lora"
    assert tasks["tiny-lora"]["source_commit"] == COMMIT_LORA
    assert tasks["second"]["source_commit"] == COMMIT_LORA_V2
    assert "source_hub_id" not in tasks["lora2"]
    assert SubspaceStore("store").verify() == []


def test_an_uncached_adapter_is_one_line_and_writes_nothing(cache: Path) -> None:
    recipe = _recipe({"adapters": ["org/tiny-lora", "org/not-downloaded"], "output": "store"})
    result = CliRunner().invoke(main, ["compress", str(recipe)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "recipe.yaml" in lines[0] and "huggingface-cli download org/not-downloaded" in lines[0]
    assert not Path("store").exists()
    base = _recipe({"base_model": "org/no-base", "adapters": ["org/tiny-lora"], "output": "store"}, "b.yaml")
    result = CliRunner().invoke(main, ["compress", str(base)])
    assert result.exit_code == 2 and "huggingface-cli download org/no-base" in result.output


def test_merge_recipes_native_and_mergekit_take_hub_ids(cache: Path, loras: list[Path]) -> None:
    native = merge(
        {
            "merge_method": "task_arithmetic",
            "base_model": "org/tiny-llama",
            "adapters": ["org/tiny-lora", {"path": "org/tiny-lora@v2", "name": "second"}],
            "output": {"heads": "none"},
        },
        out="native",
        progress=False,
    )
    assert sorted(native.report["tasks"]) == ["second", "tiny-lora"]
    mergekit = {
        "models": [
            {"model": "org/tiny-llama+org/tiny-lora", "parameters": {"weight": 1.0}},
            {"model": "org/tiny-llama+org/tiny-lora@v2", "parameters": {"weight": 1.0}},
        ],
        "merge_method": "task_arithmetic",
        "base_model": "org/tiny-llama",
    }
    result = CliRunner().invoke(main, ["merge", str(_recipe(mergekit, "mk.yaml")), "--out", "mk"])
    assert result.exit_code == 0, result.output
    ours, theirs = load_file("native/adapter_model.safetensors"), load_file("mk/adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs) and all(ours[k].equal(theirs[k]) for k in ours)


def test_serve_takes_the_stores_base_and_says_when_another_is_given(
    cache: Path, tiny_llama: Path, tiny_bert: Path, tmp_path: Path
) -> None:
    SubspaceStore.compress(
        _recipe(
            {
                "base_model": "org/tiny-llama",
                "adapters": ["org/tiny-lora"],
                "subspace": {"k": 4},
                "output": "s",
            }
        ),
        progress=False,
    )
    recorded = SubspaceStore("s").manifest["base_model"]
    path, note = hub.store_base(recorded, None)
    assert path == snapshot(cache, "org/tiny-llama", COMMIT_BASE) and "from the store's manifest" in note
    assert hub.store_base(recorded, str(tiny_llama)) == (tiny_llama, None)  # same config: the same base
    path, note = hub.store_base(recorded, str(tiny_bert))
    assert path == tiny_bert and note is not None and "not the base model the store was fit on" in note
    assert "org/tiny-llama" in note
    # on another machine the recorded path is gone: the hub id and commit find the snapshot in its cache
    moved = dict(recorded, path=str(tmp_path / "elsewhere" / "snapshot"))
    assert hub.store_base(moved, None)[0] == snapshot(cache, "org/tiny-llama", COMMIT_BASE)
    with pytest.raises(SubspaceError, match="records no base model: pass --base"):
        hub.store_base(None, None, "s")
    SubspaceStore.compress(
        _recipe({"adapters": ["org/tiny-lora"], "subspace": {"k": 4}, "output": "nobase"}, "n.yaml"),
        progress=False,
    )
    result = CliRunner().invoke(serve, ["nobase"])
    assert result.exit_code == 2 and "nobase: records no base model: pass --base MODEL" in result.output
