"""The `mergekit-subspace` command: parse arguments, call the library, print. No work happens here."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from mergekit_subspace import quiet
from mergekit_subspace.add_policy import DEFAULT_MAX_REL_ERROR, POLICIES
from mergekit_subspace.command_errors import EXIT_BAD_INPUT, friendly
from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.extras import require_extras
from mergekit_subspace.report import describe_add, format_info

DEVICE = click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Torch device for the fit and projections (e.g. cuda, cuda:1).",
)


def _needs_extras(command: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """Check the optional dependencies `command` needs before it does any work."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            require_extras(command)
        except SubspaceError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        return func(*args, **kwargs)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mergekit-subspace")
@click.option(
    "-v", "--verbose", is_flag=True, help="Show the libraries' own logging, warnings and progress bars too."
)
def main(verbose: bool) -> None:
    """Compress a zoo of LoRA adapters (and fine-tunes) onto one shared low-rank basis per layer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet.configure(verbose)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "--out", type=click.Path(file_okay=False), help="Store folder (default: the recipe's `output`)."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing store (atomically, after success).")
@click.option(
    "--allow-pickle", is_flag=True, help="Accept .bin weights, loaded with torch.load(weights_only=True)."
)
@DEVICE
@friendly
def compress(recipe: str, out: str | None, overwrite: bool, allow_pickle: bool, device: str) -> None:
    """Fit a shared basis per slot on every task in RECIPE and store per-task cores.

    Runs slot by slot in the memory of one slot. Under `torchrun --nproc-per-node P -m mergekit_subspace
    compress RECIPE` the slots are shared out over P processes and rank 0 writes the same store.
    """
    from mergekit_subspace.recipe import parse_compress_recipe

    parsed = parse_compress_recipe(recipe)  # recipe errors answer before torch is imported
    from mergekit_subspace import parallel
    from mergekit_subspace.subspace import SubspaceStore

    target = out if out is not None else parsed.output
    added = SubspaceStore.added_tasks(target) if overwrite and target is not None else []
    store = SubspaceStore.compress(
        recipe, out=out, overwrite=overwrite, allow_pickle=allow_pickle, device=device
    )
    if parallel.current(device).main:
        click.echo(format_info(store.info()))
        from mergekit_subspace.target import describe

        chosen = describe(store)  # what a `subspace.target` picked, in one line
        if chosen:
            click.echo(chosen)
        from mergekit_subspace.clusters import describe as clusters_line

        found = clusters_line(store)  # how `subspace.clusters` split the zoo
        if found:
            click.echo(found)
        from mergekit_subspace.transfer import describe as transfer_line

        weights = transfer_line(store.manifest)  # the weights a `subspace.transfer_from` fit used
        if weights:
            click.echo(weights)
        dropped = [name for name in added if name not in store.tasks]
        if dropped:
            click.echo(
                f"note: the replaced store held {len(dropped)} task(s) added after its fit that this recipe "
                f"does not name, now dropped: {', '.join(dropped[:10])}{' ...' if len(dropped) > 10 else ''}"
                " (add them to the recipe, or add them again)"
            )


@main.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.argument("adapter", type=click.Path())
@click.option("--name", help="Task name (default: the adapter folder's name).")
@click.option("--allow-pickle", is_flag=True, help="Accept adapter_model.bin, loaded with weights_only=True.")
@click.option(
    "--policy",
    type=click.Choice(POLICIES),
    default="auto",
    show_default=True,
    help="project: coefficients on the basis as it is; grow: append the directions the basis misses; "
    "auto: project when the error is within --max-rel-error, grow otherwise.",
)
@click.option(
    "--max-rel-error",
    type=float,
    default=DEFAULT_MAX_REL_ERROR,
    show_default=True,
    help="Refuse to store the task with a larger relative error (growth aims at half of it).",
)
@DEVICE
@friendly
def add(
    store: str,
    adapter: str,
    name: str | None,
    allow_pickle: bool,
    policy: str,
    max_rel_error: float,
    device: str,
) -> None:
    """Add ADAPTER to STORE: its cores and heads, and the basis directions it needs when it does not fit."""
    from mergekit_subspace import parallel
    from mergekit_subspace.subspace import SubspaceStore

    opened = SubspaceStore(store)
    entry = opened.add(
        adapter,
        name=name,
        allow_pickle=allow_pickle,
        device=device,
        policy=policy,
        max_rel_error=max_rel_error,
    )
    if not parallel.current(device).main:
        return
    click.echo(describe_add(entry))


@main.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.option(
    "--add", "adapters", multiple=True, type=click.Path(), help="An adapter to fit in as well (repeatable)."
)
@click.option(
    "--settings",
    type=click.Path(dir_okay=False),
    help="YAML with new `subspace:` settings (default: the store's own).",
)
@click.option("--allow-pickle", is_flag=True, help="Accept adapter_model.bin, loaded with weights_only=True.")
@DEVICE
@friendly
def refit(
    store: str, adapters: tuple[str, ...], settings: str | None, allow_pickle: bool, device: str
) -> None:
    """Fit STORE's basis again from its stored tasks (no sources needed) plus any --add adapters.

    The store is replaced atomically when the fit has succeeded; a store that grew through many adds
    becomes compact again.
    """
    from mergekit_subspace import parallel
    from mergekit_subspace.recipe import parse_settings_file
    from mergekit_subspace.subspace import SubspaceStore

    opened = SubspaceStore(store)
    parsed = parse_settings_file(settings) if settings else None
    before = opened.files.bytes_on_disk()
    refitted = opened.refit(list(adapters), parsed, allow_pickle=allow_pickle, device=device)
    if not parallel.current(device).main:
        return
    info = refitted.info()
    errors = [t["rel_error"] for t in info["per_task"].values()]
    click.echo(
        f"refit {len(errors)} tasks: {before} -> {info['bytes']['store']} bytes, ratio {info['ratio']:.1f}x, "
        f"mean relative error {sum(errors) / len(errors):.4f} (worst {max(errors):.4f})"
    )


@main.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.argument("name")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="PEFT folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing folder (atomically, after success).")
@friendly
def reconstruct(store: str, name: str, out: str, overwrite: bool) -> None:
    """Write task NAME of STORE as a standard PEFT LoRA folder."""
    from mergekit_subspace.subspace import SubspaceStore

    path = SubspaceStore(store).reconstruct(name, out, overwrite=overwrite)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly
def info(store: str, as_json: bool) -> None:
    """Tasks, slots, k per slot, bytes and reconstruction error of STORE."""
    from mergekit_subspace.subspace import SubspaceStore

    data = SubspaceStore(store).info()
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else format_info(data))


@main.command()
@click.argument("store", type=click.Path(file_okay=False))
@friendly
def verify(store: str) -> None:
    """Re-hash every file of STORE against its manifest; exit 1 naming what is missing or altered."""
    from mergekit_subspace.subspace import SubspaceStore

    problems = SubspaceStore(store).verify()
    if problems:
        for problem in problems:
            click.echo(f"FAIL {problem}", err=True)
        sys.exit(1)
    click.echo(f"ok: {store} is intact")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Folder for results.json, report.md, PNGs."
)
@click.option("--overwrite", is_flag=True, help="Reuse a non-empty output folder.")
@friendly
def bench(recipe: str, out: str, overwrite: bool) -> None:
    """Accuracy and bytes of RECIPE's zoo compressed at each k, beside the baselines.

    Scores, through PEFT: original, reconstructed, mean_adapter, per_task_svd (equal bytes), leave_one_out,
    base_only and vLoRA (if installed), and writes OUT/results.json, OUT/report.md and plots.
    """
    require_extras("bench")
    from mergekit_subspace.bench.run import run_bench

    results = run_bench(recipe, out, overwrite=overwrite)
    for k, entry in results["summary"].items():
        cells = ", ".join(
            f"{m} {entry[m]['mean_normalized']:.3f}"
            for m in entry
            if isinstance(entry[m], dict) and entry[m]["mean_normalized"] is not None
        )
        click.echo(f"k={k}: ratio {results['bytes']['per_k'][k]['ratio']:.1f}x; normalized accuracy: {cells}")
    click.echo(f"wrote {out}/results.json, report.md and plots")


def _register_feature_commands() -> None:
    """Commands that live beside their feature's code; they import their heavy dependencies lazily."""
    from mergekit_subspace.analyze_command import analyze
    from mergekit_subspace.manage_command import COMMANDS as manage_commands
    from mergekit_subspace.merge.command import merge
    from mergekit_subspace.serve.command import serve
    from mergekit_subspace.train.command import train

    main.add_command(merge)
    main.add_command(analyze)
    main.add_command(serve)
    main.add_command(train)
    for command in manage_commands:  # list, rm, rename, add-many, reconstruct-all, export
        main.add_command(command)


_register_feature_commands()
main.commands["serve"].callback = _needs_extras("serve", main.commands["serve"].callback)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
