"""A mixed zoo: all-MiniLM-L6-v2 LoRAs on four unrelated real text sources, for leave-one-out on a mix.

The WordNet zoo (``benchmarks.zoos.text``) is homogeneous: every task classifies noun glosses.  A basis
shared by tasks that read different kinds of text is the harder, more honest case (DESIGN.md, "Mixed
zoos").  Each task here is a 4-way classification drawn from one of four sources:

- ``py``: Python standard-library docstring paragraphs, labelled by the top-level module or package they
  come from (``asyncio`` vs ``email`` vs ...).  Read with ``ast`` from the interpreter's own stdlib source
  (nothing is imported), so they are the same on any machine with the same Python version.
- ``deb``: Debian package short descriptions, labelled by archive section (``games`` vs ``science`` ...),
  from ``apt-cache dumpavail``.  On a fresh machine run ``apt-get update`` first (the lists it fetches are
  the data; each task's data hash is in its cache key, so a newer snapshot retrains instead of mixing).
- ``man``: paragraphs of the Linux man-pages project, labelled by manual section (2 system calls, 3 C
  library, 3 libm, 4 devices, 5 file formats, 7 overviews).  Only pages shipped by the Debian packages
  ``manpages`` and ``manpages-dev`` are read (their dpkg file lists say which), so other installed
  software does not change the data: ``apt-get install -y manpages manpages-dev``.
- ``wnv``: WordNet *verb* glosses by verb supersense (``verb.motion`` vs ``verb.emotion`` ...), from
  Debian's ``wordnet-base`` (read by ``benchmarks.zoos.text.load_glosses``); a different vocabulary and
  label set from the noun zoo.

Adapter ``i`` draws its task from source ``(i + i // 3 + i // 6) % 4`` and takes ``zoo_settings(i)`` from the text
zoo (ranks 4/8/16, varied alpha, query/value or query/key/value, rsLoRA on some), so every source gets a
mix of settings and a bigger zoo extends a smaller one.  Training, evaluation, caching and resumption are
the text zoo's (``train_lora``, ``evaluate_adapter``, ``build_zoo``).

    python -m benchmarks.zoos.mixed --out benchmarks/cache/mixed [--n 24] [--steps 40]
"""

from __future__ import annotations

import argparse
import ast
import functools
import gzip
import os
import random
import re
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Sequence
from math import comb
from pathlib import Path
from typing import Any

from benchmarks.zoos._common import ZooItem, build_zoo, file_sha256, hash_json
from benchmarks.zoos.text import (
    DEFAULT_WORDNET_DIR,
    TextTask,
    _readable,
    cache_key,
    load_glosses,
    minilm_path,
    train_lora,
    write_eval_jsonl,
    zoo_settings,
)

DEFAULT_N_TRAIN = 96  # examples per class
DEFAULT_N_TEST = 48  # examples per class
DEFAULT_STEPS = 40
N_CLASSES = 4
SOURCES: tuple[str, ...] = ("py", "deb", "man", "wnv")
MIN_CHARS = 40  # shorter docstring / man paragraphs are mostly signatures and cross-references
MAX_CHARS = 120  # longer ones are cut at a word: ~30 tokens, so a training step costs what a gloss step does

# Stdlib modules and packages with >= 144 docstring paragraphs in CPython 3.11 that Debian ships in
# libpython3.11-stdlib itself (tkinter, turtle and distutils are separate Debian packages: left out).
PY_MODULES: tuple[str, ...] = (
    "asyncio",
    "email",
    "importlib",
    "xml",
    "_pydecimal",
    "logging",
    "unittest",
    "http",
    "typing",
    "urllib",
    "doctest",
    "ipaddress",
    "multiprocessing",
    "inspect",
    "difflib",
    "statistics",
)
# Sections about a subject (not "libs", "devel", "misc", ... whose packages are about anything).
DEB_SECTIONS: tuple[str, ...] = (
    "games",
    "science",
    "math",
    "sound",
    "graphics",
    "video",
    "net",
    "web",
    "mail",
    "hamradio",
    "electronics",
    "education",
    "editors",
    "fonts",
    "database",
    "text",
    "admin",
    "gnu-r",
)
MAN_PACKAGES: tuple[str, ...] = ("manpages", "manpages-dev")
DPKG_INFO = Path("/var/lib/dpkg/info")

