"""The task contract every task plugin satisfies.

A task turns a data source into training examples and scores predictions:

    rows = task.load(path, **options)        # raw rows in the task's canonical layout
    examples = [task.format(r) for r in rows]  # Example(input, target, references)
    scores = task.metrics(predictions, [e.references for e in examples])

Loaders read local files (and the hub, where ``hub_dataset`` is set and ``path`` is None); they
yield one canonical row per training example (a task whose raw rows hold several examples, such
as HC3's list of answers, explodes them in its loader, so ``format`` stays one row in, one
example out).
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
class Example:
    """One training/evaluation example.

    ``input`` is the text to classify or the prompt; ``target`` the label name or the reply
    the model is trained to produce; ``references`` every answer that counts as correct
    (defaults to ``(target,)``; extractive QA has several). ``instruction`` goes before the
    input when a causal model is prompted (Alpaca style); ``system`` is the chat system prompt.
    """

    input: str
    target: str
    references: tuple[str, ...] = ()
    instruction: str | None = None
    system: str | None = None

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
        labels: The default label set (classification only); recipes may override it.
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
            if not self.labels or len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
                problems.append("a classification task needs `labels`: two or more distinct names")
        elif self.labels is not None:
            problems.append("`labels` is only for classification tasks")
        if self.sample_data is not None and not isinstance(self.sample_data, (str, os.PathLike)):
            problems.append("`sample_data` must be a path (str or Path) or None")
        if self.default_head not in ("classifier", "causal"):
            problems.append(f"`default_head` {self.default_head!r} must be classifier or causal")
        if self.default_head == "classifier" and self.kind != "classification":
            problems.append("`default_head` classifier needs kind classification")
        if not self.headline_metric:
            problems.append("`headline_metric` must name a key of the metrics result")
        if problems:
            raise PluginError(f"task {self.name!r} breaks the task contract: " + "; ".join(problems))
