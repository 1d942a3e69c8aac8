"""The `train` click command: parse arguments, call train.run, print. Registered on the main group by cli.py."""

from __future__ import annotations

import click

from mergekit_subspace.command_errors import friendly

HELP = """Train a new task as coefficients only: the base model and the store's bases stay frozen; only the
task's cores (k_out x k_in per slot, or their diagonal) and, for a classifier, its head are trained.
The task is then added to the store like any other (reconstruct, merge, serve and info see it).

\b
RECIPE is YAML:
  store: stores/my-zoo
  name: my-task
  task: sequence_classification     # or causal_lm
  train: data/train.jsonl           # {"text", "label"} per line  (causal_lm: {"prompt", "answer"})
  validation: data/val.jsonl        # optional: early stopping on its loss (patience), best state kept
  steps: 100
  lr: 0.005
  batch_size: 32
  seed: 0
  patience: 3                       # validation passes (every eval_every steps) without improvement
  max_length: 128
  cores: full                       # or diagonal
  # slots: [...]                    # default: every slot of the store
  # labels: [negative, positive]    # class names, index = label id
"""


@click.command(
    "train",
    help=HELP,
    short_help="Train a new task as cores of a store's frozen bases, and add it to the store.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly
def train(recipe: str, quiet: bool) -> None:
    from mergekit_subspace.train.recipe import parse_train_recipe

    parsed = parse_train_recipe(recipe)  # recipe errors answer before torch is imported
    from mergekit_subspace.train.run import train_task

    result = train_task(parsed, progress=not quiet)
    trained = result.entry["trained"]
    line = (
        f"trained '{result.name}' ({trained['cores']} cores, {trained['trainable_parameters']['cores']} core + "
        f"{trained['trainable_parameters']['head']} head parameters) for {trained['steps_run']} steps in "
        f"{trained['seconds']:.1f} s; train loss {trained['train_loss']:.4f}"
    )
    if trained["validation_loss"] is not None:
        line += f", validation loss {trained['validation_loss']:.4f} (step {trained['kept_step']})"
        if trained["validation_accuracy"] is not None:
            line += f", accuracy {trained['validation_accuracy']:.4f}"
    click.echo(line)
    click.echo(f"stored in {parsed.store} (relative error as stored {result.entry['rel_error']:.2e})")
