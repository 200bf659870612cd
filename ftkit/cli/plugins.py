"""``ftkit plugins``: what is installed, what each plugin implements, what failed to load; ``check`` one."""

from __future__ import annotations

import click

from ftkit.cli.output import print_json, print_table


@click.group(
    invoke_without_command=True,
    epilog="""\b
Examples:
  $ ftkit plugins
  $ ftkit plugins --json
  $ FTKIT_LOAD_PLUGINS=emotion ftkit tasks     # load only the `emotion` plugin
  $ ftkit plugins check my-task                # conformance checks for one task
""",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.pass_context
def plugins(ctx: click.Context, as_json: bool) -> None:
    """List plugins: distribution, version, hooks, and broken ones with their error."""
    if ctx.invoked_subcommand is not None:
        return
    from ftkit.plugins import plugin_infos

    infos = plugin_infos()
    if as_json:
        print_json(
            [
                {
                    "name": info.name,
                    "module": info.module,
                    "distribution": info.distribution,
                    "version": info.version,
                    "hooks": info.hooks,
                    "ok": info.ok,
                    "errors": info.errors,
                }
                for info in infos
            ]
        )
        return
    if not infos:
        click.echo("No plugins loaded (is FTKIT_LOAD_PLUGINS set?).")
        return
    rows = [
        (
            info.name,
            info.distribution or "-",
            info.version or "-",
            ", ".join(info.hooks) or "-",
            "ok" if info.ok else "BROKEN: " + "; ".join(info.errors),
        )
        for info in infos
    ]
    print_table(("NAME", "DISTRIBUTION", "VERSION", "HOOKS", "STATUS"), rows)


@plugins.command(
    "check",
    short_help="Run the conformance checks (ftkit.testing) on task NAME.",
    epilog="""\b
Examples:
  $ ftkit plugins check my-task                    # every check, on the task's sample_data
  $ ftkit plugins check my-task --data rows.jsonl  # on your own data file
  $ ftkit plugins check my-task --no-train --json  # skip training; machine-readable
""",
)
@click.argument("name")
@click.option("--data", "data_path", type=click.Path(dir_okay=False), help="Data file for the loader and training "
              "(default: the task's sample_data).")
@click.option("--no-train", is_flag=True, help="Skip the few training steps on the built-in tiny model.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def check(name: str, data_path: str | None, no_train: bool, as_json: bool) -> None:
    """Check that task NAME honours the task contract (the checks of `ftkit.testing`).

    Registers cleanly; the loader reads rows of one shape; format gives Examples that survive
    JSON; metrics are at their maximum on gold predictions and lower on wrong ones; and a few
    steps of `ftkit run` train on the built-in tiny model. Exits 1 if any check fails.
    """
    from ftkit.testing import run_all

    results = run_all(name, data_path, train=not no_train)
    ok = all(result.ok for result in results)
    if as_json:
        print_json({"task": name, "ok": ok,
                    "checks": [{"name": r.name, "ok": r.ok, "message": r.message} for r in results]})
    else:
        width = max(len(r.name) for r in results)
        for result in results:
            mark = click.style("✓", fg="green") if result.ok else click.style("✗", fg="red")
            click.echo(f"{mark} {result.name.ljust(width)}  {result.message}")
        failed = sum(not r.ok for r in results)
        click.echo(f"{name}: all {len(results)} checks passed" if ok else f"{name}: {failed} check failed")
    if not ok:
        raise click.exceptions.Exit(1)
