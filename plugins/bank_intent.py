"""bank-intent: bank customer-service intent classification."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ftkit
from ftkit.errors import DataError
from ftkit.data import read_records, require_str

LABELS = ("fraud_risk", "refund", "balance", "card_lost", "other")
log = logging.getLogger("ftkit")


def parse(record: dict[str, Any], where: str, **options: Any) -> Iterator[dict[str, Any]]:
    """``{"text", "label"}``; a label outside the label set is reported (a warning) and the row dropped."""
    labels = tuple(options.get("labels") or LABELS)
    text, label = require_str(record, "text", where), require_str(record, "label", where).strip()
    if label not in labels:
        log.warning("%s: dropped row with label %r (not in the label set %s)", where, label, ", ".join(labels))
        return
    yield {"text": text, "label": label}


def load(path: str | Path | None = None, **options: Any) -> Iterator[dict[str, Any]]:
    """Rows ``{"text", "label"}`` from a JSONL file."""
    if path is None:
        raise DataError("the bank-intent task has no hub dataset: set `task.train_file` to a JSONL file")
    for where, record in read_records(path):
        yield from parse(record, where, **options)


def format_example(row: dict[str, Any]) -> ftkit.Example:
    return ftkit.Example(input=row["text"], target=row["label"], instruction="Classify the customer's intent.")


def metrics(predictions: Sequence[str], references: Sequence[Sequence[str]],
            labels: Sequence[str] | None = None) -> dict:
    """Scored over the run's whole label set (the recipe may override the default one)."""
    from ftkit.metrics import classification_metrics

    return classification_metrics(predictions, references, labels or LABELS)


TASK = ftkit.Task(
    name="bank-intent",
    description="Bank customer-service intent classification (labels overridable in the recipe)",
    kind="classification",
    labels=LABELS,
    load=load,
    parse=parse,
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
