"""classify: any text (or text pair) -> label data, with the labels your data has; no plugin needed.

    [task]
    name = "classify"
    train_file = "reviews.csv"
    columns = { text = "review", label = "stars" }   # only where your columns are named otherwise
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ftkit
from ftkit.errors import DataError

FIELDS = (
    ftkit.Field("text", "the text to classify", aliases=("sentence", "sentence1", "content")),
    ftkit.Field("text_pair", "optional second text (premise/hypothesis, query/passage); classified as a pair",
                aliases=("sentence2",), required=False),
    ftkit.Field("label", "the class (a name or an integer)", aliases=("category", "class")),
)


def load(path: str | Path | None = None, **options: Any) -> Iterator[dict[str, Any]]:
    """Rows ``{"text", "label"}`` (and ``text_pair`` when the data has one) from any file ftkit reads."""
    if path is None:
        raise DataError("the classify task has no hub dataset: set `task.train_file` to your data file")
    from ftkit.sources import task_rows

    yield from task_rows(TASK, path, **options)


def format_example(row: dict[str, Any]) -> ftkit.Example:
    pair = row.get("text_pair") or None
    # Seen by a causal head only (a classifier head reads the text, or the pair, alone).
    instruction = "Classify the pair of texts." if pair else "Classify the text."
    return ftkit.Example(input=row["text"], target=row["label"], pair=pair, instruction=instruction)


def metrics(predictions: Sequence[str], references: Sequence[Sequence[str]],
            labels: Sequence[str] | None = None) -> dict:
    """Scored over the run's whole label set (the training data's labels, or the recipe's)."""
    from ftkit.metrics import classification_metrics

    return classification_metrics(predictions, references, labels)


TASK = ftkit.Task(
    name="classify",
    description="Any text (or text pair) classification; the labels are your training data's own",
    kind="classification",
    labels=None,
    load=load,
    fields=FIELDS,
    format=format_example,
    metrics=metrics,
    # Macro-F1 weighs every class alike: on the imbalanced label sets real data has, accuracy
    # rewards a model that only ever answers the majority class.
    headline_metric="macro_f1",
    default_head="classifier",
    data_format='rows {"text","label"} plus an optional "text_pair" (other names through task.columns); JSONL, '
                "JSON, CSV, TSV, Parquet or a saved dataset; integer labels map through the dataset's label names",
)


@ftkit.hookimpl
def register_tasks(register):  # noqa: ANN001, ANN201 - signature fixed by the hook spec
    register(TASK)
