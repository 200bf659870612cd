"""``ftkit data``: synthesize, format, validate and split a task's data through its plugin."""

from __future__ import annotations

import math
import os
import random
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.data import read_records
from ftkit.errors import DataError, FtkitError, UsageError
from ftkit.tasks import Example, Task


def usual_permissions(root: Path) -> None:
    """Give ``root`` (and everything under a folder) the permissions the umask would have given.

    mkstemp/mkdtemp make owner-only files and folders, and safetensors writes 0600 files; outputs
    meant to be shared (a run folder a server reads, a merged model) should not stay that way.
    """
    umask = os.umask(0)
    os.umask(umask)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write rows as JSONL atomically (temp file then rename): never a half-written file."""
    import json
    from functools import partial

    import jsonlines

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    count = 0
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out, jsonlines.Writer(out, dumps=partial(json.dumps, ensure_ascii=False)) as writer:
            for row in rows:
                writer.write(row)
                count += 1
        usual_permissions(Path(tmp))  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def _records(task: Task, path: Path, on_error=None):  # noqa: ANN001, ANN202
    reader = task.read or read_records
    return reader(path, on_error) if on_error is not None else reader(path)


def _parse(task: Task, path: Path, options: dict[str, Any]) -> list[tuple[str, dict, list[Example]]]:
    """Each raw record with where it came from and the examples it yields (strict: first error raises)."""
    return [(where, record, [task.format(r) for r in task.parse(record, where, **options)])
            for where, record in _records(task, path)]


# -- synth / format ------------------------------------------------------------------------------

def synthesize(task: Task, out: Path, n: int, seed: int, **options: Any) -> int:
    if task.synthesize is None:
        raise UsageError(f"task {task.name!r} cannot synthesize data; give it a data file instead")
    rows = task.synthesize(n, seed=seed, **{k: v for k, v in options.items() if v is not None})
    return write_jsonl(out, rows)


def format_file(task: Task, path: Path, out: Path, options: dict[str, Any]) -> int:
    """Raw rows -> training form (Alpaca: instruction/input/output, plus system and references)."""
    def rows():  # noqa: ANN202
        for row in task.load(path, **options):
            example = task.format(row)
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
    """What ``ftkit data validate`` found in one file."""

    path: str
    task: str
    records: int = 0
    examples: int = 0
    errors: list[str] = field(default_factory=list)
    duplicates: dict[str, list[str]] = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)
    imbalance: float | None = None
    imbalance_warning: bool = False
    tokens: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


def validate_file(task: Task, path: Path, options: dict[str, Any], *, seq: int, max_ratio: float,
                  tokenizer: str | None) -> Validation:
    """Parse every record, collecting every problem instead of stopping at the first."""
    import logging

    report = Validation(path=str(path), task=task.name)
    examples: list[tuple[str, Example]] = []

    class Collect(logging.Handler):  # a plugin's "row dropped" warnings are findings too
        def emit(self, record: logging.LogRecord) -> None:
            report.errors.append(record.getMessage())

    log, handler = logging.getLogger("ftkit"), Collect(logging.WARNING)
    log.addHandler(handler)
    try:
        if task.parse is None:
            examples = [(str(path), task.format(row)) for row in task.load(path, **options)]
            report.records = len(examples)
        else:
            for where, record in _records(task, path, on_error=lambda e: report.errors.append(str(e))):
                report.records += 1
                try:
                    examples += [(where, task.format(row)) for row in task.parse(record, where, **options)]
                except DataError as error:
                    report.errors.append(str(error))
    finally:
        log.removeHandler(handler)
    report.examples = len(examples)
    seen: dict[str, list[str]] = defaultdict(list)
    for where, example in examples:
        seen[example.input].append(where)
    report.duplicates = {text: wheres for text, wheres in seen.items() if len(wheres) > 1}
    if task.kind == "classification":
        labels = list(options.get("labels") or task.labels or [])
        counts = Counter(example.target for _, example in examples)
        report.classes = {label: counts.get(label, 0) for label in labels} | dict(counts)
        present = [n for n in report.classes.values() if n]
        if present:
            report.imbalance = max(present) / min(present)
            report.imbalance_warning = report.imbalance > max_ratio
        for label, n in report.classes.items():
            if n == 0:
                report.errors.append(f"{path}: no examples of label {label!r}; a model cannot learn it")
    if examples:
        report.tokens = token_stats([e for _, e in examples], seq, tokenizer)
    return report


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

def split_file(task: Task, path: Path, out_dir: Path, options: dict[str, Any], *, test_size: float,
               seed: int) -> dict[str, Any]:
    """Stratified train/test split of the raw records; refuses to leave a class out of test."""
    if not 0 < test_size < 1:
        raise UsageError(f"--test-size must be between 0 and 1, got {test_size}")
    if task.parse is None:
        raise FtkitError(f"task {task.name!r} has no per-record parser; `ftkit data split` needs one")
    # Records that yield no example (a plugin dropped them, with a warning) are not written.
    parsed = [item for item in _parse(task, path, options) if item[2]]
    if len(parsed) < 2:
        raise DataError(f"{path}: {len(parsed)} usable record(s); a split needs at least 2")
    single = all(len(examples) == 1 for _, _, examples in parsed)
    stratify = task.kind == "classification" and single
    order = list(range(len(parsed)))
    if stratify:
        by_label: dict[str, list[int]] = defaultdict(list)
        for i, (_, _, examples) in enumerate(parsed):
            by_label[examples[0].target].append(i)
        test_idx: set[int] = set()
        rng = random.Random(seed)
        for label, members in sorted(by_label.items()):
            take = round(len(members) * test_size)
            if take == 0 or take == len(members):
                raise DataError(
                    f"{path}: label {label!r} has {len(members)} example(s): a {test_size:.0%} test split would "
                    "leave it out of " + ("test" if take == 0 else "train") + "; add examples or change --test-size"
                )
            test_idx.update(rng.sample(members, take))
    else:
        random.Random(seed).shuffle(order)
        test_idx = set(order[: max(1, round(len(order) * test_size))])
    train = [parsed[i] for i in range(len(parsed)) if i not in test_idx]
    test = [parsed[i] for i in sorted(test_idx)]
    if task.kind == "classification":
        missing = sorted({e.target for _, _, ex in train for e in ex} - {e.target for _, _, ex in test for e in ex})
        if missing:
            raise DataError(f"{path}: label(s) {', '.join(missing)} would be missing from test; "
                            "add examples or raise --test-size")
    test_texts = {e.input for _, _, examples in test for e in examples}
    overlap = sorted({e.input for _, _, examples in train for e in examples} & test_texts)
    write_jsonl(out_dir / "train.jsonl", (record for _, record, _ in train))
    write_jsonl(out_dir / "test.jsonl", (record for _, record, _ in test))
    labels = lambda part: dict(Counter(e.target for _, _, ex in part for e in ex)) if task.kind == "classification" else None  # noqa: E731
    return {"train": len(train), "test": len(test), "stratified": stratify, "seed": seed,
            "overlap": len(overlap), "overlap_examples": overlap[:5],
            "train_classes": labels(train), "test_classes": labels(test),
            "files": [str(out_dir / "train.jsonl"), str(out_dir / "test.jsonl")]}
