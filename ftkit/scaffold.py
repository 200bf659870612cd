"""``ftkit new-task``: lay out a publishable task-plugin package from the templates in ``ftkit/templates/task``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ftkit import __version__
from ftkit.errors import UsageError

# Stricter than the task contract's name rule: it also becomes a distribution and a module name.
_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")

#: Template file -> path in the new package (``{package}`` is the import package's name).
FILES = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "recipe.toml.tmpl": "recipe.toml",
    "gitignore.tmpl": ".gitignore",
    "task.py.tmpl": "src/{package}/__init__.py",
    "sample.jsonl.tmpl": "src/{package}/sample.jsonl",
    "test_task.py.tmpl": "tests/test_task.py",
}


@dataclass(frozen=True)
class NewTask:
    """The names a new plugin package is built from."""

    name: str  # the task and entry-point name: `my-task`
    dist: str  # the distribution: `ftkit-task-my-task`
    package: str  # the import package: `ftkit_task_my_task`


def names_for(name: str) -> NewTask:
    """The distribution and package names for task ``name``; UsageError if it is not a valid name."""
    if not _NAME.match(name):
        raise UsageError(f"task name {name!r}: use lower-case letters, digits and single dashes, e.g. `my-task`")
    dist = f"ftkit-task-{name}"
    return NewTask(name=name, dist=dist, package=dist.replace("-", "_"))


def render(template: str, values: dict[str, str]) -> str:
    """Fill ``{{key}}`` placeholders; an unknown key is a bug in the template, so it raises."""

    def fill(match: re.Match[str]) -> str:
        return values[match.group(1)]

    return _PLACEHOLDER.sub(fill, template)


def scaffold_task(name: str, target: Path | None = None) -> tuple[NewTask, Path, list[Path]]:
    """Write the package for task ``name`` into ``target`` (default ``./ftkit-task-NAME``).

    Refuses a name an installed plugin already registers, and a target folder that is not empty.
    :returns: The names, the folder, and the files written (relative to the folder).
    """
    from ftkit.plugins import registered_tasks

    new = names_for(name)
    target = Path(target) if target is not None else Path(new.dist)
    installed = registered_tasks()
    if name in installed:
        raise UsageError(f"task name {name!r}: plugin {installed[name][1]!r} already registers a task of that "
                         "name; choose another")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UsageError(f"{target}: already exists and is not an empty folder; choose another --dir")
    values = {"name": new.name, "dist": new.dist, "package": new.package, "ftkit_version": __version__}
    templates = resources.files("ftkit.templates") / "task"
    written = []
    for template, destination in FILES.items():
        relative = Path(destination.format(package=new.package))
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(templates.joinpath(template).read_text(encoding="utf-8"), values), encoding="utf-8")
        written.append(relative)
    return new, target, written
