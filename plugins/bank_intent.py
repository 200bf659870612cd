"""bank-intent: bank customer-service intent classification."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ftkit
from ftkit.errors import DataError
from ._common import read_records, require_str

LABELS = ("fraud_risk", "refund", "balance", "card_lost", "other")
log = logging.getLogger("ftkit")


def load(path: str | Path | None = None, **options: Any) -> Iterator[dict[str, Any]]:
    """Rows ``{"text", "label"}``; rows whose label is outside the label set are reported and dropped."""
    if path is None:
        raise DataError("the bank-intent task has no hub dataset: set `task.train_file` to a JSONL file")
    labels = tuple(options.get("labels") or LABELS)
    for where, row in read_records(path):
        text, label = require_str(row, "text", where), require_str(row, "label", where).strip()
        if label not in labels:
            log.warning("%s: dropped row with label %r (not in the label set %s)", where, label, ", ".join(labels))
            continue
        yield {"text": text, "label": label}


def format_example(row: dict[str, Any]) -> ftkit.Example:
    return ftkit.Example(input=row["text"], target=row["label"], instruction="Classify the customer's intent.")


def metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    from ftkit.metrics import classification_metrics

    return classification_metrics(predictions, references)


TASK = ftkit.Task(
    name="bank-intent",
    description="Bank customer-service intent classification (labels overridable in the recipe)",
    kind="classification",
    labels=LABELS,
    load=load,
    format=format_example,
    metrics=metrics,
    headline_metric="macro_f1",
    default_head="classifier",
    data_format='JSONL rows {"text","label"}',
    options={"labels": "the intent label set (default: " + ", ".join(LABELS) + ")"},
)


@ftkit.hookimpl
def register_tasks(register):  # noqa: ANN001, ANN201 - signature fixed by the hook spec
    register(TASK)
