"""The plugin manager: finds plugins in the ``ftkit`` entry-point group and builds the task registry.

Built-in tasks are found exactly like a third party's: through the entry points ftkit's own
``pyproject.toml`` declares. Loading is idempotent. ``FTKIT_LOAD_PLUGINS`` narrows what loads: a
comma-separated list of entry-point or distribution names (set but empty: load none).

pluggy's own ``load_setuptools_entrypoints`` stops at the first plugin that fails to import;
we load entry points one by one instead, so a broken plugin is reported and skipped while
the rest keep working.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

import pluggy

from ftkit import hookspecs
from ftkit.errors import PluginError, UsageError
from ftkit.tasks import Task

if TYPE_CHECKING:
    import click

ENTRY_POINT_GROUP = "ftkit"
ENV_FILTER = "FTKIT_LOAD_PLUGINS"


@dataclass
class PluginInfo:
    """What ``ftkit plugins`` shows for one plugin."""

    name: str
    module: str
    distribution: str | None
    version: str | None
    hooks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


_pm: pluggy.PluginManager | None = None
_infos: dict[str, PluginInfo] = {}


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with entry-point plugins loaded (once)."""
    global _pm
    if _pm is None:
        _pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        _pm.add_hookspecs(hookspecs)
        for ep in _selected_entry_points():
            _load_entry_point(_pm, ep)
    return _pm


def _selected_entry_points() -> list[EntryPoint]:
    eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    wanted = os.environ.get(ENV_FILTER)
    if wanted is None:
        return eps
    names = {n.strip() for n in wanted.split(",") if n.strip()}
    return [ep for ep in eps if ep.name in names or (ep.dist is not None and ep.dist.name in names)]


def _load_entry_point(pm: pluggy.PluginManager, ep: EntryPoint) -> None:
    info = PluginInfo(
        name=ep.name,
        module=ep.value,
        distribution=ep.dist.name if ep.dist else None,
        version=ep.dist.version if ep.dist else None,
    )
    _infos[ep.name] = info
    try:
        module = ep.load()
        pm.register(module, name=ep.name)
    except Exception as error:  # noqa: BLE001 - any failure in third-party code marks it broken
        info.errors.append(f"failed to load: {type(error).__name__}: {error}")
        return
    info.hooks = sorted(caller.name for caller in pm.get_hookcallers(module) or [])


def register_plugin(module: Any, name: str) -> None:
    """Register an already-imported plugin module (for plugins that are not installed packages)."""
    pm = plugin_manager()
    pm.register(module, name=name)
    _infos[name] = PluginInfo(
        name=name,
        module=getattr(module, "__name__", repr(module)),
        distribution=None,
        version=None,
        hooks=sorted(caller.name for caller in pm.get_hookcallers(module) or []),
    )


def unregister_plugin(name: str) -> None:
    """Undo :func:`register_plugin`."""
    pm = plugin_manager()
    plugin = pm.get_plugin(name)
    if plugin is not None:
        pm.unregister(plugin, name=name)
    _infos.pop(name, None)


def _call_each(hook_name: str, make_kwargs: Callable[[str], dict[str, Any]]) -> None:
    """Call one hook plugin by plugin, recording a failure against the plugin that raised it."""
    caller = getattr(plugin_manager().hook, hook_name)
    for impl in reversed(caller.get_hookimpls()):  # registration order
        kwargs = make_kwargs(impl.plugin_name)
        try:
            impl.function(*(kwargs[arg] for arg in impl.argnames))
        except Exception as error:  # noqa: BLE001 - one bad plugin must not break the others
            info = _infos.get(impl.plugin_name)
            message = str(error) if isinstance(error, PluginError) else f"{type(error).__name__}: {error}"
            if info is not None and f"{hook_name}: {message}" not in info.errors:
                info.errors.append(f"{hook_name}: {message}")


def registered_tasks() -> dict[str, tuple[Task, str]]:
    """Every task, by name, with the name of the plugin that registered it."""
    found: dict[str, tuple[Task, str]] = {}

    def make_register(plugin_name: str) -> dict[str, Any]:
        def register(task: Task) -> None:
            if not isinstance(task, Task):
                raise PluginError(f"register() takes an ftkit.Task, got {type(task).__name__}")
            task.check()
            if task.name in found:
                owner = found[task.name][1]
                raise PluginError(
                    f"task {task.name!r} from plugin {plugin_name!r} refused: "
                    f"plugin {owner!r} already registers a task of that name"
                )
            found[task.name] = (task, plugin_name)

        return {"register": register}

    _call_each("register_tasks", make_register)
    return dict(sorted(found.items()))


def get_task(name: str) -> Task:
    """The task called ``name``, or a UsageError that suggests close names."""
    tasks = registered_tasks()
    if name in tasks:
        return tasks[name][0]
    close = difflib.get_close_matches(name, tasks, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UsageError(f"unknown task {name!r}: {hint}`ftkit tasks` lists the installed ones")


def plugin_infos() -> list[PluginInfo]:
    """Every plugin found, loaded or broken, sorted by name (call after tasks are registered)."""
    plugin_manager()
    registered_tasks()  # surfaces registration errors into the infos
    return sorted(_infos.values(), key=lambda info: info.name)


def register_plugin_commands(cli: click.Group) -> None:
    """Let plugins add commands to the top-level group."""
    _call_each("register_commands", lambda _name: {"cli": cli})
