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
@click.option("--auto-fit", is_flag=True,
              help="When the estimate exceeds the GPU's free memory: lower the batch (raising gradient "
                   "accumulation to keep the effective batch), then turn on activation checkpointing.")
def run(recipe_path: str, overrides: tuple[str, ...], dry_run: bool, overwrite: bool, resume: bool,
        auto_fit: bool) -> None:
    """Fine-tune as RECIPE says; evaluate base and fine-tuned models on the same test split.

    Leaves in output.dir: the adapter (safetensors) and tokenizer, labels.json, recipe.toml,
    metrics.json (baseline and fine-tuned), report.md with plots, TensorBoard logs, manifest.json.
    """
    from ftkit.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    if dry_run:
        click.echo(f"# resolved recipe: {recipe_path}")
        click.echo(recipe.to_toml())
        _print_dry_run_estimate(recipe, auto_fit)
        return
    from ftkit.pipeline import FineTuneRun

    FineTuneRun(recipe, overwrite=overwrite, resume=resume, auto_fit=auto_fit, echo=click.echo).run()


def _print_dry_run_estimate(recipe, auto_fit: bool) -> None:  # noqa: ANN001
    """The memory estimate, as TOML comments after the resolved recipe (no torch import)."""
    from ftkit import fit
    from ftkit.plugins import get_task
    from ftkit.probe import probe_cuda

    task = get_task(recipe.task.name)
    head = recipe.train.head if recipe.train.head != "auto" else task.default_head
    shape = fit.recipe_shape(recipe)
    if shape is None:
        click.echo(f"# memory estimate: not available for {recipe.model.id} (not a Llama-style decoder whose "
                   "config is known or cached here)")
        return
    settings = fit.recipe_settings(recipe, head, len(task.labels or ()) or 2)
    result = fit.estimate(shape, settings)
    click.echo(f"# memory estimate ({shape.name}, for a CUDA GPU): {fit.describe(result)}")
    devices, _ = probe_cuda()
    if not devices:
        click.echo("# no CUDA GPU here: `ftkit estimate` with --gpu-mem checks the fit on a card")
        return
    free = max(d.free_bytes for d in devices)
    plan = fit.auto_fit(shape, settings, free)
    if plan is not None and not plan.changes:
        click.echo(f"# fits in the {free / 2**30:.1f} GiB free on this GPU")
    elif plan is not None:
        click.echo(f"# does not fit the {free / 2**30:.1f} GiB free; --auto-fit would set: {'; '.join(plan.changes)}")
    else:
        click.echo(f"# does not fit the {free / 2**30:.1f} GiB free, even at batch 1 with activation checkpointing")


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
