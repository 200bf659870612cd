"""bank-intent: bank customer-service intent classification."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import ftkit
from ftkit.errors import DataError

#: The intents of the original example card; only an example: a run's labels are its data's own.
EXAMPLE_LABELS = ("fraud_risk", "refund", "balance", "card_lost", "other")
FIELDS = (
    ftkit.Field("text", "the customer's message"),
    ftkit.Field("label", "the intent (BANKING77's CSV calls it category)", aliases=("category", "intent")),
)


def load(path: str | Path | None = None, **options: Any) -> Iterator[dict[str, Any]]:
    """Rows ``{"text", "label"}`` from any file ftkit reads (JSONL, JSON, CSV, TSV, Parquet, Arrow)."""
    if path is None:
        raise DataError("the bank-intent task has no hub dataset: set `task.train_file` to your data file")
    from ftkit.sources import task_rows

    yield from task_rows(TASK, path, **options)


def format_example(row: dict[str, Any]) -> ftkit.Example:
    return ftkit.Example(input=row["text"], target=row["label"], instruction="Classify the customer's intent.")


def metrics(predictions: Sequence[str], references: Sequence[Sequence[str]],
            labels: Sequence[str] | None = None) -> dict:
    """Scored over the run's whole label set (the training data's labels, or the recipe's)."""
    from ftkit.metrics import classification_metrics

    return classification_metrics(predictions, references, labels)


TASK = ftkit.Task(
    name="bank-intent",
    description="Bank customer-service intent classification (labels from your data, e.g. BANKING77's 77)",
    kind="classification",
    labels=None,
    load=load,
    fields=FIELDS,
    # The quickstart's English messages (bench/make_intent_quickstart.py): grouped by their `cue`.
    sample_data=Path(str(resources.files("ftkit_plugins.data").joinpath("bank_intent_quickstart.jsonl"))),
    format=format_example,
    metrics=metrics,
    headline_metric="macro_f1",
    default_head="classifier",
    data_format='rows {"text","label"} (BANKING77\'s CSV text,category is read as is); JSONL, JSON, CSV, TSV, '
                'Parquet or a saved dataset; integer labels map through the dataset\'s label names',
)


@ftkit.hookimpl
def register_tasks(register):  # noqa: ANN001, ANN201 - signature fixed by the hook spec
    register(TASK)
