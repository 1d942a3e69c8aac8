"""Label names: read from id2label at compress, kept in the store, returned by serve; a random head is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_lora, write_recipe

from mergekit_subspace.cli import main
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.recipe import SubspaceSettings
from mergekit_subspace.sources import lora_task
from mergekit_subspace.subspace import SubspaceStore

NAMES = ["animal", "plant", "rock"]


def save_labels(folder: Path, names: list[str]) -> None:
    """What `model.config.save_pretrained(adapter_dir)` leaves beside an adapter: id2label among the rest."""
    (folder / "config.json").write_text(
        json.dumps({"model_type": "bert", "id2label": {str(i): n for i, n in enumerate(names)}})
    )


@pytest.fixture(scope="module")
def labelled(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A headless copy of the base (its classifier is not in the checkpoint) and three tasks: 'named' (own head,
    id2label), 'plain' (own head, no names) and 'headless' (no head of its own)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, BertModel

    root = tmp_path_factory.mktemp("labels")
    headless = root / "headless-base"
    BertModel.from_pretrained(tiny_bert).save_pretrained(headless)
    named = make_lora(tiny_bert, root / "zoo" / "named", seed=0, r=2)
    save_labels(named, NAMES)
    plain = make_lora(tiny_bert, root / "zoo" / "plain", seed=1, r=2)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    bare = get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"]))  # no task_type: no head
    bare.save_pretrained(root / "zoo" / "headless")
    store = SubspaceStore.from_tasks(
        [lora_task(p) for p in (named, plain, root / "zoo" / "headless")],
        SubspaceSettings(k=8),
        root / "store",
        progress=False,
    )
    return {"root": root, "store": store, "headless": headless, "base": tiny_bert}


def test_labels_are_kept_in_the_store(labelled: dict) -> None:
    tasks = labelled["store"].manifest["tasks"]
    assert tasks["named"]["labels"] == NAMES
    assert "labels" not in tasks["plain"] and "labels" not in tasks["headless"]


def test_python_api_returns_names_and_refuses_a_random_head(labelled: dict) -> None:
    from mergekit_subspace.serve.loading import load_served

    served, kind = load_served(labelled["store"].path, labelled["headless"])
    assert kind == "classify" and served.untrained_heads >= {"classifier"}
    ids = torch.tensor([[2, 7, 9, 3], [2, 11, 5, 3]])
    rows = served.classify(["named", "plain"], input_ids=ids)
    assert rows[0].label == NAMES[rows[0].label_id] and len(rows[0].scores) == 3
    assert rows[1].label == f"LABEL_{rows[1].label_id}"
    logits = served.forward(["named", "plain"], input_ids=ids).logits
    assert [r.label_id for r in rows] == logits.argmax(-1).tolist()
    for task in (None, "base", "headless"):
        with pytest.raises(SubspaceError, match="randomly initialised"):
            served.classify([task], input_ids=ids[:1])
    assert served.labels("named") == NAMES and served.labels("plain") is None
    added = make_lora(labelled["base"], labelled["root"] / "later" / "added", seed=5, r=2)
    save_labels(added, ["x", "y", "z"])
    labelled["store"].add(added)  # add keeps labels as compress does; a running server picks them up
    assert served.refresh() == ["added"] and served.labels("added") == ["x", "y", "z"]


def test_http_names_labels_describes_models_and_refuses_the_bare_base(labelled: dict) -> None:
    from fastapi.testclient import TestClient

    from mergekit_subspace.serve.app import create_app
    from mergekit_subspace.serve.engine import Engine
    from mergekit_subspace.serve.loading import load_served, load_tokenizer

    served, kind = load_served(labelled["store"].path, labelled["headless"])
    engine = Engine(served, load_tokenizer(labelled["base"], kind), kind)
    with TestClient(create_app(engine)) as client:
        reply = client.post("/v1/classify", json={"model": "named", "input": ["w1 w2", "w3"]})
        assert reply.status_code == 200, reply.text
        for row in reply.json()["data"]:
            assert row["label"] == NAMES[row["label_id"]] and len(row["scores"]) == 3
        for task in ("base", "headless"):
            refused = client.post("/v1/classify", json={"model": task, "input": ["w1"]})
            assert refused.status_code == 400
            assert "randomly initialised" in refused.json()["error"]["message"]
        listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert listed["named"]["labels"] == NAMES and listed["named"]["head"] == "own"
        assert listed["plain"]["labels"] is None and listed["plain"]["num_labels"] == 3
        assert not listed["base"]["classifiable"] and not listed["headless"]["classifiable"]
        assert listed["named"]["classifiable"] and listed["named"]["kind"] == "classify"
        one = client.get("/v1/models/named").json()
        assert one == listed["named"] | {"created": one["created"]}
        missing = client.get("/v1/models/nope")
        assert missing.status_code == 404 and "named" in missing.json()["error"]["message"]


def test_a_bad_id2label_is_refused_in_one_line(tiny_bert: Path, tmp_path: Path) -> None:
    adapter = make_lora(tiny_bert, tmp_path / "zoo" / "gap", seed=0, r=2)
    (adapter / "config.json").write_text(json.dumps({"id2label": {"0": "a", "2": "c"}}))
    recipe = write_recipe(tmp_path / "r.yaml", f"adapters: ['{tmp_path}/zoo/*']\noutput: {tmp_path}/store\n")
    result = CliRunner().invoke(main, ["compress", str(recipe)])
    assert result.exit_code == 2
    assert "config.json" in result.output and "without gaps" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "store").exists()
