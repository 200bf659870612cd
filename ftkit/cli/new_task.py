"""``ftkit new-task``: scaffold a publishable task-plugin package."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(
    "new-task",
    short_help="Scaffold a task-plugin package (ftkit-task-NAME).",
    epilog="""\b
Examples:
  $ ftkit new-task movie-sentiment                 # creates ./ftkit-task-movie-sentiment
  $ ftkit new-task movie-sentiment --dir plugins/sentiment
  $ cd ftkit-task-movie-sentiment && pip install -e . && ftkit plugins check movie-sentiment
""",
)
@click.argument("name")
@click.option("--dir", "target", metavar="PATH", type=click.Path(file_okay=False, path_type=Path),
              help="Folder to create (default: ./ftkit-task-NAME); it must not exist or be empty.")
def new_task(name: str, target: Path | None) -> None:
    """Scaffold a task-plugin package for task NAME (lower-case letters, digits, dashes).

    The package `ftkit-task-NAME` (import name `ftkit_task_NAME`) holds a working example task
    (sentiment, positive/negative) with loader, format and metrics, sample data, a recipe for the
    built-in tiny model, a README, and tests that use the conformance kit `ftkit.testing`.
    """
    from ftkit.scaffold import scaffold_task

    new, folder, written = scaffold_task(name, target)
    click.echo(f"Created {folder} (distribution {new.dist}, package {new.package}, task {new.name}):")
    for path in written:
        click.echo(f"  {path.as_posix()}")
    click.echo("Next:")
    click.echo(f"  $ cd {folder}")
    click.echo("  $ pip install -e .")
    click.echo(f"  $ ftkit plugins check {new.name}")
    click.echo("  $ ftkit run recipe.toml")
    click.echo("  $ pytest")
