"""Hook specifications: the extension points a plugin can implement.

A plugin is a module named in the ``ftkit`` entry-point group that implements any of these
with ``@ftkit.hookimpl``. Built-in tasks in ``plugins/`` use exactly the same hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from ftkit.tasks import Task

hookspec = pluggy.HookspecMarker("ftkit")


@hookspec
def register_tasks(register: Callable[[Task], None]) -> None:
    """Register tasks by calling ``register(task)`` once for each.

    :param register: Checks the task against the contract and adds it to the registry; it raises
        ``PluginError`` for a malformed task or a name another plugin already registered.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add Click commands to the ``ftkit`` command group.

    :param cli: The top-level ``ftkit`` group; call ``cli.add_command(...)`` or use
        ``@cli.command()``. Keep heavy imports inside the command functions.
    """
