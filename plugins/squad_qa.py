"""squad-qa: extractive question answering (SQuAD v1.1), scored by exact match and F1."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ftkit
from ftkit.errors import DataError
from ftkit.data import OnError, read_json, require_str

HUB = "huggingface:rajpurkar/squad"
INSTRUCTION = "Answer the question with a span copied from the context."


def _answers(row: dict[str, Any], where: str) -> list[str]:
    answers = row.get("answers")
    if isinstance(answers, dict):  # flat HF layout: {"text": [...], "answer_start": [...]}
        texts = answers.get("text")
    elif isinstance(answers, list):  # SQuAD JSON layout: [{"text", "answer_start"}, ...]
        texts = [a.get("text") if isinstance(a, dict) else None for a in answers]
    else:
        raise DataError(f"{where}: missing field 'answers' (a list of {{'text','answer_start'}})")
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise DataError(f"{where}: 'answers' must hold at least one non-empty answer text")
    return list(texts)


def _nested(path: Path, articles: list) -> Iterator[tuple[str, dict[str, Any]]]:
    for a, article in enumerate(articles):
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            for q, qa in enumerate(paragraph.get("qas", [])):
                yield f"{path}:data[{a}].paragraphs[{p}].qas[{q}]", {**qa, "context": paragraph.get("context")}


def parse(record: dict[str, Any], where: str, **options: Any) -> Iterator[dict[str, Any]]:
    """``{"id", "context", "question", "answers": [str, ...]}`` from a flat or a nested (qas) record."""
    yield {
        "id": str(record.get("id", where)),
        "context": require_str(record, "context", where),
        "question": require_str(record, "question", where),
        "answers": _answers(record, where),
    }


def records(path: str | Path, on_error: OnError = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` from SQuAD v1.1 JSON (``data → paragraphs → qas``), else any flat file ftkit reads."""
    path = Path(path)
    if path.suffix == ".json":
        data = read_json(path)
        if isinstance(data, dict):
            if not isinstance(data.get("data"), list):
                raise DataError(f"{path}: expected SQuAD JSON with a 'data' list (data → paragraphs → qas)")
            yield from _nested(path, data["data"])
            return
    from ftkit.sources import source_records

    yield from source_records(path)


def load(path: str | Path | None = None, **options: Any) -> Iterator[dict[str, Any]]:
    """Rows from SQuAD JSON or flat JSONL, or from the hub (``split`` option) when path is None."""
    if path is None:
        from ftkit.hub import load_hub_rows

        rows = load_hub_rows(HUB, split=options.get("split", "train"))
        source: Iterator[tuple[str, dict[str, Any]]] = ((f"{HUB}[{i}]", r) for i, r in enumerate(rows))
    else:
        source = records(path)
    for where, record in source:
        yield from parse(record, where, **options)


def format_example(row: dict[str, Any]) -> ftkit.Example:
    prompt = f"Context: {row['context']}\nQuestion: {row['question']}"
    return ftkit.Example(
        input=prompt, target=row["answers"][0], references=tuple(row["answers"]), instruction=INSTRUCTION
    )


def metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    from ftkit.metrics import squad_metrics

    return squad_metrics(predictions, references)


TASK = ftkit.Task(
    name="squad-qa",
    description="Extractive QA (SQuAD v1.1): answer with a span of the context",
    kind="generation",
    load=load,
    parse=parse,
    read=records,
    fields=(
        ftkit.Field("id", "the question's id", required=False, key=False),
        ftkit.Field("context", "the paragraph"),
        ftkit.Field("question", "the question"),
        ftkit.Field("answers", "answer texts: a list, or SQuAD's {text: [...], answer_start: [...]}"),
    ),
    # Questions about one paragraph must not be both trained on and tested: split by paragraph.
    group_by="context",
    format=format_example,
    metrics=metrics,
    headline_metric="f1",
    hub_dataset=HUB,
    options={"split": "hub split to read when no file is given (train or validation)"},
    data_format='SQuAD v1.1 JSON (data → paragraphs → qas), or flat rows {"id","context","question","answers"} '
                '(JSONL, JSON, CSV, TSV, Parquet or a saved dataset: the Hugging Face layout)',
)


@ftkit.hookimpl
def register_tasks(register):  # noqa: ANN001, ANN201 - signature fixed by the hook spec
    register(TASK)
