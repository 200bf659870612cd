"""Reading a data source into an Arrow table through ``datasets``, with ``file:line`` in every error.

JSONL, JSON (an array, or an object holding one), CSV, TSV, Parquet and folders written by
``Dataset.save_to_disk``. ``datasets`` caches each file as memory-mapped Arrow, so a large file is
never a Python list of dicts; the line a record starts on is worked out only when a message needs
it. :mod:`ftkit.sources` maps the table onto a task.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftkit.errors import DataError

if TYPE_CHECKING:
    import pyarrow as pa

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
            ".parquet": "parquet", ".pq": "parquet"}
FORMATS = "JSONL, JSON, CSV, TSV, Parquet, or a folder written by Dataset.save_to_disk"
BATCH = 4096


def is_text(kind: pa.DataType) -> bool:
    """A string column, of either offset width, or a dictionary of strings (labels)."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


@contextmanager
def system_allocator() -> Iterator[None]:
    """Arrow allocates through the system allocator (malloc) inside; as a decorator too.

    ftkit's data work makes few, large Arrow buffers: masks, label codes, the kept rows of a
    split. pyarrow's default pool (mimalloc) reserves memory for each thread that allocates, and
    keeps what is freed, so these few megabytes cost several more of resident memory. malloc
    hands large buffers back as they are freed. Measured by ``bench/data_loading.py`` on 200,000
    CSV rows (19 MB): load, check and split grew the process by 40 MB under mimalloc and by 37 MB
    under this; with the two split tables built, 94 MB against 80 MB, and no slower. Buffers keep
    the pool they came from, so restoring the previous pool afterwards is safe.
    """
    import pyarrow as pa

    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


# -- reading a source into an Arrow table --------------------------------------------------------

@dataclass
class Source:
    """A read data source: its Arrow table of source columns and how to name a row in messages."""

    name: str
    table: pa.Table
    kind: str
    class_names: dict[str, list[str]] = field(default_factory=dict)  # ClassLabel columns: int -> name
    _lines: list[int] | None = None  # the line each record starts on, once known

    def where(self, index: int) -> str:
        """``file:line`` for line-based files, ``file[i]`` otherwise."""
        if self.kind in ("jsonl", "csv", "tsv"):
            return f"{self.name}:{self._line_of(index)}"
        return f"{self.name}[{index}]"

    def _line_of(self, index: int) -> int:
        if self._lines is None:
            self._lines = _record_lines(Path(self.name), self.kind)
        return self._lines[index] if index < len(self._lines) else index + 1


def _record_lines(path: Path, kind: str) -> list[int]:
    """The line on which each record starts (computed only when a message needs one)."""
    if kind == "jsonl":
        with path.open("rb") as handle:
            return [n for n, line in enumerate(handle, start=1) if line.strip()]
    lines, delimiter = [], "\t" if kind == "tsv" else ","
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        start = 1
        for n, _ in enumerate(reader):
            if n:  # the header is not a record
                lines.append(start)
            start = reader.line_num + 1
    return lines


def _quiet_datasets():  # noqa: ANN202 - the datasets module
    import datasets

    # ftkit reports a file's problems itself, naming the line; datasets' own log lines would repeat
    # them without it.
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)
    return datasets


def source_kind(path: Path) -> str:
    if path.is_dir():
        return "arrow"
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown data file type {path.suffix or '(no suffix)'!r}; use {FORMATS}")
    return kind


