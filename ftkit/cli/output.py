"""Small output helpers shared by commands: aligned tables for people, JSON for scripts."""

from __future__ import annotations

import json
import os
import sys
import unicodedata
from collections.abc import Sequence
from typing import Any

import click


def display_width(text: str) -> int:
    """Terminal columns ``text`` takes: CJK characters are two columns wide."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - display_width(text))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print rows under headers, columns aligned; the last column is not padded."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(display_width(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        line = "  ".join(_pad(c, w) for c, w in zip(row[:-1], widths[:-1])) + "  " + row[-1]
        click.secho(line.rstrip(), bold=index == 0)


def print_json(data: Any) -> None:
    """Print ``data`` as indented JSON (UTF-8, not ASCII-escaped) on stdout."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def warn(message: str) -> None:
    """A one-line warning on stderr."""
    click.secho(f"Warning: {message}", fg="yellow", err=True)


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()


def quiet_closed_stdout() -> None:
    """Point stdout at the null device once its reader has gone (a pipe into ``head``).

    Python flushes stdout at exit, and writing into the closed pipe again would print "Exception
    ignored ... BrokenPipeError" there: this is the remedy Python's documentation gives (signal
    module, "Note on SIGPIPE").
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file: a test runner's buffer
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
