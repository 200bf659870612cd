"""The one error family ftkit raises for problems a user can fix.

The CLI turns any :class:`FtkitError` into a single ``Error: ...`` line and a non-zero exit
(tracebacks only with ``ftkit --debug``). Code that detects bad input raises one of these with a
message that names the file and line, or the recipe key, and says what to do.
"""

from __future__ import annotations


class FtkitError(Exception):
    """A problem the user can fix; ``str(error)`` is the one-line message shown to them."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} ({hint})")


class UsageError(FtkitError):
    """Bad command-line input: an unknown name, an impossible number."""

    exit_code = 2


class ConfigError(FtkitError):
    """A recipe that does not validate; ``errors`` holds every ``section.key: message`` line."""

    exit_code = 2

    def __init__(self, path: str, errors: list[str]) -> None:
        self.path = path
        self.errors = list(errors)
        if len(self.errors) == 1:
            super().__init__(f"{path}: {self.errors[0]}")
        else:
            lines = "\n".join(f"  {e}" for e in self.errors)
            super().__init__(f"{path}: {len(self.errors)} errors\n{lines}")


class DataError(FtkitError):
    """A data file that cannot be read: the message names ``file:line`` and the field."""


class ModelError(FtkitError):
    """A model that cannot be found or loaded."""


class PluginError(FtkitError):
    """A plugin that breaks the task contract (bad shape, duplicate task name)."""
