"""`train`: a new task trained as cores of a store's frozen bases (plus a classifier's head), stored like any
task. Tiny random models for the mechanics: the reconstructed PEFT folder must give the training-time logits."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import WORDS, ids_for, load_base, make_lora, peft_logits
from test_store import compress_zoo

from mergekit_subspace.cli import main
from mergekit_subspace.serve.inject import attach
from mergekit_subspace.subspace import SubspaceStore
from mergekit_subspace.train import TrainRecipe, train_task

CLASSES = 3  # the tiny BERT's head width


def _classification_rows(n: int, seed: int) -> list[dict]:
    """Class c uses words w{30c}..w{30c+29}: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % CLASSES
        words = [f"w{30 * label + rng.randrange(30)}" for _ in range(rng.randint(3, 8))]
        rows.append({"text": " ".join(words), "label": label})
    return rows


def _with_word_tokenizer(model: Path, folder: Path) -> Path:
    """A copy of a tiny model with a whitespace word-level tokenizer over w0..w99 (ids 5..104)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(model, folder)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {token: i for i, token in enumerate(specials + ["[MASK]"] + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="[SEP]",
    )
    fast.save_pretrained(folder)
    return folder


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def bert(tiny_bert: Path, tmp_path: Path) -> Path:
    return _with_word_tokenizer(tiny_bert, tmp_path / "tiny-bert")


@pytest.fixture
def bert_store(bert: Path, bert_zoo: list[Path], tmp_path: Path) -> Path:
    return compress_zoo(tmp_path / "s", bert, bert_zoo[:4], extra="k: 6")


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    return {
        "train": _write_jsonl(tmp_path / "train.jsonl", _classification_rows(96, 0)),
        "val": _write_jsonl(tmp_path / "val.jsonl", _classification_rows(30, 1)),
    }


def _recipe(store: Path, data: dict[str, Path], **extra: object) -> TrainRecipe:
    fields = {
        "store": str(store),
        "name": "trained",
        "task": "sequence_classification",
        "train": str(data["train"]),
        "validation": str(data["val"]),
        "steps": 60,
        "lr": 0.05,
        "batch_size": 16,
        "eval_every": 10,
        "max_length": 16,
        "labels": ["low", "mid", "high"],
    }
    return TrainRecipe.model_validate(fields | extra)


@pytest.mark.parametrize("cores", ["full", "diagonal"])
def test_reconstruction_gives_training_logits(
    bert: Path, bert_store: Path, data: dict[str, Path], tmp_path: Path, cores: str
) -> None:
    """The PEFT folder reconstructed from the stored task, and serving from the store, give the logits of the
    model as it was trained; the task learned (a tiny random BERT learns slowly: above chance, loss down); the manifest records where it came from."""
    result = train_task(_recipe(bert_store, data, cores=cores), progress=False)
    trained = result.entry["trained"]
    losses = [v["loss"] for v in result.outcome.validation]
    assert losses[-1] < losses[0] and trained["validation_accuracy"] >= 0.5  # chance: 1/3
    assert trained["cores"] == cores and trained["train_examples"] == 96

    store = SubspaceStore(bert_store)
    assert "trained" in store.tasks and store.verify() == []
    assert store.manifest["tasks"]["trained"]["labels"] == ["low", "mid", "high"]
    stored = store.cores("trained")
    assert sorted(stored) == store.slots
    for slot, core in stored.items():
        U, V = store.basis(slot)
        assert core.shape == (U.shape[1], V.shape[1])
        if cores == "diagonal":
            off_diagonal = core.clone()
            off_diagonal.diagonal().zero_()
            assert torch.count_nonzero(off_diagonal) == 0 and torch.count_nonzero(core.diagonal()) > 0
    expected_params = sum(
        (U.shape[1] * V.shape[1]) if cores == "full" else min(U.shape[1], V.shape[1])
        for U, V in (store.basis(s) for s in store.slots)
    )
    assert trained["trainable_parameters"]["cores"] == expected_params
    assert trained["trainable_parameters"]["head"] == 32 * CLASSES + CLASSES

    ids = ids_for(bert)
    with torch.no_grad():
        training_logits = result.model(input_ids=ids).logits
    out = store.reconstruct("trained", tmp_path / "rebuilt")
    assert torch.allclose(peft_logits(bert, out), training_logits, atol=1e-5)
    served = attach(load_base(bert), store)
    assert torch.allclose(served.forward(["trained"], input_ids=ids).logits, training_logits, atol=1e-5)


def test_cli_trains_and_info_sees_the_task(bert_store: Path, data: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "train.yaml"
    recipe.write_text(
        f"store: {bert_store}\nname: cli-task\ntask: sequence_classification\ntrain: {data['train']}\n"
        f"validation: {data['val']}\nsteps: 12\nbatch_size: 16\neval_every: 4\npatience: 2\ncores: diagonal\n"
    )
    result = CliRunner().invoke(main, ["train", str(recipe), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "trained 'cli-task'" in result.output
    info = json.loads(CliRunner().invoke(main, ["info", str(bert_store), "--json"]).output)
    assert "cli-task" in info["tasks"]


def test_early_stopping_keeps_the_best_validated_state(bert_store: Path, data: dict[str, Path]) -> None:
    """A learning rate far too high makes the validation loss climb: training stops after `patience` passes
    without improvement and the stored task is the best validated state."""
    result = train_task(_recipe(bert_store, data, steps=60, lr=5.0, eval_every=2, patience=2), progress=False)
    outcome = result.outcome
    assert outcome.stopped_early and outcome.steps_run < 60
    losses = {v["step"]: v["loss"] for v in outcome.validation}
    assert outcome.kept_step == min(losses, key=losses.get)
    assert result.entry["trained"]["kept_step"] == outcome.kept_step


def test_causal_lm_cores_only(tiny_llama: Path, tmp_path: Path) -> None:
    """A causal LM trains its cores only (no head); the reconstruction gives the training-time logits and the
    answer loss went down."""
    base = _with_word_tokenizer(tiny_llama, tmp_path / "llama")
    zoo = [make_lora(tiny_llama, tmp_path / f"z{i}", seed=i, targets=("q_proj", "v_proj")) for i in range(3)]
    store = compress_zoo(tmp_path / "s", base, zoo, extra="k: 4")
    rows = [{"prompt": f"w{i} w{i + 1}", "answer": f"w{(i * 7) % 50 + 50}"} for i in range(40)]
    train = _write_jsonl(tmp_path / "lm.jsonl", rows)
    recipe = TrainRecipe.model_validate(
        {
            "store": str(store),
            "name": "lm",
            "task": "causal_lm",
            "train": str(train),
            "validation": str(train),
            "steps": 30,
            "lr": 0.05,
            "batch_size": 8,
            "eval_every": 5,
            "base_model": str(base),
        }
    )
    result = train_task(recipe, progress=False)
    losses = [v["loss"] for v in result.outcome.validation]
    assert min(losses) < losses[0]
    assert result.entry["trained"]["trainable_parameters"]["head"] == 0
    assert result.entry["peft_config"]["task_type"] == "CAUSAL_LM"
    ids = ids_for(base)
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
    out = SubspaceStore(store).reconstruct("lm", tmp_path / "lm-peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-5)


def _refused(recipe: Path, fragment: str) -> None:
    result = CliRunner().invoke(main, ["train", str(recipe), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert fragment in lines[0], (fragment, lines[0])


BAD = {
    "missing train file": ("train: {tmp}/nope.jsonl", "training data not found"),
    "malformed line": ("train: {bad_json}", "line 2 is not valid JSON"),
    "label outside the head": (
        "train: {out_of_range}\nlabels: [a, b, c]",
        "label 5 is outside the head's range 0..2",
    ),
    "label count inconsistent": ("train: {two_classes}\nlabels: [a, b, c]", "never uses class(es) [2]"),
    "empty set": ("train: {empty}", "training set is empty"),
    "name taken": ("train: {train}\nname: task0", "already in the store"),
    "store missing": ("train: {train}\nstore: {tmp}/no-store", "store not found"),
    "unknown key": ("train: {train}\nepochs: 3", "unknown key"),
    "unknown slot": ("train: {train}\nslots: [nope.query]", "has no slot 'nope.query'"),
    "patience without validation": ("train: {train}\npatience: 2", "patience needs validation"),
    "validation label outside": (
        "train: {train}\nvalidation: {out_of_range}",
        "range.jsonl: example 2: label 5",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_before_training(
    case: str, bert_store: Path, data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One line, exit 2, before any training step, and the store byte-identical."""
    import mergekit_subspace.train.run as run

    monkeypatch.setattr(run, "run_loop", lambda *a, **k: pytest.fail("training started"))
    files = {
        "tmp": tmp_path,
        "train": data["train"],
        "bad_json": _write_jsonl(tmp_path / "bad.jsonl", [{"text": "w1", "label": 0}]),
        "out_of_range": _write_jsonl(
            tmp_path / "range.jsonl", [{"text": "w1", "label": 0}, {"text": "w2", "label": 5}]
        ),
        "two_classes": _write_jsonl(
            tmp_path / "two.jsonl", [{"text": "w1", "label": 0}, {"text": "w2", "label": 1}]
        ),
        "empty": tmp_path / "empty.jsonl",
    }
    files["bad_json"].write_text('{"text": "w1", "label": 0}\n{"text": oops}\n')
    files["empty"].write_text("\n")
    body, fragment = BAD[case]
    keys = dict(line.split(": ", 1) for line in body.format(**files).splitlines())
    recipe_keys = {"store": str(bert_store), "name": "new", "task": "sequence_classification"} | keys
    recipe = tmp_path / "r.yaml"
    recipe.write_text("".join(f"{k}: {v}\n" for k, v in recipe_keys.items()))
    before = snapshot(bert_store)
    _refused(recipe, fragment)
    assert snapshot(bert_store) == before


def test_interrupted_run_leaves_the_store_as_it_was(
    bert_store: Path, data: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in the middle of training: nothing is written."""
    import mergekit_subspace.train.loop as loop

    calls = {"n": 0}
    real = loop.collate

    def interrupt_at_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "collate", interrupt_at_third)
    before = snapshot(bert_store)
    with pytest.raises(KeyboardInterrupt):
        train_task(_recipe(bert_store, data), progress=False)
    assert snapshot(bert_store) == before
