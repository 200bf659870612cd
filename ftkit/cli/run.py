"""``ftkit run`` and ``ftkit validate``: recipes in, a trustworthy run folder out."""

from __future__ import annotations

import click

from ftkit.cli.output import print_json

SET_HELP = "Override a recipe value, e.g. --set train.lr=2e-5 (repeatable)."


@click.command(
    epilog="""\b
Examples:
  $ ftkit run recipes/quickstart.toml                 # tiny model, CPU, offline, a few minutes
  $ ftkit run recipes/emotion.toml --set train.lr=2e-5 --set train.epochs=1
  $ ftkit run recipes/emotion.toml --dry-run          # resolved recipe + memory estimate, no training
  $ ftkit run recipes/emotion.toml --overwrite        # replace an existing run folder
  $ ftkit run recipes/emotion.toml --set train.save_steps=200   # checkpoints every 200 steps
  $ ftkit run recipes/emotion.toml --resume           # continue after a crash or Ctrl-C
""",
)
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe and exit without training.")
@click.option("--overwrite", is_flag=True, help="Replace output.dir if it exists (only once the new run is complete).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its newest complete checkpoint.")
def run(recipe_path: str, overrides: tuple[str, ...], dry_run: bool, overwrite: bool, resume: bool) -> None:
    """Fine-tune as RECIPE says; evaluate base and fine-tuned models on the same test split.

    Leaves in output.dir: the adapter (safetensors) and tokenizer, labels.json, recipe.toml,
    metrics.json (baseline and fine-tuned), report.md with plots, TensorBoard logs, manifest.json.
    """
    from ftkit.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    if dry_run:
        click.echo(f"# resolved recipe: {recipe_path}")
        click.echo(recipe.to_toml())
        return
    from ftkit.pipeline import FineTuneRun

    FineTuneRun(recipe, overwrite=overwrite, resume=resume, echo=click.echo).run()


@click.command(
    epilog="""\b
Examples:
  $ ftkit validate recipes/emotion.toml
  $ ftkit validate recipes/emotion.toml --set train.batch_size=8 --json
""",
)
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the resolved recipe as JSON.")
def validate(recipe_path: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check RECIPE: every problem reported at once, one `section.key: message` per line."""
    from ftkit.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    if as_json:
        print_json(recipe.to_dict())
    else:
        click.echo(f"{recipe_path}: ok (task {recipe.task.name}, model {recipe.model.id}, method {recipe.method.name})")
