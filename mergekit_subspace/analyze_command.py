"""The `analyze` command: parse, call mergekit_subspace.analyze, print. Registered on the main group by cli.py."""

from __future__ import annotations

import click

from mergekit_subspace.command_errors import friendly
from mergekit_subspace.errors import SubspaceError


def _require_plots() -> None:
    """matplotlib draws the plots; without it, stop before any work with the install line."""
    from mergekit_subspace.extras import require_extras

    try:
        require_extras("bench")
    except SubspaceError:
        raise SubspaceError(
            "`analyze` draws its plots with matplotlib, which is not installed: "
            "pip install 'mergekit-subspace[bench]'"
        ) from None


@click.command("analyze", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", type=click.Path())
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for analysis.json, summary.md, PNGs.",
)
@click.option(
    "--base",
    type=click.Path(file_okay=False),
    help="Base model folder: also measure each update against the base's principal directions.",
)
@click.option(
    "--overwrite", is_flag=True, help="Replace a non-empty output folder (atomically, after success)."
)
@click.option("--k", "k", default=64, show_default=True, type=click.IntRange(1), help="Scree width per slot.")
@click.option(
    "--seeds", default=3, show_default=True, type=click.IntRange(1), help="Draws of each random null."
)
@click.option(
    "--leverage-k",
    default=8,
    show_default=True,
    type=click.IntRange(1),
    help="Top directions whose owners are reported.",
)
@click.option(
    "--overlap-threshold",
    default=0.9,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="lora_A row-space overlap at which two adapters count as sharing an initialization.",
)
@click.option(
    "--base-k",
    default=16,
    show_default=True,
    type=click.IntRange(1),
    help="Principal directions of W (with --base).",
)
@click.option(
    "--allow-pickle", is_flag=True, help="Accept .bin weights, loaded with torch.load(weights_only=True)."
)
@friendly
def analyze(
    source: str,
    out: str,
    base: str | None,
    overwrite: bool,
    k: int,
    seeds: int,
    leverage_k: int,
    overlap_threshold: float,
    base_k: int,
    allow_pickle: bool,
) -> None:
    """Is the zoo of SOURCE (a store folder or a compress recipe) low-dimensional beyond a random null?

    Per slot and over the zoo: captured energy against k beside rank- and norm-matched random nulls, inverse
    participation ratio and effective rank, which tasks own the top directions, adapters whose lora_A look
    shared, and with --base the principal angles, spectral shift and on- vs off-principal energy of each
    update. Writes OUT/analysis.json, OUT/summary.md and PNG plots.
    """
    _require_plots()
    from mergekit_subspace.analyze import AnalyzeOptions, run_analyze

    options = AnalyzeOptions(
        k=k, seeds=seeds, leverage_k=leverage_k, overlap_threshold=overlap_threshold, base_k=base_k
    )
    results = run_analyze(
        source, out, base=base, overwrite=overwrite, options=options, allow_pickle=allow_pickle
    )
    zoo, slots = results["zoo"], results["source"]["slots"]
    for kind in ("spectrum", "gaussian"):
        level = zoo["nulls"][kind]["levels"]["0.8"]
        click.echo(
            f"{kind} null: {zoo['nulls'][kind]['slots_beyond_null']}/{slots} slots beyond it; k for 80% "
            f"(median) zoo {level['zoo_median']}, null {level['null_median']}"
        )
    pairs = zoo["shared_init"]
    if pairs is not None:
        click.echo(
            f"shared-init pairs: {len(pairs['pairs'])} in {pairs['slots_affected']}/{pairs['slots_checked']} slots"
        )
    if "base" in zoo:
        overall = zoo["base"]["overall"]
        click.echo(
            f"on-principal share (top-{base_k}): left {overall['left_on']:.3f}, right {overall['right_on']:.3f} "
            f"(chance {zoo['base']['chance']['left_on']:.3f}, {zoo['base']['chance']['right_on']:.3f})"
        )
    click.echo(f"wrote {out}/analysis.json, summary.md and plots")
