"""Folders and files ftkit writes: whole or not at all, and replaced only when ftkit made them.

A file another step reads back (recipe.toml, baseline.json, metrics.json, ...) is written to a
temporary name beside it and renamed into place, so a crash leaves the old file or the new one,
never half of one. ``--overwrite`` (``ftkit run``, ``ftkit merge``) removes only a folder ftkit
made, told by its mark: a run folder's ``manifest.json``, a merged model's :data:`MERGE_MARK`;
and never the current folder, the home folder, the recipe's folder or a folder holding one of
them, whatever it holds.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

from ftkit.errors import UsageError

#: The file ``ftkit merge`` writes into a merged model's folder: what --overwrite may replace.
MERGE_MARK = "ftkit-merge.json"
#: The file a finished run folder ends with (written last): what --overwrite may replace.
RUN_MARK = "manifest.json"


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[TextIO]:
    """A UTF-8 text file whose contents replace ``path`` only once the block ends without an error.

    Written under a temporary name beside ``path`` and renamed into place; on an error the
    temporary file goes and ``path`` is left as it was. The file gets the umask's permissions
    (mkstemp makes owner-only files).
    """
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            yield file
        os.chmod(temporary, 0o666 & ~process_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all (see :func:`atomic_writer`)."""
    with atomic_writer(path) as file:
        file.write(text)


@functools.cache
def process_umask() -> int:
    """The process's umask (read once: reading it means setting it for a moment)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def made_by_ftkit(folder: Path) -> bool:
    """Whether ``folder`` is a run folder or merged model ftkit made (its mark names ftkit)."""
    for name in (RUN_MARK, MERGE_MARK):
        try:
            mark = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        # A run's manifest names its ftkit version (older ones too); any other tool's manifest.json does not.
        if isinstance(mark, dict) and (mark.get("made_by") == "ftkit"
                                       or isinstance(mark.get("versions"), dict) and "ftkit" in mark["versions"]):
            return True
    return False


def refuse_kept(path: Path, key: str, kept: Iterable[tuple[str, Path]] = ()) -> None:
    """Refuse (one line) a ``path`` that is, or holds, the current folder, the home folder or a ``kept`` one."""
    target = path.resolve()
    for what, folder in [("the current folder", Path.cwd()), ("your home folder", Path.home()), *kept]:
        folder = folder.resolve()
        if target == folder or target in folder.parents:
            holds = "is" if target == folder else "holds"
            raise UsageError(f"{key}: {path} {holds} {what}; --overwrite never removes that, choose another folder")


def check_replaceable(path: Path, key: str, kept: Iterable[tuple[str, Path]] = ()) -> None:
    """Refuse (one line, nothing touched) to let --overwrite remove ``path`` unless ftkit made it.

    :param path: the folder --overwrite would replace.
    :param key: what names it in the message (``output.dir``, ``-o``).
    :param kept: (what, folder) pairs never removed, nor any folder holding one: the recipe's folder,
        say. The current folder and the home folder are always kept.
    """
    refuse_kept(path, key, kept)
    if path.is_symlink() or not path.is_dir():
        kind = "a symbolic link" if path.is_symlink() else "a file"
        raise UsageError(f"{key}: {path} is {kind}, not a folder ftkit made; --overwrite removed nothing, choose "
                         "another folder or remove it yourself")
    if not made_by_ftkit(path):
        raise UsageError(f"{key}: {path} is not a folder ftkit made (no ftkit {RUN_MARK} or {MERGE_MARK}); "
                         "--overwrite replaces only those and removed nothing: choose another folder or remove "
                         "it yourself")
