"""Managing a store: list, remove and rename tasks, add many adapters in one write, reconstruct many tasks,
export one as a PEFT folder with a model card.

Every change keeps the store's rule that the manifest is the store: new files are written (atomically) before
the manifest that names them, the manifest is swapped atomically, and files it no longer names are deleted
after it. A crash therefore leaves either the old store or the new one, plus at worst files that no manifest
names, which `verify` reports. The basis changes only when `add-many --policy auto|grow` grows it: the grown
basis is a new file (`basis-<n>.safetensors`), written before the manifest that names it.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import fnmatch
import json
import os
import re
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from mergekit_subspace.add_policy import DEFAULT_MAX_REL_ERROR, check_policy
from mergekit_subspace.clusters import encode_on_cluster, is_clustered, place_on_clusters
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.fit import check_device
from mergekit_subspace.grow import GrowingBases, grow_blocks
from mergekit_subspace.io.codec import store_dtypes
from mergekit_subspace.io.files import (
    _fsync_dir,
    atomic_directory,
    atomic_write_bytes,
    check_output,
    sha256_bytes,
    tensors_to_bytes,
)
from mergekit_subspace.io.store import (
    FORMAT,
    MANIFEST,
    TASKS_DIR,
    basis_file,
    manifest_bytes,
    next_basis_file,
    task_file,
)
from mergekit_subspace.recipe import check_task_name, expand_entries
from mergekit_subspace.report import human_bytes, table
from mergekit_subspace.sources import TaskSource, check_unique_names, lora_task
from mergekit_subspace.subspace import SubspaceStore, _record_growth, _task_file_and_entry, _total_rel_error

CARD = "README.md"
STAGING_PREFIX = ".add-many."
# a hub repo id: `name` or `owner/name`
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_AUTO_CLASSES = {  # PEFT task_type -> the transformers class its base loads with
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}
_CACHE_SNAPSHOT = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")


# ---- reading ----------------------------------------------------------------------------------------------
def task_rows(store: SubspaceStore) -> list[dict[str, Any]]:
    """One row per task, sorted by name: kind, source, rel_error, added_after_fit, bytes (of its task file)."""
    rows = []
    for name, entry in sorted(store.manifest["tasks"].items()):
        path = store.path / entry["file"]
        rows.append(
            {
                "name": name,
                "kind": entry["kind"],
                "source": entry["source"],
                "rel_error": entry["rel_error"],
                "added_after_fit": entry["added_after_fit"],
                "bytes": path.stat().st_size if path.is_file() else None,
            }
        )
    return rows


def format_task_rows(rows: list[dict[str, Any]]) -> str:
    """The rows of `task_rows` as a plain-text table (a missing task file shows as 'missing')."""
    cells = [
        [
            row["name"],
            row["kind"],
            f"{row['rel_error']:.4f}",
            "yes" if row["added_after_fit"] else "no",
            "missing" if row["bytes"] is None else human_bytes(row["bytes"]),
            row["source"],
        ]
        for row in rows
    ]
    return table(["task", "kind", "rel_error", "added", "bytes", "source"], cells)


def select_tasks(store: SubspaceStore, patterns: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Task names matching any of the globs (fnmatch, case-sensitive), all tasks when none is given."""
    names = store.tasks
    if not patterns:
        return names
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        shown = ", ".join(repr(p) for p in patterns)
        raise SubspaceError(f"no task matches {shown} (known: {', '.join(names) or 'none'})", store.path)
    return chosen


# ---- changing ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _store_lock(store: SubspaceStore, changed_since: str | None = None) -> Iterator[None]:
    """Hold an exclusive flock on the store folder (the lock a locking `add` takes on it too, so writers
    take turns) and reopen the store from disk, so a change is made to the manifest as it is now; what killed
    writers left (temporary files, unlocked staging folders, unlisted task files) is removed first.

    With `changed_since` (a `_manifest_digest` taken earlier) a store whose manifest changed meanwhile is
    refused instead: work done against the old manifest would undo what the other writer did.
    """
    try:
        fd = os.open(str(store.path), os.O_RDONLY)
    except OSError as exc:
        raise SubspaceError(f"cannot be opened ({exc.strerror or exc})", store.path) from None
    try:
        with contextlib.suppress(OSError):  # a filesystem without flock: take turns is then the user's job
            fcntl.flock(fd, fcntl.LOCK_EX)
        if changed_since is not None and _manifest_digest(store) != changed_since:
            raise SubspaceError(
                "changed while this ran (another add, rm or rename meanwhile); nothing was written, run it "
                "again",
                store.path / MANIFEST,
            )
        _reopen(store)
        store.files.remove_leftovers()  # what killed writers left, as add does
        yield
    finally:
        os.close(fd)


