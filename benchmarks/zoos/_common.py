"""Helpers shared by the zoo builders: atomic writes, cache look-ups, quiet HF loading, thread limits.

Every zoo builder promises the same things (an interrupted build never leaves a half-written
adapter; a re-run with the same inputs is free), so the mechanics live here once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from mergekit_subspace.io.files import atomic_write_bytes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAX_THREADS = 2  # the build machines are shared: never take more than two cores
THREADS_ENV = "MERGEKIT_ZOO_THREADS"


def limit_threads() -> None:
    """Cap torch at two threads, and use one when the machine is already busy.

    $MERGEKIT_ZOO_THREADS overrides the choice (still capped at two).  On a loaded 2-core machine
    (load average ~7) two torch threads spin-wait on each other: a SmolLM2 forward measured 17x
    slower with two threads than with one, a tiny-ViT training step 2.7x slower.
    """
    import torch

    cores = os.cpu_count() or 1
    wanted = os.environ.get(THREADS_ENV, "").strip()
    if wanted:
        threads = int(wanted)
    else:
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        threads = MAX_THREADS if busy < cores - 1 else 1
    torch.set_num_threads(max(1, min(threads, MAX_THREADS, cores)))


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Silence expected chatter (new-head notices, loading bars, deprecations) during a load."""
    import warnings

    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        hf_logging.set_verbosity(old)
        if bars:
            hf_logging.enable_progress_bar()


def atomic_write_text(path: Path, text: str) -> None:
    """Write a whole file or nothing (temp file in the same folder, then rename)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    """safetensors ``save_file`` through a temp file, so readers never see a partial file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place; an old one is removed only after the new one is there."""
    trash = None
    if dst.exists():
        trash = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, trash)
    os.rename(src, dst)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def staging_dir(parent: Path, name: str) -> Iterator[Path]:
    """A temp folder beside the final one (same filesystem, so the rename is atomic); removed on failure."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished folder is shared with other users
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_entry(folder: Path, key: str, weights: str = "adapter_model.safetensors") -> dict[str, Any] | None:
    """The folder's ``zoo_entry.json`` if it is complete and was built from the same inputs."""
    entry_file = folder / "zoo_entry.json"
    if not (entry_file.is_file() and (folder / weights).is_file()):
        return None
    try:
        entry = json.loads(entry_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return entry if isinstance(entry, dict) and entry.get("cache_key") == key else None


def hash_json(payload: Any, length: int = 20) -> str:
    """Stable short hash of a JSON-able value (the cache keys)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:length]


def file_sha256(path: Path, length: int = 16) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__}


def linear_warmup_decay(steps: int, warmup_frac: float = 0.1) -> Any:
    """LR multiplier: linear warm-up, then linear decay to zero (short runs need both)."""
    warmup = max(1, int(steps * warmup_frac))

    def factor(step: int) -> float:
        return min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup)))

    return factor


# Names in an adapter's ``zoo_entry.json`` that ``zoo.json`` spells shorter.
ENTRY_RENAMES = {"lora_alpha": "alpha", "use_rslora": "rslora", "target_modules": "targets"}


class ZooItem(NamedTuple):
    """One planned adapter: its cache key, its (already written) eval file, and how to train it.

    ``train(tmp, status)`` trains into the empty folder ``tmp`` and returns the adapter's entry
    (the content of its ``zoo_entry.json``); ``status`` shows a short note on the progress bar.
    """

    key: str
    eval_path: Path
    train: Callable[[Path, Callable[[str], None]], dict[str, Any]]


def build_zoo(
    root: Path,
    tasks: Sequence[Any],
    plan: Callable[[int, Any], ZooItem],
    *,
    desc: str,
    task_fields: Callable[[Any], dict[str, Any]],
    entry_fields: Sequence[str],
    postfix: Callable[[Any, dict[str, Any]], str],
    summary: dict[str, Any],
    progress: bool = True,
    publish: Callable[[Path], None] | None = None,
) -> list[dict[str, Any]]:
    """The build loop every zoo shares; returns the ``zoo.json`` entries.

    For each task (which has a ``name``): ``plan(index, task)`` gives its cache key and eval file;
    an adapter in ``root/adapters/<name>/`` whose ``zoo_entry.json`` carries the same key is reused,
    otherwise it is trained in a temp folder and renamed into place, so an interrupted build never
    leaves a half-written adapter.  Each ``zoo.json`` entry is ``name``, ``path``, ``eval``, then
    ``task_fields(task)``, then ``entry_fields`` taken from the adapter's entry (renamed by
    ``ENTRY_RENAMES``), then ``cache_key``.  ``zoo.json`` is ``summary`` plus ``entries``.
    ``publish`` (if given) is called on each finished adapter folder and on ``zoo.json``.
    """
    from tqdm.auto import tqdm

    adapters_dir = root / "adapters"
    adapters_dir.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    bar = tqdm(tasks, desc=desc, unit="adapter", disable=None if progress else True)
    for index, task in enumerate(bar):
        item = plan(index, task)
        folder = adapters_dir / task.name
        entry = cached_entry(folder, item.key)
        if entry is None:
            with staging_dir(adapters_dir, task.name) as tmp:
                entry = item.train(tmp, bar.set_postfix_str)
                if publish is not None:
                    publish(tmp)
                replace_dir(tmp, folder)
        bar.set_postfix_str(postfix(task, entry))
        entries.append(
            {
                "name": task.name,
                "path": str(folder.relative_to(root)),
                "eval": str(item.eval_path.relative_to(root)),
                **task_fields(task),
                **{ENTRY_RENAMES.get(name, name): entry[name] for name in entry_fields},
                "cache_key": item.key,
            }
        )
    bar.close()
    atomic_write_text(root / "zoo.json", json.dumps({**summary, "entries": entries}, indent=2) + "\n")
    if publish is not None:
        publish(root / "zoo.json")
    return entries
