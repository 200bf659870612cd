"""hc3: detect whether an answer was written by a human or by ChatGPT (HC3-Chinese)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ftkit
from ftkit.errors import DataError
from ftkit.data import require_str

LABELS = ("human", "chatgpt")
HUB = "modelscope:simpleai/HC3-Chinese"
INSTRUCTION = "Was this answer written by a human or by ChatGPT? Answer human or chatgpt."


def parse(record: dict[str, Any], where: str, **options: Any) -> Iterator[dict[str, Any]]:
    """One row ``{"question", "answer", "label"}`` per answer in ``human_answers``/``chatgpt_answers``."""
    question = require_str(record, "question", where)
    for field, label in (("human_answers", "human"), ("chatgpt_answers", "chatgpt")):
        answers = record.get(field)
        if answers is None:
            raise DataError(f"{where}: missing field {field!r}")
        if not isinstance(answers, list):
            raise DataError(f"{where}: field {field!r} must be a list of strings")
        for answer in answers:
            if isinstance(answer, str) and answer.strip():
                yield {"question": question, "answer": answer.strip(), "label": label}


def load(path: str | Path | None = None, **options: Any) -> Iterator[dict[str, Any]]:
    """Rows from a local copy (any file ftkit reads), or from the hub (``subset`` option) when path is None."""
    if path is None:
        from ftkit.hub import load_hub_rows

        rows = load_hub_rows(HUB, subset=options.get("subset", "all"))
        records: Iterable[tuple[str, dict[str, Any]]] = ((f"{HUB}[{i}]", row) for i, row in enumerate(rows))
        for where, record in records:
            yield from parse(record, where, **options)
        return
    from ftkit.sources import task_rows

    yield from task_rows(TASK, path, **options)


def format_example(row: dict[str, Any]) -> ftkit.Example:
    text = f"问题：{row['question']}\n回答：{row['answer']}"
    return ftkit.Example(input=text, target=row["label"], instruction=INSTRUCTION)


def metrics(predictions: Sequence[str], references: Sequence[Sequence[str]],
            labels: Sequence[str] | None = None) -> dict:
    """Scored over the run's whole label set (the recipe may override the default one)."""
    from ftkit.metrics import classification_metrics

    return classification_metrics(predictions, references, labels or LABELS)


TASK = ftkit.Task(
    name="hc3",
    description="Human vs ChatGPT answer detection (HC3-Chinese)",
    kind="classification",
    labels=LABELS,
    load=load,
    parse=parse,
    fields=(
        ftkit.Field("question", "the question both kinds of answer reply to"),
        ftkit.Field("human_answers", "a list of human answers"),
        ftkit.Field("chatgpt_answers", "a list of ChatGPT answers"),
    ),
    # Answers to one question must not be both trained on and tested: split by question.
    group_by="question",
    format=format_example,
    metrics=metrics,
    headline_metric="accuracy",
    default_head="classifier",
    hub_dataset=HUB,
    data_format='JSONL rows {"question","human_answers":[...],"chatgpt_answers":[...]} (id optional)',
    options={"subset": "HC3-Chinese subset on the hub: all, baike, finance, law, medicine, ..."},
)


@ftkit.hookimpl
def register_tasks(register):  # noqa: ANN001, ANN201 - signature fixed by the hook spec
    register(TASK)