def _manifest_digest(store: SubspaceStore) -> str:
    path = store.path / MANIFEST
    try:
        return sha256_bytes(path.read_bytes())
    except OSError as exc:
        raise SubspaceError(f"cannot be read ({exc.strerror or exc})", path) from None


def _reopen(store: SubspaceStore) -> None:
    """Read the store's files again, so the open store sees exactly what a reopen does."""
    store.files = type(store.files)(store.path)


def _write_manifest(store: SubspaceStore, manifest: dict[str, Any]) -> None:
    """Swap the manifest atomically, then reopen the store from it."""
    atomic_write_bytes(store.path / MANIFEST, manifest_bytes(manifest))
    _reopen(store)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _check_single_process(what: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SubspaceError(f"{what} runs in one process; run it without torchrun")


def remove_tasks(store: SubspaceStore, names: list[str] | tuple[str, ...]) -> list[str]:
    """Remove tasks (manifest entries, slots' task lists, task files) in one manifest write; basis unchanged.

    Every name is checked before anything changes; the new manifest is written first and the task files it
    no longer names are deleted after it. Returns the removed names, sorted.
    """
    _check_single_process("rm")
    if not names:
        raise SubspaceError("name at least one task to remove", store.path)
    with _store_lock(store):
        tasks = store.manifest["tasks"]
        unknown = sorted({n for n in names if n not in tasks})
        if unknown:
            known = ", ".join(store.tasks) or "none"
            shown = ", ".join(repr(n) for n in unknown)
            raise SubspaceError(f"has no task {shown} (known: {known})", store.path)
        doomed = sorted(set(names))
        if len(doomed) == len(tasks):
            raise SubspaceError(
                "removing every task would leave only the basis; delete the store folder instead", store.path
            )
        manifest = copy.deepcopy(store.manifest)
        files = []
        for name in doomed:
            entry = manifest["tasks"].pop(name)
            manifest["files"].pop(entry["file"], None)
            files.append(store.path / entry["file"])
        for meta in manifest["slots"].values():
            meta["tasks"] = [t for t in meta["tasks"] if t not in doomed]
        _write_manifest(store, manifest)
        for path in files:
            _unlink_quietly(path)
    return doomed


def rename_task(store: SubspaceStore, old: str, new: str) -> None:
    """Rename a task: its file is written under the new name, the manifest swapped, the old file removed."""
    _check_single_process("rename")
    check_task_name(new)
    with _store_lock(store):
        entry = store._entry(old)
        if new == old:
            raise SubspaceError(f"task '{old}' already has that name", store.path)
        if new in store.manifest["tasks"]:
            raise SubspaceError(f"task name '{new}' is already in the store; pick another", store.path)
        old_path = store.path / entry["file"]
        data = store.files.read_verified(entry["file"])  # refuses a missing, altered or symlinked file
        digest = store.manifest["files"][entry["file"]]
        manifest = copy.deepcopy(store.manifest)
        moved = manifest["tasks"].pop(old)
        moved["file"] = task_file(new)
        manifest["tasks"][new] = moved
        manifest["files"].pop(entry["file"])
        manifest["files"][task_file(new)] = digest
        for meta in manifest["slots"].values():
            meta["tasks"] = sorted(new if t == old else t for t in meta["tasks"])
        new_path = store.path / task_file(new)
        atomic_write_bytes(new_path, data)  # a task file holds no name: the bytes stay the same
        try:
            _write_manifest(store, manifest)
        except BaseException:
            _unlink_quietly(new_path)
            raise
        _unlink_quietly(old_path)


def expand_adapters(patterns: list[str] | tuple[str, ...]) -> list[Path]:
    """Adapter folders from paths and globs (a glob matches folders, sorted; one that matches none is an
    error), as a recipe's `adapters:` list expands."""
    if not patterns:
        raise SubspaceError("name at least one adapter folder or glob")
    return [path for path, _, _ in expand_entries([str(p) for p in patterns], None)]


@contextlib.contextmanager
def _staging_folder(store: SubspaceStore) -> Iterator[Path]:
    """A hidden folder in the store for task files not yet part of it, locked (so a cleaner of leftovers
    leaves it alone while it is in use) and removed afterwards."""
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, suffix=".partial", dir=str(store.path)))
    fd = os.open(str(staging), os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield staging
    finally:
        os.close(fd)
        shutil.rmtree(staging, ignore_errors=True)


def add_many(
    store: SubspaceStore,
    adapters: list[str | Path | TaskSource] | tuple[str | Path | TaskSource, ...],
    allow_pickle: bool = False,
    device: str = "cpu",
    progress: bool = True,
    max_rel_error: float = DEFAULT_MAX_REL_ERROR,
    policy: str = "auto",
) -> list[dict[str, Any]]:
    """Add several adapters with one manifest write, in order, each on the bases as the ones before it left
    them.

    `policy` is add's: "project" refuses the batch when a task the bases cannot hold within
    `max_rel_error` comes; "auto" (the default) grows the bases for it ("grow": for every task), as `add` does, and
    in a clustered store grows the cluster that holds it best. The grown basis is written once, under a new
    name, with the task files, before the manifest that names them all.

    Every adapter's config and header is read, and names and shapes checked, before anything is projected;
    the task files are staged in a hidden folder while projecting, moved into the store when all succeeded,
    and the manifest is written last. A bad adapter (unreadable, non-finite, wrong shape) or a repeated name
    refuses the whole batch and the store stays byte-identical. Returns each added task's manifest entry with
    its name, `action` ("projected" or "grew"), `projected_rel_error` and `grown` (columns per slot), in
    input order.
    """
    _check_single_process("add-many")
    check_policy(policy, max_rel_error)
    device = check_device(device)
    with _store_lock(store):
        started = _manifest_digest(store)
        bases = GrowingBases(
            copy.deepcopy(store.manifest), dict(store.files.basis_tensors()), store.basis, store.path
        )
    sources = [
        a if isinstance(a, TaskSource) else lora_task(a, allow_pickle=allow_pickle)
        for a in tqdm(adapters, desc="read adapters", disable=None if progress else True, leave=False)
    ]
    if not sources:
        raise SubspaceError("name at least one adapter to add", store.path)
    check_unique_names(sources, taken=set(store.manifest["tasks"]))
    for source in sources:
        store._check_fits(source)
    dtypes = store_dtypes(store.manifest["settings"])
    manifest = bases.manifest
    clustered = is_clustered(manifest)
    added: dict[str, dict[str, Any]] = {}
    with _staging_folder(store) as staging:
        for source in tqdm(sources, desc="add adapters", disable=None if progress else True, leave=False):
            cluster, slots, projected, grown = _place(bases, source, clustered, policy, max_rel_error, device)
            error = _total_rel_error(slots)
            if error > max_rel_error:
                how = (
                    "even with its basis grown; raise --max-rel-error or"
                    if grown or policy == "grow"
                    else "on the bases as they are; grow the basis with --policy auto or"
                )
                raise SubspaceError(
                    f"would be stored with relative error {error:.3f}, above max_rel_error "
                    f"{max_rel_error:g}, {how} fit it in with `refit --add`; nothing was written",
                    source.source,
                )
            data, entry = _task_file_and_entry(source, slots, dtypes, added=True)
            if cluster is not None:
                entry["cluster"] = cluster
            if grown:
                entry["grown_from_rel_error"] = projected
            atomic_write_bytes(staging / f"{source.name}.safetensors", data)
            manifest["tasks"][source.name] = entry
            manifest["files"][task_file(source.name)] = sha256_bytes(data)
            for module in entry["slots"]:
                manifest["slots"][module]["tasks"] = sorted(
                    manifest["slots"][module]["tasks"] + [source.name]
                )
            added[source.name] = {
                "action": "grew" if grown else "projected",
                "projected_rel_error": projected,
                "grown": grown,
            }
        basis = None
        if bases.grown:
            basis = (
                next_basis_file(store.manifest),
                tensors_to_bytes(bases.tensors, metadata={"format": FORMAT}),
            )
            _record_growth(manifest, {}, basis)
        with _store_lock(store, changed_since=started):
            old_basis = basis_file(store.manifest)
            (store.path / TASKS_DIR).mkdir(exist_ok=True)
            written: list[Path] = []
            try:
                if basis is not None:
                    atomic_write_bytes(store.path / basis[0], basis[1])
                    written.append(store.path / basis[0])
                for name in added:
                    target = store.path / task_file(name)
                    os.replace(staging / f"{name}.safetensors", target)
                    written.append(target)
                _fsync_dir(store.path / TASKS_DIR)
                _write_manifest(store, manifest)
            except BaseException:
                for path in written:
                    _unlink_quietly(path)
                raise
            if basis is not None:
                _unlink_quietly(store.path / old_basis)
    return [{"name": s.name, **store.manifest["tasks"][s.name], **added[s.name]} for s in sources]


def _place(
    bases: GrowingBases,
    source: TaskSource,
    clustered: bool,
    policy: str,
    max_rel_error: float,
    device: str,
) -> tuple[int | None, dict[str, Any], float, dict[str, tuple[int, int]]]:
    """A new task's cluster (None in a plain store), its slots encoded as they will be stored, its error on
    the bases as they were, and the columns grown for it per slot."""
    if clustered:
        return place_on_clusters(bases, source, policy, max_rel_error, device)
    slots = encode_on_cluster(bases, source, None, device)
    projected = _total_rel_error(slots)
    if policy == "grow" or (policy == "auto" and projected > max_rel_error):
        grown = grow_blocks(bases, source, None, max_rel_error, device)
        return None, encode_on_cluster(bases, source, None, device), projected, grown
    return None, slots, projected, {}


# ---- writing PEFT folders ---------------------------------------------------------------------------------
def reconstruct_all(
    store: SubspaceStore,
    out: str | Path,
    patterns: tuple[str, ...] | list[str] = (),
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Every task matching the globs (all when none) as a PEFT folder OUT/<task>/, each written atomically.
    Existing task folders are refused, all checked before the first is written, unless `overwrite`."""
    out = check_output(out, existing_ok=True, inputs=[store.path])
    names = select_tasks(store, patterns)
    if not overwrite:
        taken = [n for n in names if (out / n).exists() or (out / n).is_symlink()]
        if taken:
            raise SubspaceError(
                f"already holds {', '.join(taken)}; choose another folder or pass --overwrite", out
            )
    for name in names:
        check_output(out / name, overwrite, inputs=[store.path])
    written = {}
    for name in tqdm(names, desc="reconstruct", disable=None if progress else True, leave=False):
        written[name] = store.reconstruct(name, out / name, overwrite=overwrite)
    return written


def hub_model_id(base: str | None) -> str | None:
    """The Hugging Face hub id a base path stands for: an HF cache snapshot folder gives its `owner/name`,
    a string that is no local path and looks like a repo id is one; otherwise None (a local folder)."""
    if not base:
        return None
    match = _CACHE_SNAPSHOT.search(str(base))
    if match:
        return f"{match['owner']}/{match['name']}"
    if Path(base).exists() or not _HUB_ID.match(base):
        return None
    return base


def _base_model(store: SubspaceStore, entry: dict[str, Any]) -> str | None:
    named = entry["peft_config"].get("base_model_name_or_path")
    if named:
        return str(named)
    recorded = store.manifest.get("base_model") or {}
    return recorded.get("path")


def _k_summary(store: SubspaceStore, entry: dict[str, Any]) -> list[str]:
    """Markdown lines: how many slots have each (k_out, k_in), the LoRA ranks written, the per-slot errors."""
    slots = store.manifest["slots"]
    modules = sorted(entry["slots"])
    groups: dict[tuple[int, int], int] = {}
    ranks, errors = [], {}
    for module in modules:
        k_out, k_in = int(slots[module]["k_out"]), int(slots[module]["k_in"])
        groups[(k_out, k_in)] = groups.get((k_out, k_in), 0) + 1
        ranks.append(min(int(entry["slots"][module]["rank"]), k_out, k_in))
        if entry["slots"][module].get("rel_error") is not None:
            errors[module] = float(entry["slots"][module]["rel_error"])
    lines = [
        f"{len(modules)} slots (one layer's one target module each). Per slot the store keeps a left basis of "
        "k_out and a right basis of k_in columns, shared by every task, and for this task a k_out x k_in core.",
        "",
        "| k_out | k_in | slots |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {k_out} | {k_in} | {count} |" for (k_out, k_in), count in sorted(groups.items())]
    lines += [
        "",
        "LoRA rank written per slot (min(source rank, k_out, k_in)): "
        + (f"{min(ranks)}." if min(ranks) == max(ranks) else f"{min(ranks)} to {max(ranks)}."),
    ]
    if errors:
        worst = max(errors, key=lambda m: errors[m])
        lines[-1] += (
            f" Relative error per slot: median {statistics.median(errors.values()):.4f}, "
            f"worst {errors[worst]:.4f} (`{worst}`)."
        )
    return lines


def model_card(
    store: SubspaceStore, name: str, command: str | None = None, base_model_id: str | None = None
) -> str:
    """README.md for an exported task: hub front matter (base_model, library_name: peft, tags) and what the
    folder is, where it came from and how far it is from its source."""
    entry = store._entry(name)
    base = _base_model(store, entry)
    hub_id = base_model_id or hub_model_id(base)
    front: dict[str, Any] = {}
    if hub_id:
        front["base_model"] = hub_id
    front |= {"library_name": "peft", "tags": ["lora", "mergekit-subspace"]}
    settings = store.manifest["settings"]
    command = command or f"SubspaceStore({str(store.path)!r}).export({name!r}, ...)"
    base_text = f"`{base}`" if base else "not recorded"
    if base and not hub_id:
        base_text += " (a local folder: set `base_model:` above to its hub id before uploading)"
    rows = [
        ("base model", base_text),
        (
            "task",
            f"`{name}` ({entry['kind']}" + (", added after the fit)" if entry["added_after_fit"] else ")"),
        ),
        ("source", f"`{entry['source']}`"),
        ("source sha256", f"`{entry['source_sha256']}`" if entry.get("source_sha256") else "not recorded"),
        (
            "relative error",
            f"{entry['rel_error']:.6f} (‖D - D_source‖_F / ‖D_source‖_F of the weight deltas, over all "
            f"{len(entry['slots'])} slots)",
        ),
        (
            "store",
            f"`{store.path}` (format `{store.manifest['format']}`, numbers stored as {store_dtypes(settings).label}, "
            f"{len(store.manifest['tasks'])} tasks)",
        ),
        ("made with", f"`{command}`"),
    ]
    if entry["extras"]:
        rows.append(("kept verbatim", ", ".join(f"`{key}`" for key in entry["extras"])))
    if "energy_dropped" in entry:
        rows.append(("energy dropped", f"{entry['energy_dropped']:.6f} (truncating the fine-tune to LoRA)"))
    if entry.get("labels"):
        rows.append(("labels", ", ".join(f"`{label}`" for label in entry["labels"]) + " (config.json)"))
    load_base = hub_id or base or "BASE_MODEL"
    auto_class = _AUTO_CLASSES.get(str(entry["peft_config"].get("task_type")), "AutoModel")
    use = [
        "from peft import PeftModel",
        f"from transformers import {auto_class}",
        "",
        f"base = {auto_class}.from_pretrained({json.dumps(load_base)})",
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
    ]
    intro = (
        f"A LoRA adapter for `{load_base}` in the standard PEFT format, reconstructed by mergekit-subspace from a "
        "store that keeps one shared low-rank basis per layer and a small core per task. PEFT loads it with "
        "`PeftModel.from_pretrained`, and vLLM and LoRAX serve it as any LoRA adapter."
    )
    return card_text(front, name, intro, rows, {"k per slot": _k_summary(store, entry)}, use)


def card_text(
    front: dict[str, Any],
    title: str,
    intro: str,
    rows: list[tuple[str, str]],
    sections: dict[str, list[str]],
    use: list[str],
) -> str:
    """A README.md model card: hub front matter, what the folder is, a table of facts, markdown sections and
    the Python lines that load it. Export and full merges write their cards through this one layout."""
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", "", intro, ""]
    lines += ["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows), ""]
    for heading, body in sections.items():
        lines += [f"## {heading}", "", *body, ""]
    lines += ["## Use", "", "```python", *use, "```", ""]
    return "\n".join(lines)


def export_task(
    store: SubspaceStore,
    name: str,
    out: str | Path,
    overwrite: bool = False,
    command: str | None = None,
    base_model_id: str | None = None,
) -> Path:
    """Task `name` as a PEFT folder (exactly what `reconstruct` writes) plus README.md, written atomically."""
    if base_model_id is not None and not _HUB_ID.match(base_model_id):
        raise SubspaceError(f"'{base_model_id}' is not a hub model id (owner/name)")
    out = check_output(out, overwrite, inputs=[store.path])
    card = model_card(store, name, command, base_model_id)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        staged = store.reconstruct(name, tmp / "peft")
        for child in sorted(staged.iterdir()):
            os.replace(child, tmp / child.name)
        staged.rmdir()
        (tmp / CARD).write_text(card, encoding="utf-8")
    return out


__all__ = [
    "add_many",
    "card_text",
    "expand_adapters",
    "export_task",
    "format_task_rows",
    "hub_model_id",
    "model_card",
    "reconstruct_all",
    "remove_tasks",
    "rename_task",
    "select_tasks",
    "task_rows",
]
