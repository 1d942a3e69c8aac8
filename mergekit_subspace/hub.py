"""Hugging Face hub ids (`org/name`, `org/name@revision`) as model and adapter paths, read from the local cache.

One resolver for every place a recipe or command names a model: a local path that exists always wins; a
spelling that is a hub id is looked up in the Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub, else
~/.cache/huggingface/hub), never on the network. A snapshot folder of that cache names its repository and
commit (`models--org--name/snapshots/<commit>`), so a store records both from the path alone.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from mergekit_subspace.errors import SubspaceError

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[A-Za-z0-9._/-]+))?$")
_SNAPSHOT = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")


def cache_dir() -> Path:
    """The hub cache as huggingface_hub finds it, read from the environment at call time (not import time)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"
    )
    return Path(home).expanduser() / "hub"


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when `spec` is spelled like a hub id, else None. Only `org/name` counts: a bare
    name is too easily a local folder, and a path with more parts or a leading '.' or '/' is a path."""
    match = HUB_ID.match(spec)
    return (match.group("repo"), match.group("revision")) if match else None


def hub_origin(path: str | Path) -> dict[str, str]:
    """{'hub_id', 'commit'} when `path` is a snapshot folder of a hub cache, else {}."""
    match = _SNAPSHOT.search(Path(path).as_posix())
    if match is None:
        return {}
    return {"hub_id": f"{match.group('owner')}/{match.group('name')}", "commit": match.group("commit")}


def default_name(spec: str) -> str | None:
    """A task's name for an adapter given as a hub id: the repository's name (its folder is a commit hash)."""
    parsed = parse_hub_id(spec)
    return parsed[0].split("/")[1] if parsed else None


def resolve(spec: str | Path, where: str | Path | None = None) -> Path:
    """The local folder `spec` stands for: itself when it exists or is not spelled like a hub id, else the
    cached snapshot of that hub id. A hub id that is not cached raises one line saying how to fetch it."""
    path = Path(spec)
    parsed = parse_hub_id(str(spec))
    if path.exists() or parsed is None:
        return path
    repo_id, revision = parsed
    cache = cache_dir()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        found = snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        at = f" at revision '{revision}'" if revision else ""
        raise SubspaceError(
            f"'{spec}' is neither a folder here nor a model in the Hugging Face cache ({cache}); if it is the "
            f"hub id '{repo_id}'{at}, run `huggingface-cli download {repo_id}"
            f"{f' --revision {revision}' if revision else ''}` on a machine with network and copy its cache "
            "here, or set HF_HUB_CACHE / HF_HOME to a cache that has it (nothing is downloaded)",
            where,
        ) from None
    return Path(found)


def resolve_optional(spec: str | None, where: str | Path | None = None) -> str | None:
    """resolve() for an optional recipe value, as the string a recipe holds."""
    return None if spec is None else str(resolve(spec, where))


def _config_sha256(folder: Path) -> str | None:
    config = folder / "config.json"
    return hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None


def store_base(
    recorded: dict | None, given: str | None, where: str | Path | None = None
) -> tuple[Path, str | None]:
    """The base model to load for a store, and a note to show: `given` (resolved) when there is one, noting
    when it is not the base the store was fit on (by config sha256, else by path); otherwise the base its
    manifest records, found at its path or, elsewhere, through its hub id in the local cache."""
    recorded = recorded or {}
    shown = recorded.get("hub_id") or recorded.get("path")
    if given is not None:
        path = resolve(given, where)
        fitted_sha = recorded.get("config_sha256")
        if fitted_sha and path.is_dir():
            differs = _config_sha256(path) != fitted_sha
        else:
            differs = bool(recorded.get("path")) and Path(recorded["path"]).resolve() != path.resolve()
        note = (
            f"note: --base {given} is not the base model the store was fit on ({shown}); its tasks were fit "
            "as changes to that model"
            if differs
            else None
        )
        return path, note
    if not recorded.get("path") and not recorded.get("hub_id"):
        raise SubspaceError("records no base model: pass --base MODEL", where)
    if recorded.get("path") and Path(recorded["path"]).is_dir():
        path = Path(recorded["path"])
    elif recorded.get("hub_id"):
        commit = recorded.get("commit")
        path = resolve(f"{recorded['hub_id']}@{commit}" if commit else recorded["hub_id"], where)
    else:
        raise SubspaceError(
            f"was fit on base model '{recorded['path']}', not a folder here: pass --base MODEL", where
        )
    return path, f"base model: {path} (from the store's manifest)"


__all__ = [
    "cache_dir",
    "default_name",
    "hub_origin",
    "parse_hub_id",
    "resolve",
    "resolve_optional",
    "store_base",
]
