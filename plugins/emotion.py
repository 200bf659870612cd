"""emotion: Chinese six-class emotion classification (喜悅 悲傷 憤怒 恐懼 驚訝 厭惡)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ftkit
from ftkit.data import read_records, require_str
from ftkit.errors import DataError
from ftkit.tiny import emotion_quickstart_path

from .emotion_synth import synthesize

LABELS = ("喜悅", "悲傷", "憤怒", "恐懼", "驚訝", "厭惡")
INSTRUCTION = "判斷下面這句話表達的情緒，只回答其中一個：" + "、".join(LABELS) + "。"


def parse(record: dict[str, Any], where: str, **options: Any) -> Iterator[dict[str, Any]]:
    """A raw row (``text``/``emotion``) or an Alpaca row (``input``/``output``) -> ``{"text", "label"}``."""
    labels = tuple(options.get("labels") or LABELS)
    if "emotion" in record or "text" in record:
        text, label = require_str(record, "text", where), require_str(record, "emotion", where)
    else:
        text, label = require_str(record, "input", where), require_str(record, "output", where)
    label = label.strip()
    if label not in labels:
        raise DataError(f"{where}: label {label!r} is not one of {', '.join(labels)}")
    yield {"text": text, "label": label}


def load(path: str | Path | None = None, **options: Any) -> Iterator[dict[str, Any]]:
    """Rows ``{"text", "label"}`` from a JSONL/JSON file of raw or Alpaca rows."""
    if path is None:
        raise DataError("the emotion task has no hub dataset: set `task.train_file` (see `ftkit data synth`)")
    for where, record in read_records(path):
        yield from parse(record, where, **options)


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
    parse=parse,
    synthesize=synthesize,
    format=format_example,
    metrics=metrics,
    headline_metric="accuracy",
    default_head="causal",
    data_format='JSONL/JSON rows {"text","emotion","intensity","trigger"} or Alpaca {"instruction","input","output"}',
    sample_data=emotion_quickstart_path(),
)


@ftkit.hookimpl
def register_tasks(register):  # noqa: ANN001, ANN201 - signature fixed by the hook spec
    register(TASK)
