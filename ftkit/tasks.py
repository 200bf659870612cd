"""The task contract every task plugin satisfies.

A task turns a data source into training examples and scores predictions:

    rows = task.load(path, **options)        # raw rows in the task's canonical layout
    examples = [task.format(r) for r in rows]  # Example(input, target, references)
    scores = task.metrics(predictions, [e.references for e in examples])

A task names the ``fields`` its canonical rows hold. ftkit reads the file itself (JSONL, JSON,
CSV, TSV, Parquet, saved Arrow; see :mod:`ftkit.sources`), maps the dataset's own columns onto
those fields (``task.columns`` in a recipe, else each field's name and aliases), and applies the
recipe's ``label_map`` / ``drop_labels``. A task whose rows are plain fields needs nothing more;
a task whose records need work (HC3's list of answers, chat turns) gives ``parse``, which turns
one source record into canonical rows (several when a record holds several examples, so
``format`` stays one row in, one example out). ``load`` remains the plugin's own entry point
(used for the hub, where ``hub_dataset`` is set and ``path`` is None).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ftkit.errors import PluginError

TaskKind = Literal["classification", "generation"]
TASK_KINDS: tuple[str, ...] = ("classification", "generation")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")

Loader = Callable[..., Iterable[Mapping[str, Any]]]
"""``load(path: str | Path | None, **options) -> Iterable[row]``; ``path=None`` reads the hub."""

Formatter = Callable[[Mapping[str, Any]], "Example"]
"""``format(row) -> Example``."""

Metrics = Callable[[Sequence[str], Sequence[Sequence[str]]], dict[str, float]]
"""``metrics(predictions, references) -> {name: value}``; each reference is a tuple of gold answers.

