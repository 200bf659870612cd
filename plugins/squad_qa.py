"""squad-qa: extractive question answering (SQuAD v1.1), scored by exact match and F1."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ftkit
from ftkit.errors import DataError
from ._common import read_records, require_str

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


def _nested(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    data = json.loads(path.read_text(encoding="utf-8-sig"))
    for a, article in enumerate(data.get("data", [])):
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            for q, qa in enumerate(paragraph.get("qas", [])):
                yield f"{path}:data[{a}].paragraphs[{p}].qas[{q}]", {**qa, "context": paragraph.get("context")}


def load(path: str | Path | None = None, **options: Any) -> Iterator[dict[str, Any]]:
    """Rows ``{"id", "context", "question", "answers": [str, ...]}`` from SQuAD JSON or flat JSONL."""
    if path is None:
        from ftkit.hub import load_hub_rows

        records = ((f"{HUB}[{i}]", r) for i, r in enumerate(load_hub_rows(HUB, split=options.get("split", "train"))))
    elif Path(path).suffix == ".json" and Path(path).is_file() and Path(path).read_text(encoding="utf-8-sig").lstrip().startswith("{"):
        records = _nested(Path(path))
    else:
        records = read_records(path)
    for where, row in records:
        yield {
            "id": str(row.get("id", where)),
            "context": require_str(row, "context", where),
            "question": require_str(row, "question", where),
            "answers": _answers(row, where),
        }


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
    format=format_example,
    metrics=metrics,
    headline_metric="f1",
    hub_dataset=HUB,
    data_format='SQuAD v1.1 JSON (data → paragraphs → qas) or JSONL {"id","context","question","answers"}',
)


@ftkit.hookimpl
def register_tasks(register):  # noqa: ANN001, ANN201 - signature fixed by the hook spec
    register(TASK)
