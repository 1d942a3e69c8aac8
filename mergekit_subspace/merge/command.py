"""The `merge` click command: parse arguments, call merge.run, print. Registered on the main group by cli.py."""

from __future__ import annotations

import click

from mergekit_subspace.command_errors import friendly

HELP = """Merge tasks of a store (or PEFT adapter folders) as RECIPE says.

\b
RECIPE is YAML shaped like mergekit's:
  merge_method: ties
  store: stores/my-zoo            # or  adapters: [zoo/a, zoo/b]
  tasks:
    - {name: legal, weight: 1.0, validation: data/legal.jsonl}
    - {name: medical, weight: [1.0, 0.5]}   # gradient over layers
  parameters: {density: 0.3}
  output: {path: out/merged, format: peft, rank: 16, heads: per_task}

\b
Methods (each merges the tasks' small cores in the shared basis):
{methods}

merge_method: auto (with validation data) tries every method, or the list `auto_methods:`, over the
lambda grid and writes the best; the whole table goes into the report.

Writes merge_report.json beside the model(s): method, parameters, weights, the lambda chosen on the
validation data with its scores, and timings.
"""


class _MergeCommand(click.Command):
    """Lists the registered methods only when help is shown: the registry imports torch, which
    `mergekit-subspace --help` should not wait for."""

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from mergekit_subspace.merge.methods import METHODS

        methods = "\n".join(
            f"  {m.name:<16} {m.summary}.\n  {'':<16} {m.reference}" for m in METHODS.values()
        )
        self.help = HELP.replace("{methods}", methods)
        super().format_help_text(ctx, formatter)


@click.command(
    "merge",
    cls=_MergeCommand,
    help=HELP,
    short_help="Merge tasks of a store (or PEFT adapter folders) as RECIPE says.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "--out", type=click.Path(file_okay=False), help="Output folder (default: the recipe's output.path)."
)
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing output folder (atomically, after success)."
)
@click.option(
    "--allow-pickle", is_flag=True, help="Accept .bin adapters, loaded with torch.load(weights_only=True)."
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option(
    "--device", default="cpu", show_default=True, help="Torch device for fitting a basis on `adapters:`."
)
@friendly
def merge(
    recipe: str, out: str | None, overwrite: bool, allow_pickle: bool, quiet: bool, device: str
) -> None:
    from mergekit_subspace.merge.run import REPORT
    from mergekit_subspace.merge.run import merge as run_merge

    result = run_merge(
        recipe, out=out, overwrite=overwrite, allow_pickle=allow_pickle, progress=not quiet, device=device
    )
    if result is None:  # another rank of a torchrun merge: rank 0 reports
        return
    report = result.report
    seconds = report["seconds"]
    line = f"merged {len(report['tasks'])} task(s) with {report['method']} (lambda {report['lambda']:g}"
    if report["lambda_source"] == "validation":
        best = max(report["validation"]["mean_scores"])
        chosen = f"best of {len(report['auto']['candidates'])} methods" if "auto" in report else "chosen"
        line += f", {chosen} on validation: mean score {best:.4f}"
        tuned = report["validation"].get("task_weights")
        if tuned:
            moved = {t: s for t, s in tuned["scales"].items() if s != 1.0}
            shown = ", ".join(f"{t} x{s:g}" for t, s in moved.items()) or "none changed"
            line += f"; task weights on validation: {tuned['score']:.4f} ({shown})"
    timing = f" + {seconds['validation']:.1f} s validation" if "validation" in seconds else ""
    click.echo(line + f") in {seconds['merge']:.3f} s{timing}")
    for label, folder in sorted(result.folders.items()):
        click.echo(f"wrote {folder}" + ("" if label == "merged" else f"  ({label})"))
    click.echo(f"report {result.out / REPORT}")
