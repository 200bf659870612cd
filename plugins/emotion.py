"""emotion: Chinese six-class emotion classification (喜悅 悲傷 憤怒 恐懼 驚訝 厭惡)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import ftkit
from ftkit.errors import DataError

from .emotion_synth import synthesize

LABELS = ("喜悅", "悲傷", "憤怒", "恐懼", "驚訝", "厭惡")
INSTRUCTION = "判斷下面這句話表達的情緒，只回答其中一個：" + "、".join(LABELS) + "。"


FIELDS = (
    ftkit.Field("text", "the sentence", aliases=("input",)),
    ftkit.Field("label", "its emotion, one of the six labels (map others with task.label_map)",
                aliases=("emotion", "output")),
)


def load(path: str | Path | None = None, **options: Any) -> Iterator[dict[str, Any]]:
    """Rows ``{"text", "label"}`` from any file ftkit reads (JSONL, JSON, CSV, TSV, Parquet, Arrow)."""
    if path is None:
        raise DataError("the emotion task has no hub dataset: set `task.train_file` (see `ftkit data synth`)")
    from ftkit.sources import task_rows

    yield from task_rows(TASK, path, **options)


def format_example(row: dict[str, Any]) -> ftkit.Example:
    return ftkit.Example(input=row["text"], target=row["label"], instruction=INSTRUCTION)


def metrics(predictions: Sequence[str], references: Sequence[Sequence[str]],
            labels: Sequence[str] | None = None) -> dict:
    """Scored over the run's whole label set (the recipe may override the default one)."""
    from ftkit.metrics import classification_metrics

    return classification_metrics(predictions, references, labels or LABELS)


TASK = ftkit.Task(
    name="emotion",
    description="Chinese 6-class emotion (喜悅 悲傷 憤怒 恐懼 驚訝 厭惡) of a sentence",
    kind="classification",
    labels=LABELS,
    load=load,
    fields=FIELDS,
    synthesize=synthesize,
    format=format_example,
    metrics=metrics,
    headline_metric="accuracy",
    default_head="causal",
    data_format='rows {"text","label"} ({"text","emotion"} and Alpaca {"input","output"} are read as is); '
                'JSONL, JSON, CSV, TSV, Parquet or a saved dataset; other columns via task.columns',
    sample_data=Path(str(resources.files("ftkit_plugins.data").joinpath("emotion_quickstart.jsonl"))),
)


@ftkit.hookimpl
def register_tasks(register):  # noqa: ANN001, ANN201 - signature fixed by the hook spec
    register(TASK)