def read_source(path: str | Path, on_error: Callable[[DataError], None] | None = None) -> Source:
    """A local file or folder as an Arrow table (memory-mapped where ``datasets`` caches it).

    With ``on_error``, a JSONL file with bad lines is still read: each bad line is reported to it
    and left out (``ftkit data validate`` lists every problem, not the first).
    """
    path = Path(path)
    if not path.exists():
        if any(parent.is_file() for parent in path.parents):
            raise DataError(f"{path}: a part of this path is a file, not a folder; check the path")
        raise DataError(f"{path}: no such file; check the path")
    if path.is_dir() and not (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file():
        raise DataError(f"{path}: is a folder, expected a data file (or a folder written by Dataset.save_to_disk)")
    kind = source_kind(path)
    try:
        if kind == "jsonl":
            try:
                return _read_jsonl(path)
            except DataError:
                if on_error is None:
                    raise
                return _read_jsonl_leniently(path, on_error)
        if kind == "json":
            return _read_json(path)
        if kind in ("csv", "tsv"):
            return _read_csv(path, kind)
        if kind == "parquet":
            return _from_dataset(str(path), kind, _load("parquet", path))
        return _read_saved(path)
    except PermissionError:
        raise DataError(f"{path}: permission denied; check the file's permissions") from None


def _load(builder: str, path: Path, **kwargs: Any):  # noqa: ANN202 - a datasets.Dataset
    datasets = _quiet_datasets()
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except (ValueError, StopIteration) as error:
        if "no data" in str(error) or isinstance(error, StopIteration):
            raise DataError(f"{path}: the file is empty; it holds no rows") from None
        raise DataError(f"{path}: cannot read it as {builder.upper()} ({error})") from None
    except Exception as error:  # noqa: BLE001 - datasets wraps its readers' errors in its own
        cause = error.__cause__ or error
        raise DataError(f"{path}: cannot read it as {builder.upper()} ({type(cause).__name__}: "
                        f"{str(cause).splitlines()[0] if str(cause) else ''})") from None


def _from_dataset(name: str, kind: str, dataset) -> Source:  # noqa: ANN001
    from datasets import ClassLabel, Json

    classes = {col: list(feature.names) for col, feature in dataset.features.items() if isinstance(feature, ClassLabel)}
    source = Source(name=name, table=dataset.data.table, kind=kind, class_names=classes)
    mixed = [col for col, feature in dataset.features.items() if isinstance(feature, Json)]
    if mixed:
        _raise_mixed(source, dataset, mixed[0])
    return source


def _raise_mixed(source: Source, dataset, column: str) -> None:  # noqa: ANN001
    """A column whose values are of several JSON types: name the first row that differs."""
    first: str | None = None
    for index, value in enumerate(dataset[column]):
        if value is None:
            continue
        kind = type(value).__name__
        if first is None:
            first, first_at = kind, index
        elif kind != first:
            raise DataError(f"{source.where(index)}: column {column!r} mixes types ({kind} here, {first} at "
                            f"{source.where(first_at)}); make every value of a column the same type")
    raise DataError(f"{source.name}: column {column!r} mixes value types; make every value the same type")


def _read_jsonl(path: Path) -> Source:
    import pyarrow as pa

    from ftkit.data import iter_jsonl

    # datasets reads a line holding a JSON array as a text column, and reports a bad line without
    # its number: look for lines that are not objects first (a byte scan), and let the line-by-line
    # reader name the problem where there is one.
    with path.open("rb") as handle:
        suspect = any((line := raw.lstrip(b"\xef\xbb\xbf \t\r\n")) and not line.startswith(b"{") for raw in handle)
    if suspect:
        for _ in iter_jsonl(path):
            pass
    try:
        dataset = _load("json", path)
    except DataError:
        for _ in iter_jsonl(path):  # raises the line's own error
            pass
        raise
    if dataset.num_rows == 0:
        raise DataError(f"{path}: the file is empty; it holds no rows")
    try:  # Arrow's JSON reader lets invalid UTF-8 into string columns, where string functions then fail
        dataset.data.table.validate(full=True)
    except pa.ArrowInvalid:
        for _ in iter_jsonl(path):  # raises the line's own "not UTF-8 text" error
            pass
        raise DataError(f"{path}: not UTF-8 text; re-save the file as UTF-8") from None
    return _from_dataset(str(path), "jsonl", dataset)


def _read_jsonl_leniently(path: Path, on_error: Callable[[DataError], None]) -> Source:
    """The good lines of a JSONL file, line by line in Python (only when the fast read failed)."""
    import pyarrow as pa

    from ftkit.data import iter_jsonl

    lines, rows, bad = [], [], []

    def report(error: DataError) -> None:
        bad.append(error)
        on_error(error)

    for line_no, row in iter_jsonl(path, report):
        lines.append(line_no)
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no readable rows" if bad else f"{path}: the file is empty; it holds no rows")
    try:
        table = pa.Table.from_pylist(rows) if rows else pa.table({})
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        column = _mixed_column(rows)
        raise DataError(f"{path}: column {column!r} mixes value types; make every value of a column the same "
                        "type") from None
    return Source(name=str(path), table=table, kind="jsonl", _lines=lines)


def _read_json(path: Path) -> Source:
    """A JSON array of objects, or an object holding one (``{"data": [...]}``, ``{"train": [...]}``)."""
    import pyarrow as pa

    from ftkit.data import read_json

    data = read_json(path)
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON array of objects, or an object holding one array; "
                            f"this object holds {len(lists)} arrays ({', '.join(lists) or 'none'})")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: the file is empty; it holds no rows")
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}[{index}]: expected a JSON object, got {type(row).__name__}")
    source = Source(name=str(path), table=pa.table({}), kind="json")
    try:
        source.table = pa.Table.from_pylist(data)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        column = _mixed_column(data)
        types = {}
        for index, row in enumerate(data):
            value = row.get(column)
            if value is None:
                continue
            kind = type(value).__name__
            if types and kind not in types:
                (first, at), = list(types.items())[:1]
                raise DataError(f"{path}[{index}]: column {column!r} mixes types ({kind} here, {first} at "
                                f"{path}[{at}]); make every value of a column the same type") from None
            types.setdefault(kind, index)
        raise DataError(f"{path}: its rows cannot form one table; make every value of a column the same type") from None
    return source


