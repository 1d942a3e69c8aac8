"""The mixed zoo's data side: each source's tasks are deterministic, balanced and leak nothing from train to eval."""

from __future__ import annotations

from collections import Counter

import pytest

from benchmarks.zoos import mixed
from benchmarks.zoos.text import zoo_settings


@pytest.fixture(scope="module", params=mixed.SOURCES)
def pools(request: pytest.FixtureRequest) -> tuple[str, dict[str, tuple[str, ...]]]:
    try:
        return request.param, mixed.source_pools(request.param)
    except mixed.DataMissing as exc:  # a machine without that source's Debian package
        pytest.skip(str(exc))


def test_tasks_are_deterministic_balanced_and_disjoint(pools: tuple[str, dict[str, tuple[str, ...]]]) -> None:
    source, pool = pools
    tasks = mixed.source_tasks(source, pool, n_tasks=3, n_train=32, n_test=16)
    again = mixed.source_tasks(source, pool, n_tasks=2, n_train=32, n_test=16)
    assert [t.fingerprint() for t in again] == [t.fingerprint() for t in tasks[:2]]  # task j ignores n_tasks
    assert len({t.name for t in tasks}) == 3
    owner = {text: label for label, texts in pool.items() for text in texts}
    for task in tasks:
        assert task.name.startswith(f"{source}-") and len(task.labels) == mixed.N_CLASSES
        assert Counter(y for _, y in task.train) == dict.fromkeys(range(mixed.N_CLASSES), 32)
        assert Counter(y for _, y in task.test) == dict.fromkeys(range(mixed.N_CLASSES), 16)
        train, test = {t for t, _ in task.train}, {t for t, _ in task.test}
        assert len(train) == len(task.train) and len(test) == len(task.test)
        assert not train & test
        for text, y in task.train + task.test:  # every text carries the one label it was found under
            assert task.labels[y] == f"{source}:{owner[text]}"


def test_pools_drop_texts_with_two_labels() -> None:
    packages = (
        "Package: a\nSection: games\nDescription: shared words here\n\n"
        "Package: b\nSection: contrib/science\nDescription: shared words here\n\n"
        "Package: c\nSection: science\nDescription:  a  star   chart\n"
    )
    assert mixed.parse_packages(packages) == {
        "games": ("shared words here",),
        "science": ("shared words here", "a star chart"),
    }


def test_troff_paragraphs_keep_prose_and_drop_markup() -> None:
    page = "\n".join(
        [
            '.\\" a comment',
            '.TH open 2 2023-02-05 "Linux man-pages 6.03"',
            ".SH NAME",
            "open \\- open a file",
            ".SH DESCRIPTION",
            "The",
            ".BR open ()",
            "system call opens the file \\fIpathname\\fP.",
            ".PP",
            "A second paragraph\\(emwith a dash.",
            ".SH SEE ALSO",
            ".BR close (2)",
        ]
    )
    section, paragraphs = mixed.troff_paragraphs(page)
    assert section == "2"
    assert paragraphs == [
        "The open() system call opens the file pathname.",
        "A second paragraph-with a dash.",
    ]
    assert mixed.troff_paragraphs(".so man2/open.2\n") == ("", [])


def test_sources_rotate_so_each_meets_every_setting() -> None:
    order = [mixed.source_of(i) for i in range(24)]
    assert Counter(order) == dict.fromkeys(mixed.SOURCES, 6)
    for source in mixed.SOURCES:
        settings = [zoo_settings(i) for i in range(24) if order[i] == source]
        assert {s["r"] for s in settings} == {4, 8, 16}
        assert {tuple(s["target_modules"]) for s in settings} == {
            ("query", "value"),
            ("query", "key", "value"),
        }
