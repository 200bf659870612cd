"""Reading data files with errors that name ``file:line``: public helpers for task plugins."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ftkit.errors import DataError

OnError = Callable[[DataError], None] | None
# One example per line is rarely more than a few KB; a line this long is usually a whole JSON array
# saved as .jsonl, or a binary file, and parsing it would only produce a confusing error later.
MAX_LINE_CHARS = 4_000_000
Records = Iterator[tuple[str, dict[str, Any]]]


def iter_jsonl(path: str | Path, on_error: OnError = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)`` for each JSON object in a JSONL file (blank lines skipped).

    Parsing goes through jsonlines; we feed it lines ourselves because it reports line numbers
    only for invalid lines, and users need ``file:line`` for field errors too. A UTF-8 BOM
    (common from Windows editors) is accepted. With ``on_error``, a bad line is reported to it
    and skipped instead of raised, so a validator can list every bad line.
    """
    import jsonlines

    path = Path(path)
    line_no = 0

    def lines(handle) -> Iterator[str]:  # noqa: ANN001 - a binary file
        # Decoded line by line (not by a text-mode file's chunks) so a bad byte names its own line.
        nonlocal line_no
        for line_no, raw in enumerate(handle, start=1):  # noqa: B007 - read through the closure
            if len(raw) > MAX_LINE_CHARS:
                raise DataError(f"{path}:{line_no}: line is {len(raw):,} bytes long (limit "
                                f"{MAX_LINE_CHARS:,}); JSONL needs one JSON object per line")
            try:
                yield raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{line_no}: not UTF-8 text ({error.reason}); "
                                "re-save the file as UTF-8") from None

    def fail(error: DataError) -> None:
        if on_error is None:
            raise error
        on_error(error)

    try:
        with path.open("rb") as handle:
            reader = jsonlines.Reader(lines(handle))
            while True:
                try:
                    row = reader.read(skip_empty=True)
                except EOFError:
                    return
                except jsonlines.InvalidLineError as error:
                    fail(DataError(f"{path}:{line_no}: not valid JSON ({_json_reason(error)}); fix or remove the line"))
                    continue
                if not isinstance(row, dict):
                    fail(DataError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}"))
                    continue
                yield line_no, row
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a data file") from None
    except NotADirectoryError:
        raise DataError(f"{path}: a part of this path is a file, not a folder; check the path") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied; check the file's permissions") from None


def _json_reason(error: Exception) -> str:
    """The decoder's reason with a column in the line (its own line/column count the newline)."""
    cause = error.__cause__
    if isinstance(cause, json.JSONDecodeError):
        return f"column {cause.pos + 1}: {cause.msg.removesuffix(' at')}"
    return str(error)


def read_records(path: str | Path, on_error: OnError = None) -> Records:
    """Yield ``(where, record)`` from a .jsonl file or a .json array; ``where`` is ``file:line``/``file[i]``."""
    path = Path(path)
    if path.suffix != ".json":
        for line_no, row in iter_jsonl(path, on_error):
            yield f"{path}:{line_no}", row
        return
    for index, row in enumerate(_json_array(path)):
        if isinstance(row, dict):
            yield f"{path}[{index}]", row
        else:
            error = DataError(f"{path}[{index}]: expected a JSON object, got {type(row).__name__}")
            if on_error is None:
                raise error
            on_error(error)


def read_json(path: Path) -> Any:
    """A whole JSON document, with ``file:line`` on a syntax error."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a data file") from None
    except NotADirectoryError:
        raise DataError(f"{path}: a part of this path is a file, not a folder; check the path") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied; check the file's permissions") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason}); re-save the file as UTF-8") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None


def _json_array(path: Path) -> list:
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    return data


def require_str(row: Mapping[str, Any], field: str, where: str) -> str:
    """``row[field]`` as a non-empty string, or a DataError naming where and which field."""
    value = row.get(field)
    if value is None:
        raise DataError(f"{where}: missing field {field!r}")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {field!r} is empty")
    return value