A classification task's metrics may also take a keyword ``labels``: ftkit then passes the run's
whole label set (a recipe may override the task's), so macro-F1 counts labels the test split lacks.
"""

Parser = Callable[..., Iterable[Mapping[str, Any]]]
"""``parse(record, where, **options) -> Iterable[row]``: one raw record to canonical rows, or DataError."""

Reader = Callable[..., Iterable[tuple[str, Mapping[str, Any]]]]
"""``read(path, on_error=None) -> Iterable[(where, record)]``: raw records of a local file."""

Synthesizer = Callable[..., Iterable[Mapping[str, Any]]]
"""``synthesize(n, *, seed, **options) -> Iterable[row]``: raw rows the loader accepts."""


@dataclass(frozen=True)
class Field:
    """A field of a task's canonical rows, and where ftkit finds it in a dataset.

    ``aliases`` are the column names tried, in order, after the field's own name when the recipe's
    ``task.columns`` does not name one (the layouts the task's public datasets use). ``key`` says
    whether the field is part of the text compared for duplicates and train/test overlap.
    """

    name: str
    help: str = ""
    aliases: tuple[str, ...] = ()
    required: bool = True
    key: bool = True


@dataclass(frozen=True)
class Example:
    """One training/evaluation example.

    ``input`` is the text to classify or the prompt; ``target`` the label name or the reply
    the model is trained to produce; ``references`` every answer that counts as correct
    (defaults to ``(target,)``; extractive QA has several). ``instruction`` goes before the
    input when a causal model is prompted (Alpaca style); ``system`` is the chat system prompt.
    ``pair`` is the second text of a text-pair classification (a classifier head reads it as a
    real pair: ``tokenizer(input, pair)``). ``messages`` is a whole conversation
    (``{"role", "content"}`` turns, roles system/user/assistant, ending with an assistant turn):
    every assistant turn is trained on, and ``input``/``target`` are then its last user turn and
    last reply.
    """

    input: str
    target: str
    references: tuple[str, ...] = ()
    instruction: str | None = None
    system: str | None = None
    pair: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None

    def __post_init__(self) -> None:
        if not self.references:
            object.__setattr__(self, "references", (self.target,))


@dataclass(frozen=True)
class Task:
    """A task plugin's contribution: metadata, a loader, a formatter and metrics.

    Attributes:
        name: Unique, lower-case, dash-separated (``bank-intent``); used in recipes.
        description: One line shown by ``ftkit tasks``.
        kind: ``classification`` (``target`` is one of ``labels``) or ``generation``.
        load: Reads rows from a local file or folder, or from ``hub_dataset`` when path is None.
        format: Turns one canonical row into an :class:`Example`.
        metrics: Scores predictions against references; higher is better for ``headline_metric``.
        headline_metric: The key of ``metrics``' result that reports lead with.
        labels: The fixed label set (classification only), which recipes may override and
            ``label_map`` maps onto; None: the labels are the training data's own.
        hub_dataset: ``source:id`` of the public copy, e.g. ``modelscope:simpleai/HC3-Chinese``.
        data_format: One line on the file layout the loader accepts, shown by ``tasks show``.
        default_head: ``classifier`` (sequence-classification head) or ``causal`` (generate text).
        options: Task-specific recipe options this task accepts, name -> one-line help.
        synthesize: Optional; makes raw rows (``ftkit data synth``) for tasks that can.
        parse: Optional; one raw record of a local file to canonical rows (raising DataError for a
            bad one), so ``ftkit data validate`` can report every bad row instead of the first.
        read: Optional; how raw records are read from a local file, for layouts other than JSONL
            or a JSON array (default: :func:`ftkit.data.read_records`).
        sample_data: Optional; a small file the loader accepts (shipped as package data), which
            ``ftkit plugins check`` and :mod:`ftkit.testing` use when no data file is given.
        fields: The fields of the canonical rows (see :class:`Field`); ``task.columns`` maps onto them.
        group_by: Optional; the field whose rows always land in the same split (HC3: question).
    """

    name: str
    description: str
    kind: TaskKind
    load: Loader
    format: Formatter
    metrics: Metrics
    headline_metric: str
    labels: tuple[str, ...] | None = None
    hub_dataset: str | None = None
    data_format: str = ""
    default_head: Literal["classifier", "causal"] = "causal"
    options: Mapping[str, str] = field(default_factory=dict)
    synthesize: Synthesizer | None = None
    parse: Parser | None = None
    read: Reader | None = None
    sample_data: str | os.PathLike[str] | None = None
    fields: tuple[Field, ...] = ()
    group_by: str | None = None

    def check(self) -> None:
        """Raise :class:`PluginError` naming every way this task breaks the contract."""
        problems = []
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            problems.append(f"`name` {self.name!r} must be lower-case letters, digits and dashes")
        if not self.description or "\n" in self.description:
            problems.append("`description` must be one non-empty line")
        if self.kind not in TASK_KINDS:
            problems.append(f"`kind` {self.kind!r} must be one of {', '.join(TASK_KINDS)}")
        for attr in ("load", "format", "metrics"):
            if not callable(getattr(self, attr)):
                problems.append(f"`{attr}` must be callable")
        for attr in ("synthesize", "parse", "read"):
            if getattr(self, attr) is not None and not callable(getattr(self, attr)):
                problems.append(f"`{attr}` must be callable or None")
        if self.kind == "classification":
            if self.labels is not None and (len(set(self.labels)) != len(self.labels) or len(self.labels) < 2):
                problems.append("`labels` must be two or more distinct names, or None (labels from the data)")
        elif self.labels is not None:
            problems.append("`labels` is only for classification tasks")
        if self.sample_data is not None and not isinstance(self.sample_data, (str, os.PathLike)):
            problems.append("`sample_data` must be a path (str or Path) or None")
        if self.default_head not in ("classifier", "causal"):
            problems.append(f"`default_head` {self.default_head!r} must be classifier or causal")
        if self.default_head == "classifier" and self.kind != "classification":
            problems.append("`default_head` classifier needs kind classification")
        if not all(isinstance(f, Field) for f in self.fields) or len({f.name for f in self.fields}) != len(self.fields):
            problems.append("`fields` must be distinct ftkit.Field entries")
        if self.parse is None and self.fields and self.kind == "classification" and "label" not in {f.name for f in self.fields}:
            problems.append("a classification task reading plain fields needs a `label` field")
        if not self.headline_metric:
            problems.append("`headline_metric` must name a key of the metrics result")
        if problems:
            raise PluginError(f"task {self.name!r} breaks the task contract: " + "; ".join(problems))
