"""``ftkit data``: synthesize, format, validate and split a task's data through its plugin."""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.errors import DataError, UsageError
from ftkit.sources import DataMapping, TaskData, load_task_data, source_records, unseen_labels
from ftkit.tasks import Example, Task


def usual_permissions(root: Path) -> None:
    """Give ``root`` (and everything under a folder) the permissions the umask would have given.

    mkstemp/mkdtemp make owner-only files and folders, and safetensors writes 0600 files; outputs
    meant to be shared (a run folder a server reads, a merged model) should not stay that way.
    """
    from ftkit.folders import process_umask

    umask = process_umask()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write rows as JSONL atomically (temp file then rename): never a half-written file."""
    import json
    from functools import partial

    import jsonlines

    from ftkit.folders import atomic_writer

    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with atomic_writer(path) as out, jsonlines.Writer(out, dumps=partial(json.dumps, ensure_ascii=False)) as writer:
        for row in rows:
            writer.write(row)
            count += 1
    return count


# -- synth / format ------------------------------------------------------------------------------

def synthesize(task: Task, out: Path, n: int, seed: int, **options: Any) -> int:
    if task.synthesize is None:
        raise UsageError(f"task {task.name!r} cannot synthesize data; give it a data file instead")
    rows = task.synthesize(n, seed=seed, **{k: v for k, v in options.items() if v is not None})
    return write_jsonl(out, rows)


def format_file(task: Task, path: Path, out: Path, mapping: DataMapping) -> int:
    """Source rows -> training form (Alpaca: instruction/input/output, plus system and references;
    OpenAI-style ``messages`` for a conversation of several turns)."""
    data = load_task_data(task, path, mapping)

    def rows():  # noqa: ANN202
        for row in data.rows():
            example = task.format(row)
            if example.messages and sum(m["role"] == "assistant" for m in example.messages) > 1:
                yield {"messages": list(example.messages)}  # several turns: Alpaca would lose the history
                continue
            item = {"instruction": example.instruction or "", "input": example.input, "output": example.target}
            if example.system:
                item["system"] = example.system
            if len(example.references) > 1:
                item["references"] = list(example.references)
            yield item

    return write_jsonl(out, rows())


# -- validate ------------------------------------------------------------------------------------

@dataclass
class Validation:
    """What ``ftkit data validate`` found in one file (and, with a test file, between the two)."""

    path: str
    task: str
    records: int = 0
    examples: int = 0
    errors: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, list[str]] = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)
    imbalance: float | None = None
    imbalance_warning: bool = False
    tokens: dict[str, Any] | None = None
    test: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


def validate_file(task: Task, path: Path, mapping: DataMapping, *, seq: int, max_ratio: float,
                  tokenizer: str | None, test_path: Path | None = None) -> Validation:
    """Read every row with the mapping, collecting every problem instead of stopping at the first."""
    import pyarrow.compute as pc

    report = Validation(path=str(path), task=task.name)
    try:
        data = load_task_data(task, path, mapping, collect=True)
    except DataError as error:
        report.errors.append(str(error))
        return report
    report.records, report.examples = data.records, len(data)
    report.errors += data.errors
    report.dropped = dict(data.dropped)
    report.duplicates = _duplicates(data)
    if task.kind == "classification" and len(data):
        counts = dict(zip(*(c.to_pylist() for c in pc.value_counts(data.table.column("label")).flatten())))
        labels = list(mapping.labels or task.labels or sorted(counts))
        report.classes = {label: counts.get(label, 0) for label in labels} | dict(sorted(counts.items()))
        present = [n for n in report.classes.values() if n]
        if present:
            report.imbalance = max(present) / min(present)
            report.imbalance_warning = report.imbalance > max_ratio
        for label, n in report.classes.items():
            if n == 0:
                report.errors.append(f"{path}: no examples of label {label!r}; a model cannot learn it")
    if len(data):
        report.tokens = token_stats(data.examples(task) if len(data) <= 20_000 else
                                    data.take(range(0, len(data), max(1, len(data) // 20_000))).examples(task),
                                    seq, tokenizer)
    if test_path is not None:
        report.test = _compare_test(task, data, test_path, mapping, report)
    return report


def _duplicates(data: TaskData, limit: int = 50) -> dict[str, list[str]]:
    """Texts that occur more than once, with where (at most ``limit`` texts)."""
    import pyarrow.compute as pc

    keys = data.keys()
    counts = pc.value_counts(keys)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    found: dict[str, list[str]] = {}
    if not len(repeated):
        return found
    wanted = repeated.slice(0, limit)
    rows = pc.indices_nonzero(pc.is_in(keys, value_set=wanted)).to_pylist()
    for i in rows:
        found.setdefault(str(keys[i].as_py()), []).append(data.where(int(data.table.column("_row")[i].as_py())))
    return found


def normalized(column):  # noqa: ANN001, ANN201 - a pyarrow array
    """Text as compared for near-duplicates: NFKC (full/half width), lower case, no spaces or punctuation."""
    import pyarrow.compute as pc

    text = pc.utf8_lower(pc.utf8_normalize(column, form="NFKC"))
    return pc.replace_substring_regex(text, pattern=r"[\s\p{P}\p{S}]+", replacement="")


def _compare_test(task: Task, train: TaskData, test_path: Path, mapping: DataMapping, report: Validation) -> dict:
    """Exact and near-duplicate overlap between train and test, and test labels unseen in training."""
    import pyarrow.compute as pc

    test = load_task_data(task, test_path, mapping, collect=True)
    report.errors += test.errors
    exact = pc.is_in(test.keys(), value_set=pc.unique(train.keys()))
    near = pc.is_in(normalized(test.keys()), value_set=pc.unique(normalized(train.keys())))
    near = pc.and_(near, pc.invert(exact))
    examples = [str(v) for v in pc.filter(test.keys(), pc.or_(exact, near)).slice(0, 3).to_pylist()]
    unseen = unseen_labels(train, test) if task.kind == "classification" else []
    if unseen:
        report.errors.append(f"{test_path}: test label(s) {', '.join(map(repr, unseen[:10]))} never occur in "
                             f"{report.path}; add training rows, map them with task.label_map, or skip them with "
                             "task.drop_labels")
    return {"path": str(test_path), "examples": len(test), "exact_overlap": int(pc.sum(exact).as_py() or 0),
            "near_overlap": int(pc.sum(near).as_py() or 0), "overlap_examples": examples, "unseen_labels": unseen}


def token_stats(examples: list[Example], seq: int, tokenizer: str | None) -> dict[str, Any]:
    """p50/p95/max token length of instruction + input + target, and how many exceed ``seq``.

    Uses the `tokenizers` library on the folder's tokenizer.json (no torch, no transformers).
    """
    from tokenizers import Tokenizer

    if tokenizer is None:
        from ftkit.tiny import tiny_model_path

        tokenizer, name = str(tiny_model_path() / "tokenizer.json"), "the built-in tiny model's"
    else:
        name = tokenizer
        if Path(tokenizer).is_dir():
            tokenizer = str(Path(tokenizer) / "tokenizer.json")
    try:
        tok = Tokenizer.from_file(tokenizer)
    except Exception as error:  # noqa: BLE001 - tokenizers raises plain Exceptions
        raise UsageError(f"--tokenizer: cannot read {tokenizer} ({error}); give a model folder with tokenizer.json") from None
    texts = ["\n".join(p for p in (e.instruction, e.input, e.target) if p) for e in examples]
    lengths = sorted(len(enc.ids) for enc in tok.encode_batch(texts))

    def pct(q: float) -> int:
        return lengths[min(len(lengths) - 1, math.ceil(q * len(lengths)) - 1)]

    over = sum(1 for n in lengths if n > seq)
    return {"tokenizer": name, "seq": seq, "p50": pct(0.5), "p95": pct(0.95), "max": lengths[-1],
            "truncated": over, "truncated_rate": over / len(lengths)}


# -- split ---------------------------------------------------------------------------------------

def split_file(task: Task, path: Path, out_dir: Path, mapping: DataMapping, *, test_size: float,
               seed: int) -> dict[str, Any]:
    """Train/test split with :func:`ftkit.splitting.split_indices`, the one ``ftkit run`` uses.

    Each part is written as JSONL of the source rows with their own fields (integer class labels
    become their names: JSONL carries no label names).
    """
    import pyarrow.compute as pc

    from ftkit.splitting import split_indices

    data = load_task_data(task, path, mapping)
    train_rows, test_rows = split_indices(data, test_size, seed, stratify=task.kind == "classification",
                                          what="--test-size")
    train, test = data.take(train_rows), data.take(test_rows)
    overlap = pc.is_in(train.keys(), value_set=pc.unique(test.keys()))
    overlap_texts = sorted({str(v) for v in pc.filter(train.keys(), overlap).to_pylist()})
    part_of = {}
    for part, rows in (("train", train), ("test", test)):
        for record in set(rows.table.column("_row").to_pylist()):
            part_of[record] = part
    records = task.read(path) if task.read is not None else source_records(path)
    kept: dict[str, list[dict]] = {"train": [], "test": []}
    for index, (_, record) in enumerate(records):
        if index in part_of:
            kept[part_of[index]].append(record)
    write_jsonl(out_dir / "train.jsonl", kept["train"])
    write_jsonl(out_dir / "test.jsonl", kept["test"])
    classes = (lambda part: dict(sorted(Counter(part.table.column("label").to_pylist()).items()))
               if task.kind == "classification" else None)
    group_by = mapping.group_by or task.group_by
    return {"train": len(train), "test": len(test), "train_records": len(kept["train"]),
            "test_records": len(kept["test"]), "stratified": task.kind == "classification",
            "grouped_by": group_by or None, "seed": seed, "dropped": dict(data.dropped),
            "overlap": len(overlap_texts), "overlap_examples": overlap_texts[:5],
            "train_classes": classes(train), "test_classes": classes(test),
            "files": [str(out_dir / "train.jsonl"), str(out_dir / "test.jsonl")]}
