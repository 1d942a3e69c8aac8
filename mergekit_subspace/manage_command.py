"""Store management commands (list, rm, rename, add-many, reconstruct-all, export): parse, call
mergekit_subspace.manage, print. Registered on the main group by cli.py; heavy modules are imported lazily."""

from __future__ import annotations

import json
import shlex
from typing import TYPE_CHECKING

import click

from mergekit_subspace.add_policy import DEFAULT_MAX_REL_ERROR, POLICIES
from mergekit_subspace.command_errors import friendly

if TYPE_CHECKING:
    from mergekit_subspace.subspace import SubspaceStore

CONTEXT = {"help_option_names": ["-h", "--help"]}
STORE = click.argument("store", type=click.Path(file_okay=False))


def _open(store: str) -> SubspaceStore:
    from mergekit_subspace.subspace import SubspaceStore

    return SubspaceStore(store)


@click.command(
    "list", context_settings=CONTEXT, short_help="List the tasks: kind, rel_error, added, bytes, source."
)
@STORE
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output: a JSON list of tasks.")
@friendly
def list_tasks(store: str, as_json: bool) -> None:
    """List the tasks of STORE: kind, relative error, whether added after the fit, bytes of its task file,
    and source."""
    from mergekit_subspace.manage import format_task_rows, task_rows

    rows = task_rows(_open(store))
    click.echo(json.dumps(rows, indent=2, sort_keys=True) if as_json else format_task_rows(rows))


@click.command("rm", context_settings=CONTEXT, short_help="Remove tasks in one atomic manifest write.")
@STORE
@click.argument("names", nargs=-1, required=True)
@friendly
def rm(store: str, names: tuple[str, ...]) -> None:
    """Remove tasks NAMES from STORE; the shared basis is unchanged.

    One atomic manifest write, then the task files it no longer lists are deleted: a crash leaves the old
    store or the new one, plus at worst orphan files that `verify` reports. Every name is checked first; an unknown one changes
    nothing.
    """
    from mergekit_subspace.manage import remove_tasks

    removed = remove_tasks(_open(store), names)
    click.echo(f"removed {len(removed)} task(s) from {store}: {', '.join(removed)}")


@click.command("rename", context_settings=CONTEXT, short_help="Rename a task, atomically.")
@STORE
@click.argument("old")
@click.argument("new")
@friendly
def rename(store: str, old: str, new: str) -> None:
    """Rename task OLD of STORE to NEW (a plain file name: letters, digits, '.', '_', '-').

    Atomic: the task file is written under the new name, the manifest swapped, then the old file removed.
    """
    from mergekit_subspace.manage import rename_task

    rename_task(_open(store), old, new)
    click.echo(f"renamed '{old}' to '{new}' in {store}")


@click.command(
    "add-many", context_settings=CONTEXT, short_help="Add several adapters (or globs) in one write, or none."
)
@STORE
@click.argument("adapters", nargs=-1, required=True)
@click.option("--allow-pickle", is_flag=True, help="Accept adapter_model.bin, loaded with weights_only=True.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Torch device for the projections (e.g. cuda, cuda:1).",
)
@click.option(
    "--max-rel-error",
    type=float,
    default=DEFAULT_MAX_REL_ERROR,
    show_default=True,
    help="Refuse the batch if any task would be stored with a larger relative error.",
)
@click.option(
    "--policy",
    type=click.Choice(POLICIES),
    default="auto",
    show_default=True,
    help="auto/grow: grow the basis (a clustered store: the cluster that holds the task best) for a task "
    "above --max-rel-error, as `add` does; project: refuse the batch instead.",
)
@friendly
def add_many(
    store: str,
    adapters: tuple[str, ...],
    allow_pickle: bool,
    quiet: bool,
    device: str,
    max_rel_error: float,
    policy: str,
) -> None:
    """Project several ADAPTERS (PEFT LoRA folders or globs, e.g. 'zoo/*') onto STORE's basis in one write.

    Task names are the folder names. All task files are written first and the manifest once at the end. If any
    adapter is bad, a name repeats (in the batch or in the store) or a task would be stored with a relative
    error above --max-rel-error, the whole batch is refused with one line and nothing is written; so it is if
    another add, rm or rename changed the store while it ran. With --policy auto the basis grows, task by
    task in order, for a task it cannot hold (as `add` does), and is written once with the batch.
    """
    from mergekit_subspace.manage import add_many as run_add_many
    from mergekit_subspace.manage import expand_adapters
    from mergekit_subspace.report import describe_add

    opened = _open(store)
    entries = run_add_many(
        opened,
        expand_adapters(adapters),
        allow_pickle=allow_pickle,
        device=device,
        progress=not quiet,
        max_rel_error=max_rel_error,
        policy=policy,
    )
    for entry in entries:
        click.echo(describe_add(entry))
    click.echo(f"{len(entries)} task(s) added to {store} ({len(opened.tasks)} now)")


@click.command(
    "reconstruct-all", context_settings=CONTEXT, short_help="Write every (matching) task as a PEFT folder."
)
@STORE
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Folder; each task goes to OUT/<task>/."
)
@click.option(
    "--match",
    "patterns",
    multiple=True,
    metavar="GLOB",
    help="Only tasks whose name matches GLOB (fnmatch, e.g. 'legal-*'); repeatable. Default: every task.",
)
@click.option("--overwrite", is_flag=True, help="Replace existing OUT/<task>/ folders (each atomically).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly
def reconstruct_all(store: str, out: str, patterns: tuple[str, ...], overwrite: bool, quiet: bool) -> None:
    """Write every task of STORE (or those matching --match) as a PEFT LoRA folder OUT/<task>/.

    Existing task folders are refused before anything is written, unless --overwrite.
    """
    from mergekit_subspace.manage import reconstruct_all as run_reconstruct_all

    written = run_reconstruct_all(_open(store), out, patterns, overwrite=overwrite, progress=not quiet)
    click.echo(f"wrote {len(written)} PEFT folder(s) under {out}: {', '.join(written)}")


@click.command(
    "export", context_settings=CONTEXT, short_help="Write a task as a PEFT folder with a model card."
)
@STORE
@click.argument("name")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing folder (atomically, after success).")
@click.option(
    "--base-model-id",
    metavar="OWNER/NAME",
    help="Hub id for the card's `base_model` (default: the adapter's base if it is a hub id or HF cache path).",
)
@friendly
def export(store: str, name: str, out: str, overwrite: bool, base_model_id: str | None) -> None:
    """Write task NAME of STORE as a PEFT folder with a README.md model card, ready for a model hub,
    vLLM or LoRAX.

    The folder is what `reconstruct` writes plus README.md: Hugging Face front matter (base_model,
    library_name: peft, tags) and the base model, source path and sha256, relative error, store and format,
    the command that made it and k per slot.
    """
    from mergekit_subspace.manage import export_task

    args = [store, name, "--out", out] + (["--overwrite"] if overwrite else [])
    args += ["--base-model-id", base_model_id] if base_model_id else []
    command = "mergekit-subspace export " + shlex.join(args)
    path = export_task(_open(store), name, out, overwrite, command=command, base_model_id=base_model_id)
    click.echo(f"wrote {path} (PEFT adapter and README.md)")


COMMANDS = [list_tasks, rm, rename, add_many, reconstruct_all, export]
