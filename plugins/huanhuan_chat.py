"""huanhuan-chat: role-play chat SFT (甄嬛 style replies) from huanhuan.json."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ftkit
from ftkit.errors import DataError
from ftkit.data import require_str

DEFAULT_SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"


def parse(record: dict[str, Any], where: str, **options: Any) -> Iterator[dict[str, Any]]:
    """``{"instruction", "input", "output", "system"}``; ``input`` may be empty."""
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
    yield {
        "instruction": require_str(record, "instruction", where),
        "input": extra,
        "output": require_str(record, "output", where),
        "system": options.get("system_prompt", DEFAULT_SYSTEM),
    }


def load(path: str | Path | None = None, **options: Any) -> Iterator[dict[str, Any]]:
    """Rows from huanhuan.json (a JSON array), or the same objects in any file ftkit reads."""
    if path is None:
        raise DataError("the huanhuan-chat task has no hub dataset: set `task.train_file` to huanhuan.json")
    from ftkit.sources import task_rows

    yield from task_rows(TASK, path, **options)


def format_example(row: dict[str, Any]) -> ftkit.Example:
    prompt = row["instruction"] + (("\n" + row["input"]) if row["input"] else "")
    return ftkit.Example(input=prompt, target=row["output"], system=row.get("system") or DEFAULT_SYSTEM)


def metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    from ftkit.metrics import generation_metrics

    return generation_metrics(predictions, references)


TASK = ftkit.Task(
    name="huanhuan-chat",
    description="Role-play chat SFT (甄嬛 replies) with prompt tokens masked",
    kind="generation",
    load=load,
    parse=parse,
    fields=(
        ftkit.Field("instruction", "what the user says"),
        ftkit.Field("input", "more user text (may be empty)", required=False),
        ftkit.Field("output", "the reply in role"),
    ),
    format=format_example,
    metrics=metrics,
    headline_metric="rougeL",
    data_format='JSON array (or JSONL) of {"instruction","input","output"}',
    options={"system_prompt": f"the role's system prompt (default: {DEFAULT_SYSTEM})"},
)


@ftkit.hookimpl
def register_tasks(register):  # noqa: ANN001, ANN201 - signature fixed by the hook spec
    register(TASK)
