"""Helpers shared by the built-in task plugins (file reading and field checks)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ftkit.errors import DataError
from ftkit.data import iter_jsonl


def read_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, row)`` from a .jsonl file or a .json array; ``where`` is ``file:line``/``file[i]``."""
    path = Path(path)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except FileNotFoundError as error:
            raise DataError(f"{path}: no such file") from error
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from error
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
        for index, row in enumerate(data):
            if not isinstance(row, dict):
                raise DataError(f"{path}[{index}]: expected a JSON object, got {type(row).__name__}")
            yield f"{path}[{index}]", row
        return
    for line_no, row in iter_jsonl(path):
        yield f"{path}:{line_no}", row


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