_PARAGRAPH_MACROS = {
    "PP",
    "P",
    "LP",
    "TP",
    "IP",
    "SH",
    "SS",
    "HP",
    "sp",
    "br",
    "nf",
    "fi",
    "RS",
    "RE",
    "EX",
    "EE",
}
_SKIP_SECTIONS = {"NAME", "SYNOPSIS", "LIBRARY", "SEE ALSO", "COLOPHON", "AUTHORS", "COPYRIGHT", "EXAMPLES"}
_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),
    (re.compile(r"\\\((em|en|hy)"), "-"),
    (re.compile(r"\\\(.."), " "),
    (re.compile(r"\\\[[^\]]*\]"), " "),
    (re.compile(r"\\[-e]"), lambda m: "-" if m.group(0) == "\\-" else "\\"),
    (re.compile(r"\\[&|^%:]"), ""),
    (re.compile(r"\\s[-+]?\d"), ""),
    (re.compile(r"\\(.)"), r"\1"),
]


class DataMissing(RuntimeError):
    """A source's data is not on this machine; the message says how to get it."""


# --------------------------------------------------------------------------- sources


@functools.lru_cache(maxsize=2)
def python_docstrings(stdlib: str | None = None) -> dict[str, tuple[str, ...]]:
    """Docstring paragraphs (>= MIN_CHARS, whitespace-normalized) per module in ``PY_MODULES``, in file order."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    out: dict[str, tuple[str, ...]] = {}
    for name in PY_MODULES:
        package, module = root / name, root / f"{name}.py"
        files = sorted(package.rglob("*.py")) if package.is_dir() else [module]
        files = [f for f in files if f.is_file() and "tests" not in f.relative_to(root).parts]
        if not files:
            raise DataMissing(f"{root}: standard-library module {name!r} not found (use CPython 3.11)")
        texts: dict[str, None] = {}
        for path in files:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    for para in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                        text = " ".join(para.split())
                        if len(text) >= MIN_CHARS:
                            texts[text] = None
        out[name] = tuple(texts)
    return out


def parse_packages(text: str) -> dict[str, tuple[str, ...]]:
    """Short descriptions per section (``contrib/``, ``non-free/`` prefixes dropped) from Packages stanzas."""
    out: dict[str, dict[str, None]] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line[:1] not in (" ", "\t") and ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        section = fields.get("Section", "").rsplit("/", 1)[-1]
        description = " ".join(fields.get("Description", "").split())
        if section and description:
            out.setdefault(section, {})[description] = None
    return {section: tuple(texts) for section, texts in out.items()}


@functools.lru_cache(maxsize=2)
def debian_descriptions(packages_file: str | None = None) -> dict[str, tuple[str, ...]]:
    """Debian package short descriptions per section, from ``packages_file`` or ``apt-cache dumpavail``."""
    how = "run `apt-get update` (the package lists are the data) or pass --debian-packages FILE"
    if packages_file:
        text = Path(packages_file).read_text(encoding="utf-8", errors="replace")
    else:
        try:
            done = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise DataMissing(f"apt-cache not found: Debian package descriptions need apt; {how}") from None
        text = done.stdout
    sections = parse_packages(text)
    if sum(len(v) for v in sections.values()) < 1000:
        raise DataMissing(f"apt-cache dumpavail lists almost no packages: {how}")
    return sections


def troff_paragraphs(source: str) -> tuple[str, list[str]]:
    """A man page's section and its body paragraphs as plain text (NAME, SYNOPSIS, SEE ALSO ... left out).

    A rough reader of the man(7) macros: enough to get running prose out of the man-pages project's
    sources, not a formatter.  Returns ``("", [])`` for a ``.so`` alias page.
    """
    section, heading, current, paragraphs = "", "", [], []

    def flush() -> None:
        text = " ".join(" ".join(current).split())
        if text and heading not in _SKIP_SECTIONS:
            paragraphs.append(text)
        current.clear()

    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            macro, _, args = line[1:].strip().partition(" ")
            if macro == "so":
                return "", []
            if macro == "TH":
                parts = args.split()
                section = parts[1] if len(parts) > 1 else ""
                continue
            if macro in _PARAGRAPH_MACROS:
                flush()
                if macro in ("SH", "SS"):
                    if macro == "SH":
                        heading = args.strip().strip('"').upper()
                    continue
                if macro == "IP" and args:
                    current.append(_plain(args.split('"')[1] if args.startswith('"') else args.split()[0]))
                continue
            if macro in ("B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "SB"):
                words = re.findall(r'"([^"]*)"|(\S+)', args)
                current.append(_plain("".join(a or b for a, b in words) if len(macro) == 2 else args))
            continue  # other requests (.in, .ad, .TS tables ...) carry no prose
        current.append(_plain(line))
    flush()
    return section, paragraphs


def _plain(text: str) -> str:
    for pattern, repl in _ESCAPES:
        text = pattern.sub(repl, text)
    return text.replace('"', "")


def _man_files(info_dir: Path) -> list[Path]:
    files: list[Path] = []
    for package in MAN_PACKAGES:
        listing = info_dir / f"{package}.list"
        if not listing.is_file():
            raise DataMissing(
                f"{listing}: Debian package {package!r} is not installed; "
                "run `apt-get install -y manpages manpages-dev`"
            )
        for line in listing.read_text(encoding="utf-8").splitlines():
            if re.fullmatch(r"/usr/share/man/man[0-9]/[^/]+\.[0-9][a-z]*(\.gz)?", line):
                files.append(Path(line))
    return sorted(set(files))


@functools.lru_cache(maxsize=2)
def man_paragraphs(info_dir: str = str(DPKG_INFO)) -> dict[str, tuple[str, ...]]:
    """Paragraphs (>= MIN_CHARS) of the man-pages project per class: ``2``, ``3``, ``3m`` (libm), ``4``, ``5``, ``7``."""
    out: dict[str, dict[str, None]] = {}
    for path in _man_files(Path(info_dir)):
        if not path.is_file():
            continue  # listed but removed (dpkg path-exclude); the task data hash notices
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        source = raw.decode("utf-8", errors="replace")
        section, paragraphs = troff_paragraphs(source)
        label = section[:1]
        if label == "3" and re.search(r"^\.SH LIBRARY\s*\n[^\n]*[Mm]ath library", source, re.M):
            label = "3m"
        if label not in ("2", "3", "3m", "4", "5", "7"):
            continue
        bucket = out.setdefault(label, {})
        for text in paragraphs:
            if len(text) >= MIN_CHARS:
                bucket[text] = None
    return {label: tuple(texts) for label, texts in sorted(out.items())}


def verb_glosses(wordnet_dir: str = DEFAULT_WORDNET_DIR) -> dict[str, tuple[str, ...]]:
    """WordNet verb glosses per verb supersense (``verb.motion`` -> ``motion``)."""
    try:
        glosses = load_glosses(wordnet_dir)
    except FileNotFoundError as exc:
        raise DataMissing(str(exc)) from None
    return {name[5:]: tuple(texts) for name, texts in glosses.items() if name.startswith("verb.")}


# ----------------------------------------------------------------------------- tasks


def source_pools(
    source: str,
    *,
    wordnet_dir: str = DEFAULT_WORDNET_DIR,
    packages_file: str | None = None,
    man_info_dir: str = str(DPKG_INFO),
) -> dict[str, tuple[str, ...]]:
    """Label -> texts for one source, with texts found under more than one label dropped (no right answer)."""
    if source == "py":
        raw = python_docstrings()
    elif source == "deb":
        everything = debian_descriptions(packages_file)
        raw = {s: everything[s] for s in DEB_SECTIONS if s in everything}
    elif source == "man":
        raw = man_paragraphs(man_info_dir)
    elif source == "wnv":
        raw = verb_glosses(wordnet_dir)
    else:
        raise ValueError(f"unknown source {source!r}; known: {', '.join(SOURCES)}")
    raw = {label: tuple(dict.fromkeys(clip(t) for t in texts)) for label, texts in raw.items()}
    owners: dict[str, int] = {}
    for texts in raw.values():
        for text in texts:
            owners[text] = owners.get(text, 0) + 1
    return {label: tuple(t for t in texts if owners[t] == 1) for label, texts in raw.items()}


def clip(text: str) -> str:
    """``text`` cut to at most MAX_CHARS at a word boundary (train and eval see the same text)."""
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS + 1].rsplit(" ", 1)[0]


def source_tasks(
    source: str,
    pools: dict[str, tuple[str, ...]],
    n_tasks: int,
    n_train: int = DEFAULT_N_TRAIN,
    n_test: int = DEFAULT_N_TEST,
    seed: int = 0,
) -> list[TextTask]:
    """``n_tasks`` distinct balanced 4-way tasks over the labels of one source; task j ignores n_tasks."""
    need = n_train + n_test
    labels = sorted(label for label, texts in pools.items() if len(texts) >= need)
    if comb(len(labels), N_CLASSES) < n_tasks:
        raise ValueError(
            f"source {source!r}: only {len(labels)} labels have >= {need} texts; "
            f"cannot make {n_tasks} distinct {N_CLASSES}-class tasks"
        )
    rng = random.Random(f"mixed-tasks:{source}:{seed}")
    seen: set[tuple[str, ...]] = set()
    tasks: list[TextTask] = []
    while len(tasks) < n_tasks:
        chosen = tuple(sorted(rng.sample(labels, N_CLASSES)))
        if chosen in seen:
            continue
        seen.add(chosen)
        name = f"{source}-" + "-".join(re.sub(r"[^A-Za-z0-9]+", "", c.lower()) for c in chosen)
        data_rng = random.Random(f"mixed-data:{seed}:{name}:{n_train}:{n_test}")
        train: list[tuple[str, int]] = []
        test: list[tuple[str, int]] = []
        for label, cls in enumerate(chosen):
            picked = data_rng.sample(pools[cls], need)
            train += [(text, label) for text in picked[:n_train]]
            test += [(text, label) for text in picked[n_train:]]
        data_rng.shuffle(train)
        data_rng.shuffle(test)
        tasks.append(TextTask(name=name, labels=[f"{source}:{c}" for c in chosen], train=train, test=test))
    return tasks


def source_of(index: int) -> str:
    """Source of adapter ``index``: round-robin, shifted every 3 and 6 adapters against ``zoo_settings``' cycles.

    A plain ``index % 4`` would give every query/key/value adapter (``index % 4 == 1``) to one source; with
    these shifts each source of a 24-adapter zoo gets ranks 4/8/16, both target sets and six (r, alpha) pairs.
    """
    return SOURCES[(index + index // 3 + index // 6) % len(SOURCES)]


def make_mixed_tasks(
    n_tasks: int,
    n_train: int = DEFAULT_N_TRAIN,
    n_test: int = DEFAULT_N_TEST,
    seed: int = 0,
    **where: Any,
) -> list[tuple[str, TextTask]]:
    """``(source, task)`` for adapters 0..n_tasks-1; ``where`` locates the data (see ``source_pools``)."""
    order = [source_of(i) for i in range(n_tasks)]
    per_source = {
        s: source_tasks(s, source_pools(s, **where), order.count(s), n_train, n_test, seed)
        for s in SOURCES
        if s in order
    }
    taken = dict.fromkeys(SOURCES, 0)
    out = []
    for source in order:
        out.append((source, per_source[source][taken[source]]))
        taken[source] += 1
    return out


# ------------------------------------------------------------------------------- zoo


def build_mixed_zoo(
    out_dir: str | os.PathLike[str],
    n_adapters: int = 24,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    progress: bool = True,
    model_path: str | None = None,
    n_train: int = DEFAULT_N_TRAIN,
    n_test: int = DEFAULT_N_TEST,
    **where: Any,
) -> list[dict[str, Any]]:
    """Build (or resume) ``out_dir/adapters/<task>/``, ``out_dir/eval/<task>.jsonl`` and ``zoo.json``."""
    model_path = model_path or minilm_path()
    root = Path(out_dir)
    planned = make_mixed_tasks(n_adapters, n_train, n_test, seed, **where)
    source = {task.name: src for src, task in planned}
    model_id = file_sha256(Path(model_path) / "model.safetensors")

    def plan(index: int, task: TextTask) -> ZooItem:
        settings = zoo_settings(index, seed)
        key = hash_json(["mixed", cache_key(task, settings, steps, model_id)])

        def train(tmp: Path, status: Callable[[str], None]) -> dict[str, Any]:
            extra = {"cache_key": key, "index": index, "source": source[task.name]}
            return train_lora(task, tmp, steps=steps, model_path=model_path, extra_entry=extra, **settings)

        return ZooItem(key, write_eval_jsonl(task, root / "eval" / f"{task.name}.jsonl"), train)

    return build_zoo(
        root,
        [task for _, task in planned],
        plan,
        desc="mixed zoo",
        task_fields=lambda task: {"source": source[task.name], "labels": task.labels},
        entry_fields=("r", "lora_alpha", "use_rslora", "target_modules", "accuracy", "seconds", "seed"),
        postfix=lambda task, entry: f"{task.name[:28]} acc={entry['accuracy']:.3f}",
        summary={
            "base_model_name_or_path": "all-MiniLM-L6-v2",
            "sources": list(SOURCES),
            "seed": seed,
            "steps": steps,
            "n_train_per_class": n_train,
            "n_test_per_class": n_test,
        },
        progress=progress,
        publish=_readable,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m benchmarks.zoos.mixed --out DIR [--n 24] [--steps S]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="zoo folder (created; reused as a cache)")
    parser.add_argument("--n", type=int, default=24, help="number of adapters")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wordnet-dir", default=DEFAULT_WORDNET_DIR)
    parser.add_argument(
        "--debian-packages", default=None, help="a Packages file (default: apt-cache dumpavail)"
    )
    parser.add_argument("--n-train", type=int, default=DEFAULT_N_TRAIN, help="train examples per class")
    parser.add_argument("--n-test", type=int, default=DEFAULT_N_TEST, help="test examples per class")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        entries = build_mixed_zoo(
            args.out,
            n_adapters=args.n,
            seed=args.seed,
            steps=args.steps,
            progress=not args.quiet,
            n_train=args.n_train,
            n_test=args.n_test,
            wordnet_dir=args.wordnet_dir,
            packages_file=args.debian_packages,
        )
    except (DataMissing, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for src in SOURCES:
        accs = [e["accuracy"] for e in entries if e["source"] == src]
        if accs:
            print(
                f"{src}: {len(accs)} adapters, mean test accuracy {sum(accs) / len(accs):.3f}",
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
