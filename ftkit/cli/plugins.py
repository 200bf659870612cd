"""``ftkit plugins``: what is installed, what each plugin implements, and what failed to load."""

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
