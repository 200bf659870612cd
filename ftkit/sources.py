"""A task's data, from any published layout to one canonical table: read, map, check, label.

    source file/folder/hub ──read_source──▶ Arrow table of source columns
        ──task.columns / aliases──▶ the task's fields ──parse (if the task has one)──▶ canonical rows
        ──drop_labels, label_map, label set──▶ TaskData (canonical Arrow table + what was dropped)

Files are read through the ``datasets`` library (JSONL, JSON, CSV, TSV, Parquet, a folder written
by ``Dataset.save_to_disk``), so a large file stays a memory-mapped Arrow table: the checks, label
mapping and splitting below are column operations, and Python objects per row (``Example``) are
made only for what is trained or evaluated. Errors still name ``file:line`` (``file[i]`` for JSON
arrays, Parquet and Arrow), worked out only when there is something to report.

Every canonical table carries ``_row`` (the source record a row came from, for ``file:line``;
rows from one record always land in the same split), ``_group`` when a ``group_by`` column is
set (rows sharing it land in the same split too), and ``_key`` when the text compared for
duplicates and train/test overlap spans several fields (with one text field, that field is the
key: no copy of it is kept).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftkit.errors import DataError
from ftkit.readers import BATCH, Source, is_text, read_source, source_records, system_allocator

if TYPE_CHECKING:
    import pyarrow as pa

    from ftkit.tasks import Example, Task

BOOKKEEPING = ("_row", "_group", "_key")


# -- the mapping a recipe (or `ftkit data --columns ...`) gives ---------------------------------

@dataclass(frozen=True)
class DataMapping:
    """How a dataset's own layout maps onto a task's fields and labels (the recipe's ``task.*`` keys)."""

    columns: Mapping[str, str] = field(default_factory=dict)
    label_map: Mapping[str, str] = field(default_factory=dict)
    drop_labels: tuple[str, ...] = ()
    group_by: str = ""
    labels: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_section(cls, section: Any) -> DataMapping:
        """From a recipe's ``[task]`` section."""
        return cls(columns=dict(section.columns), label_map=dict(section.label_map),
                   drop_labels=tuple(section.drop_labels), group_by=section.group_by,
                   labels=tuple(section.labels), options=dict(section.options))


def mapping_errors(task: Task, mapping: DataMapping, prefix: str = "task.") -> list[str]:
    """What is wrong with ``mapping`` for ``task`` before any data is read (recipe validation)."""
    import difflib

    errors = []
    known = [f.name for f in task.fields]
    for name in mapping.columns:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            hint = f"; did you mean `{close[0]}`?" if close else f"; {task.name} reads {', '.join(known) or 'no named fields'}"
            errors.append(f"{prefix}columns.{name}: unknown field for {task.name}{hint}")
    if task.kind != "classification":
        for key in ("label_map", "drop_labels"):
            if getattr(mapping, key):
                errors.append(f"{prefix}{key}: {task.name} is a {task.kind} task; {key} is for classification")
        return errors
    allowed = mapping.labels or task.labels
    if allowed:
        for source, target in mapping.label_map.items():
            if target not in allowed:
                errors.append(f"{prefix}label_map.{source}: {target!r} is not one of the labels "
                              f"({', '.join(allowed)})")
    both = sorted(set(mapping.drop_labels) & set(mapping.label_map))
    if both:
        errors.append(f"{prefix}drop_labels: {', '.join(both)} also in label_map; a label is either mapped or dropped")
    return errors


# -- from source columns to the task's canonical rows --------------------------------------------

@dataclass
class TaskData:
    """A task's canonical rows (Arrow) plus what happened on the way, for reports and dry runs."""

    source: str
    table: pa.Table
    records: int
    dropped: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    where: Callable[[int], str] = str
    key_column: str = "_key"

    def keys(self):  # noqa: ANN201 - a pyarrow ChunkedArray
        """The text compared for duplicates and train/test overlap, one per row."""
        return self.table.column(self.key_column)

    @property
    def labels(self) -> list[str] | None:
        if "label" not in self.table.column_names:
            return None
        import pyarrow.compute as pc

        return sorted(str(v) for v in pc.unique(self.table.column("label")).to_pylist())

    def __len__(self) -> int:
        return self.table.num_rows

    @system_allocator()
    def take(self, indices: Any) -> TaskData:
        return TaskData(self.source, _take_rows(self.table, indices), self.records, self.dropped, self.errors,
                        self.where, self.key_column)

    def rows(self) -> Iterator[dict[str, Any]]:
        """Canonical rows as dicts, without the bookkeeping columns, batch by batch."""
        table = self.table.drop_columns([c for c in BOOKKEEPING if c in self.table.column_names])
        for batch in table.to_batches(BATCH):
            yield from batch.to_pylist()

    def examples(self, task: Task) -> list[Example]:
        return [task.format(row) for row in self.rows()]


def _take_rows(table: pa.Table, indices: Any) -> pa.Table:
    """The rows at ``indices``, one record batch at a time when they are sorted (as splits are).

    ``Table.take`` concatenates each column's chunks first: a copy of the whole table before the
    copy of the rows, which more than doubled what building a split's tables cost
    (bench/data_loading.py, 200,000 rows: 43 MB of growth, 18 MB batch by batch).
    """
    import numpy as np
    import pyarrow as pa

    rows = np.asarray(indices, dtype=np.int64)
    if len(rows) and (rows[0] < 0 or rows[-1] >= table.num_rows or (np.diff(rows) < 0).any()):
        return table.take(pa.array(rows))  # unsorted, or out of range: Arrow's own take (and its IndexError)
    batches, start = [], 0
    for batch in table.to_batches():
        end = start + batch.num_rows
        low, high = np.searchsorted(rows, [start, end])
        if high > low:
            batches.append(batch.take(pa.array(rows[low:high] - start)))
        start = end
    return pa.Table.from_batches(batches, schema=table.schema)


@system_allocator()
def load_task_data(task: Task, path: str | Path | None, mapping: DataMapping, *, collect: bool = False,
                   role: str = "train") -> TaskData:
    """Read ``path`` (None: the task's hub dataset) into the task's canonical rows.

    Strict by default: the first bad row raises a DataError naming it. With ``collect`` every
    problem is listed in ``errors`` and bad rows are left out (``ftkit data validate``).
    """
    errors: list[str] = []

    def fail(message: str) -> None:
        if not collect:
            raise DataError(message)
        errors.append(message)

    if path is None or str(path) == "":
        data = _from_rows(task, _hub_rows(task, mapping), mapping, task.hub_dataset or "hub", lambda i: f"{task.hub_dataset}[{i}]")
    elif task.parse is None and task.fields:
        source = read_source(path, (lambda e: fail(str(e))) if collect else None)
        data = _flat(task, source, mapping, fail)
    elif task.parse is not None:
        data = _parsed(task, Path(path), mapping, fail)
    else:  # a third-party task with only a whole-file loader
        rows = task.load(str(path), **_options(task, mapping))
        data = _from_rows(task, ((i, None, row, row) for i, row in enumerate(rows)), mapping, str(path),
                          lambda i: f"{path}[{i}]")
    _labels(task, data, mapping, fail)
    data.errors = errors + data.errors
    if not len(data) and not data.errors:
        reasons = ", ".join(f"{n} {reason}" for reason, n in data.dropped.items())
        raise DataError(f"{data.source}: no examples; " + (f"every row was dropped ({reasons})" if reasons
                                                            else "the file is empty"))
    return data


def _options(task: Task, mapping: DataMapping) -> dict[str, Any]:
    options = dict(mapping.options)
    if mapping.labels:
        options["labels"] = list(mapping.labels)
    return options


def _resolve_columns(task: Task, source: Source, mapping: DataMapping) -> dict[str, str]:
    """Task field -> source column, from ``columns`` or else the field's own name and aliases."""
    have = source.table.column_names
    chosen: dict[str, str] = {}
    for spec in task.fields:
        wanted = mapping.columns.get(spec.name)
        if wanted is not None:
            if wanted not in have:
                raise DataError(f"{source.name}: task.columns.{spec.name} names column {wanted!r}, which the file "
                                f"does not have; its columns: {', '.join(have)}{_delimiter_hint(source)}")
            chosen[spec.name] = wanted
            continue
        found = next((name for name in (spec.name, *spec.aliases) if name in have), None)
        if found is not None:
            chosen[spec.name] = found
        elif spec.required:
            names = " or ".join(repr(n) for n in (spec.name, *spec.aliases))
            # A wrong delimiter is the real fix there, not a mapping onto the one merged column.
            free = [col for col in have if col not in chosen.values()]  # not already read as another field
            fix = _delimiter_hint(source) or (f"; name it with task.columns, e.g. columns = "
                                              f"{{ {spec.name} = \"{free[0] if free else 'COLUMN'}\" }}")
            raise DataError(f"{source.name}: no column for the field {spec.name!r} (looked for {names}); its columns: "
                            f"{', '.join(have)}{fix}")
    return chosen


def _delimiter_hint(source: Source) -> str:
    """A CSV read with the wrong delimiter arrives as one column whose name holds the real ones."""
    if source.kind in ("csv", "tsv") and len(source.table.column_names) == 1:
        name = source.table.column_names[0]
        for char, label in (("\t", "tabs"), (";", "semicolons"), ("|", "pipes"), (",", "commas")):
            if char in name:
                fix = {"\t": "name the file .tsv", ",": "name the file .csv"}.get(
                    char, "save it with commas (or with tabs, as .tsv)")
                return f"; the header looks separated by {label}, not by " \
                       f"{'tabs' if source.kind == 'tsv' else 'commas'}: {fix}"
    return ""


def _flat(task: Task, source: Source, mapping: DataMapping, fail: Callable[[str], None]) -> TaskData:
    """Tasks whose rows are plain fields: every check is a column operation (no Python per row)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    chosen = _resolve_columns(task, source, mapping)
    table = source.table
    n = table.num_rows
    bad = np.zeros(n, dtype=bool)
    columns: dict[str, pa.Array] = {}
    for spec in task.fields:
        if spec.name not in chosen:
            continue
        name = chosen[spec.name]
        column = table.column(name)
        shown = repr(spec.name) if name == spec.name else f"{spec.name!r} (column {name!r})"
        if spec.name == "label" and name in source.class_names:
            column = pa.chunked_array([pa.DictionaryArray.from_arrays(chunk, pa.array(source.class_names[name]))
                                       for chunk in column.chunks])
        elif spec.name == "label" and (pa.types.is_integer(column.type) or pa.types.is_boolean(column.type)):
            column = pc.cast(column, pa.string())
        if not (is_text(column.type) or pa.types.is_null(column.type)):
            first = int(pc.index(pc.is_valid(column), True).as_py())
            type_name = type(table.column(name)[first].as_py()).__name__ if first >= 0 else str(column.type)
            fail(f"{source.where(max(first, 0))}: field {shown} must be a string, got {type_name}")
            bad[:] = True
            continue
        if pa.types.is_null(column.type):
            column = pc.cast(column, pa.string())  # large_string stays: a cast would copy the text
        missing = pc.is_null(column).to_numpy(zero_copy_only=False)
        if spec.required:
            _report(missing & ~bad, source, f"missing field {shown}" if name == spec.name else f"{shown} is missing",
                    fail)
            bad |= missing
        else:
            column = pc.fill_null(column, "")
        if spec.name == "label":  # few distinct values: check those, keep integer codes per row
            column = pc.dictionary_encode(column).combine_chunks()
            if pa.types.is_dictionary(column.dictionary.type):
                column = pc.dictionary_encode(column.dictionary.take(column.indices)).combine_chunks()
            blank_values = np.array([not (v or "").strip() for v in column.dictionary.to_pylist()] or [False])
            codes = column.indices if not column.indices.null_count else pc.fill_null(column.indices, 0)
            blank = blank_values[codes.to_numpy(zero_copy_only=False)]
        else:  # no trimmed copy of the text: utf8_is_space agrees with utf8_trim_whitespace
            blank = pc.fill_null(pc.or_(pc.utf8_is_space(column), pc.equal(column, pa.scalar("", column.type))),
                                 False).to_numpy(zero_copy_only=False)
        if spec.required:
            empty = blank & ~bad
            _report(empty, source, f"field {shown} is empty", fail)
            bad |= empty
        columns[spec.name] = column
    out = pa.table(columns) if columns else pa.table({"_": pa.nulls(n)})
    out = out.append_column("_row", pa.array(np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)))
    if bad.any():
        out = _keep_rows(out, ~bad)
    group = _group_column(task, source, mapping, out, chosen)
    if group is not None:
        out = out.append_column("_group", group)
    out, key = _with_key(task, out)
    return TaskData(source=source.name, table=out, records=n, where=source.where, key_column=key)


def _report(mask: Any, source: Source, message: str, fail: Callable[[str], None]) -> None:
    import numpy as np

    for index in np.flatnonzero(mask)[:1000]:
        fail(f"{source.where(int(index))}: {message}")


def _keep_rows(table: pa.Table, keep: Any) -> pa.Table:
    """The rows where ``keep`` (a bool array) is true.

    A filter copies every column; when only a few rows go, zero-copy slices between them keep
    the (memory-mapped) columns as they are.
    """
    import numpy as np
    import pyarrow as pa

    gone = np.flatnonzero(~keep)
    if len(gone) > 1000 or len(gone) == len(keep):
        return table.filter(pa.array(keep))
    starts, ends = np.concatenate(([0], gone + 1)), np.concatenate((gone, [len(keep)]))
    return pa.concat_tables([table.slice(start, end - start) for start, end in zip(starts, ends) if end > start])


def _group_column(task: Task, source: Source, mapping: DataMapping, out: pa.Table, chosen: dict[str, str]):  # noqa: ANN202
    """The ``group_by`` column's value for each row (as text), or None when there is no ``group_by``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    group_by = mapping.group_by or task.group_by or ""
    if not group_by:
        return None
    column = chosen.get(group_by, group_by)
    if column not in source.table.column_names:
        raise DataError(f"{source.name}: task.group_by names column {group_by!r}, which the file does not have; "
                        f"its columns: {', '.join(source.table.column_names)}")
    return pc.cast(pc.take(source.table.column(column), out.column("_row")), pa.string())


def _with_key(task: Task, table: pa.Table) -> tuple[pa.Table, str]:
    """The table and the name of its key column: the one text field, else ``_key`` joining them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = [f.name for f in task.fields if f.key and f.name != "label" and f.name in table.column_names
             and (pa.types.is_string(table.column(f.name).type) or pa.types.is_large_string(table.column(f.name).type))]
    if len(names) == 1:
        return table, names[0]
    key = (pc.binary_join_element_wise(*(pc.cast(table.column(name), pa.large_string()) for name in names),
                                       pa.scalar("\n", pa.large_string())) if names
           else pc.cast(table.column("_row"), pa.string()))
    return table.append_column("_key", key), "_key"


def _parsed(task: Task, path: Path, mapping: DataMapping, fail: Callable[[str], None]) -> TaskData:
    """Tasks with a ``parse`` function: one source record at a time, in Python."""
    options = _options(task, mapping)
    if task.read is not None:
        try:
            records: Iterator[tuple[str, dict]] = task.read(path, lambda e: fail(str(e)))
        except TypeError:  # a reader without on_error
            records = task.read(path)
        name, where = str(path), str
    else:
        source = read_source(path, lambda e: fail(str(e)))
        missing = [col for col in mapping.columns.values() if col not in source.table.column_names]
        if missing:
            raise DataError(f"{source.name}: task.columns names column {missing[0]!r}, which the file does not have; "
                            f"its columns: {', '.join(source.table.column_names)}{_delimiter_hint(source)}")
        records = source_records(source)
        name, where = source.name, source.where
    if mapping.columns:
        renamed = {col: field_name for field_name, col in mapping.columns.items()}
        records = ((place, {renamed.get(k, k): v for k, v in record.items()}) for place, record in records)
    return _from_rows(task, _parse_all(task, records, options, fail), mapping, name, where)


def _parse_all(task: Task, records: Iterator[tuple[Any, dict]], options: dict, fail: Callable[[str], None]):  # noqa: ANN202
    """(record index, where, canonical row) for every row parse yields; bad records reported to ``fail``."""
    for index, (where, record) in enumerate(records):
        try:
            for row in task.parse(record, where, **options):
                yield index, where, record, row
        except DataError as error:
            fail(str(error))


def _hub_rows(task: Task, mapping: DataMapping):  # noqa: ANN202
    for index, row in enumerate(task.load(None, **_options(task, mapping))):
        yield index, None, row, row


def _from_rows(task: Task, items, mapping: DataMapping, name: str, where: Callable) -> TaskData:  # noqa: ANN001
    """Canonical rows made in Python (parse, hub, whole-file loaders) as an Arrow table."""
    import pyarrow as pa

    group_by = mapping.group_by or task.group_by or ""
    rows, record_index, groups, places = [], [], [], {}
    records = 0
    for index, place, record, row in items:
        records = max(records, index + 1)
        if place is not None:
            places[index] = place
        rows.append(dict(row))
        record_index.append(index)
        if group_by:
            value = record.get(group_by, row.get(group_by)) if isinstance(record, dict) else row.get(group_by)
            if value is None:
                have = sorted(set(record) | set(row)) if isinstance(record, dict) else sorted(row)
                raise DataError(f"{place or where(index)}: task.group_by names column {group_by!r}, which this row "
                                f"does not have; its columns: {', '.join(have)}")
            groups.append(str(value))
    try:
        table = pa.Table.from_pylist(rows) if rows else pa.table({})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise DataError(f"{name}: the task's rows cannot form one table ({error}); a field holds values of "
                        "different types") from None
    table = table.append_column("_row", pa.array(record_index, pa.int64()))
    if group_by:
        table = table.append_column("_group", pa.array(groups, pa.string()))
    table, key = _with_key(task, table)
    locate = (lambda i: places.get(i) or where(i)) if places else where
    return TaskData(source=name, table=table, records=records, where=locate, key_column=key)


# -- labels: drop, map, check --------------------------------------------------------------------

def _labels(task: Task, data: TaskData, mapping: DataMapping, fail: Callable[[str], None]) -> None:
    """Apply ``drop_labels`` and ``label_map``; a fixed label set refuses the rest in one summary line."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if task.kind != "classification" or not len(data):
        return
    table = data.table
    if "label" not in table.column_names:
        labels = pa.array([task.format(row).target for row in data.rows()], pa.string())
        table = table.append_column("label", labels)
    column = table.column("label")
    if not is_text(column.type):
        column = pc.cast(column, pa.string())
    # Labels are few: work on the distinct values (stripped, mapped, dropped) and keep the column
    # as small integer codes into them, never a string per row.
    encoded = pc.dictionary_encode(column).combine_chunks()
    if pa.types.is_dictionary(encoded.dictionary.type):  # it was a dictionary already
        encoded = pc.dictionary_encode(encoded.dictionary.take(encoded.indices)).combine_chunks()
    names = [str(v).strip() for v in encoded.dictionary.to_pylist()]
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    drop = set(mapping.drop_labels)
    ordered = tuple(mapping.labels or task.labels or ())
    allowed = set(ordered)
    mapped = [mapping.label_map.get(name, name) for name in names]
    keep = np.array([name not in drop for name in names], dtype=bool)
    unknown = [i for i, name in enumerate(names) if keep[i] and allowed and mapped[i] not in allowed]
    counts = np.bincount(codes, minlength=len(names))
    dropped = int(counts[~keep].sum()) if len(names) else 0
    if dropped:
        data.dropped["label in task.drop_labels"] += dropped
    if unknown:
        unknown.sort(key=lambda i: -counts[i])
        listed = ", ".join(f"{names[i]!r} ({counts[i]})" for i in unknown[:3])
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        first_row = int(np.flatnonzero(np.isin(codes, unknown))[0])
        fail(f"{data.where(int(table.column('_row')[first_row].as_py()))}: {int(counts[unknown].sum())} row(s) have "
             f"labels outside {task.name}'s label set ({', '.join(ordered)}): {listed}{more}; map them with "
             "task.label_map or skip them with task.drop_labels")
        keep[unknown] = False
    row_keep = keep[codes]
    final = list(dict.fromkeys(name for name, kept in zip(mapped, keep) if kept)) or [""]
    position = {name: i for i, name in enumerate(final)}
    remap = np.array([position.get(name, 0) for name in mapped], dtype=np.int32)  # dropped rows go below
    relabelled = pa.DictionaryArray.from_arrays(pa.array(remap[codes]), pa.array(final, pa.string()))
    table = table.set_column(table.column_names.index("label"), "label", relabelled)
    if not row_keep.all():
        table = _keep_rows(table, row_keep)
    data.table = table


def unseen_labels(train: TaskData, test: TaskData) -> list[str]:
    """Test labels that never occur in training: the model cannot have learnt them."""
    return sorted(set(test.labels or ()) - set(train.labels or ()))


def record_rows(task: Task, record: Mapping[str, Any], where: str, mapping: DataMapping) -> list[dict[str, Any]]:
    """One source record to the task's canonical rows, in Python (``ftkit predict``'s few rows).

    The same mapping and checks as :func:`load_task_data`, record by record: a dropped label gives
    no row; a label outside a fixed label set is a DataError naming ``where``.
    """
    from ftkit.data import require_str

    if mapping.columns:
        renamed = {col: name for name, col in mapping.columns.items()}
        record = {renamed.get(k, k): v for k, v in record.items()}
    if task.parse is not None:
        rows = [dict(row) for row in task.parse(record, where, **_options(task, mapping))]
    elif task.fields:
        row: dict[str, Any] = {}
        for spec in task.fields:
            found = next((name for name in (spec.name, *spec.aliases) if name in record), None)
            if found is None:
                if spec.required:
                    raise DataError(f"{where}: missing field {spec.name!r}")
                row[spec.name] = ""
                continue
            value = record[found]
            if spec.name == "label" and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            row[spec.name] = require_str({spec.name: value}, spec.name, where) if spec.required else str(value or "")
        rows = [row]
    else:
        raise DataError(f"{where}: task {task.name!r} reads whole files only")
    if task.kind != "classification":
        return rows
    kept = []
    allowed = tuple(mapping.labels or task.labels or ())
    for row in rows:
        if "label" not in row:
            kept.append(row)
            continue
        label = str(row["label"]).strip()
        if label in mapping.drop_labels:
            continue
        label = mapping.label_map.get(label, label)
        if allowed and label not in allowed:
            raise DataError(f"{where}: label {label!r} is not one of {', '.join(allowed)}; map it with "
                            "task.label_map or skip it with task.drop_labels")
        kept.append({**row, "label": label})
    return kept


def task_rows(task: Task, path: str | Path, **options: Any) -> Iterator[dict[str, Any]]:
    """A task loader's body: the canonical rows of ``path`` in any layout ftkit reads.

    ``options`` are what ``task.load`` receives (the recipe's ``task.options``, and ``labels``).
    """
    labels = tuple(options.pop("labels", ()) or ())
    yield from load_task_data(task, path, DataMapping(labels=labels, options=options)).rows()
