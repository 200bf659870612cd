"""Reading data files with errors that name ``file:line``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftkit.errors import DataError


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)`` for each JSON object in a JSONL file (blank lines skipped).

    Parsing goes through jsonlines; we feed it lines ourselves because it reports line numbers
    only for invalid lines, and users need ``file:line`` for field errors too. A UTF-8 BOM
    (common from Windows editors) is accepted.
    """
    import jsonlines

    path = Path(path)
    line_no = 0

    def lines(handle) -> Iterator[str]:  # noqa: ANN001 - a text file
        nonlocal line_no
        for line_no, line in enumerate(handle, start=1):  # noqa: B007 - read by the loop below
            yield line

    try:
        with path.open(encoding="utf-8-sig") as handle:
            for row in jsonlines.Reader(lines(handle)).iter(skip_empty=True):
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
                yield line_no, row
    except jsonlines.InvalidLineError as error:
        raise DataError(f"{path}:{line_no}: not valid JSON ({error.__cause__ or error})") from None
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a .jsonl file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}:{line_no + 1}: not UTF-8 text ({error.reason}); re-save the file as UTF-8") from None
