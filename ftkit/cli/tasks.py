"""``ftkit tasks``: the installed tasks, from every plugin."""

from __future__ import annotations

import click

from ftkit.cli.output import print_json, print_table, warn
from ftkit.tasks import Task


def task_summary(task: Task, plugin: str) -> dict:
    """The stable JSON shape of one task."""
    return {
        "name": task.name,
        "kind": task.kind,
        "description": task.description,
        "labels": list(task.labels) if task.labels else None,
        "headline_metric": task.headline_metric,
        "default_head": task.default_head,
        "hub_dataset": task.hub_dataset,
        "data_format": task.data_format,
        "options": dict(task.options),
        "fields": [{"name": f.name, "help": f.help, "aliases": list(f.aliases), "required": f.required}
                   for f in task.fields],
        "group_by": task.group_by,
        "plugin": plugin,
    }


def _warn_broken() -> None:
    from ftkit.plugins import plugin_infos

    for info in plugin_infos():
        if not info.ok:
            warn(f"plugin {info.name!r} is broken and was skipped: {info.errors[0]} (see `ftkit plugins`)")


@click.group(
    invoke_without_command=True,
    epilog="""\b
Examples:
  $ ftkit tasks
  $ ftkit tasks --json | jq '.[].name'
  $ ftkit tasks show bank-intent
""",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.pass_context
def tasks(ctx: click.Context, as_json: bool) -> None:
    """List the installed tasks (built-in and from third-party plugins)."""
    if ctx.invoked_subcommand is not None:
        return
    from ftkit.plugins import registered_tasks

    found = registered_tasks()
    _warn_broken()
    if as_json:
        print_json([task_summary(task, plugin) for task, plugin in found.values()])
        return
    if not found:
        click.echo("No tasks installed. Check `ftkit plugins` (and FTKIT_LOAD_PLUGINS).")
        return
    rows = []
    for task, plugin in found.values():
        labels = str(len(task.labels)) if task.labels else ("data" if task.kind == "classification" else "-")
        rows.append((task.name, task.kind, labels, task.headline_metric, plugin, task.description))
    print_table(("NAME", "KIND", "LABELS", "METRIC", "PLUGIN", "DESCRIPTION"), rows)


@tasks.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def show(name: str, as_json: bool) -> None:
    """Show one task: labels, data layout, hub dataset, metrics, options.

    \b
    Example:
      $ ftkit tasks show emotion
    """
    from ftkit.plugins import get_task, registered_tasks

    task = get_task(name)
    summary = task_summary(task, registered_tasks()[name][1])
    if as_json:
        print_json(summary)
        return
    click.secho(task.name, bold=True)
    click.echo(f"  {task.description}")
    click.echo(f"  kind:            {task.kind} (default head: {task.default_head})")
    if task.labels:
        click.echo(f"  labels:          {', '.join(task.labels)} (map yours onto them with task.label_map)")
    elif task.kind == "classification":
        click.echo("  labels:          the training data's own (or task.labels)")
    click.echo(f"  headline metric: {task.headline_metric}")
    click.echo(f"  data format:     {task.data_format or '-'}")
    click.echo(f"  hub dataset:     {task.hub_dataset or '- (local files only)'}")
    click.echo(f"  plugin:          {summary['plugin']}")
    if task.fields:
        click.echo("  fields (map your columns onto them with task.columns = { FIELD = \"column\" }):")
        for spec in task.fields:
            found = f"; read from {' or '.join([spec.name, *spec.aliases])}" if spec.aliases else ""
            optional = " (optional)" if not spec.required else ""
            click.echo(f"    {spec.name}{optional}: {spec.help}{found}")
    click.echo(f"  split groups:    {'rows sharing ' + task.group_by + ' stay on one side' if task.group_by else 'by source row'}"
               " (task.group_by)")
    click.echo("  data keys:       task.train_file, test_file, columns, group_by"
               + (", label_map, drop_labels, labels" if task.kind == "classification" else "")
               + " (files: JSONL, JSON, CSV, TSV, Parquet, a saved dataset folder)")
    if task.options:
        click.echo("  options:")
        for option, help_text in task.options.items():
            click.echo(f"    {option}: {help_text}")