def _mixed_column(rows: list[dict]) -> str:
    seen: dict[str, type] = {}
    for row in rows:
        for key, value in row.items():
            if value is None:
                continue
            if key in seen and not isinstance(value, seen[key]):
                return key
            seen.setdefault(key, type(value))
    return next(iter(seen), "")


def _read_csv(path: Path, kind: str) -> Source:
    from datasets import Features, Value

    delimiter = "\t" if kind == "tsv" else ","
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle, delimiter=delimiter), None)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason}); re-save the file as UTF-8") from None
    if not header:
        raise DataError(f"{path}: the file is empty; it holds no header and no rows")
    if len(set(header)) != len(header):
        twice = sorted({name for name in header if header.count(name) > 1})
        raise DataError(f"{path}:1: the header names column(s) {', '.join(map(repr, twice))} more than once")
    # Every column must stay text: type guessing would turn "007" into 7 and a label column into
    # numbers. Read as pandas likes first (Arrow-backed strings: half the time and memory of forcing
    # a schema), and again with every column declared a string only when a column came back typed.
    options = {"delimiter": delimiter, "keep_default_na": False, "na_filter": False, "encoding": "utf-8-sig"}
    dataset = _load("csv", path, **options)
    if any(not (isinstance(f, Value) and f.dtype in ("string", "large_string")) for f in dataset.features.values()):
        dataset = _load("csv", path, features=Features({name: Value("string") for name in header}), **options)
    if dataset.num_rows == 0:
        raise DataError(f"{path}: the file is empty; it has a header but no rows")
    return _from_dataset(str(path), kind, dataset)


def _read_saved(path: Path) -> Source:
    datasets = _quiet_datasets()
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as error:  # noqa: BLE001 - datasets raises several types for a bad folder
        raise DataError(f"{path}: cannot read it as a saved dataset ({type(error).__name__}: {error})") from None
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset)
        raise DataError(f"{path}: holds a DatasetDict with splits {', '.join(splits)}; point at one split's "
                        f"folder, e.g. {path / splits[0]}")
    if dataset.num_rows == 0:
        raise DataError(f"{path}: the dataset is empty; it holds no rows")
    return _from_dataset(str(path), "arrow", dataset)


def source_records(source: Source | str | Path) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` for each row of a file ftkit reads; ClassLabel integers become their names.

    For plugins whose own reader handles a special layout and leaves the rest to ftkit.
    """
    if not isinstance(source, Source):
        source = read_source(source)
    index = 0
    for batch in source.table.to_batches(BATCH):
        for record in batch.to_pylist():
            # A table has every column in every row; a key the row did not have comes back None.
            record = {key: value for key, value in record.items() if value is not None}
            for col, names in source.class_names.items():
                if isinstance(record.get(col), int):
                    record[col] = names[record[col]]
            yield source.where(index), record
            index += 1
