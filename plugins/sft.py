"""sft: supervised fine-tuning on conversations in the three layouts datasets are published in.

Each record's layout is detected on its own, so one file may mix them:

- Alpaca: ``{"instruction", "input", "output"}`` plus optional ``system`` and ``history``
  (earlier ``[user, reply]`` pairs);
- ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}]}`` plus optional ``system``;
- OpenAI: ``{"messages": [{"role": "system"|"user"|"assistant", "content"}]}``.

Every layout becomes the same conversation; the loss is on every assistant turn and on nothing else
(:func:`ftkit.prepare.encode_conversation`). Evaluation generates the last reply from the whole
history before it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ftkit
from ftkit.errors import DataError

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
LAYOUTS = "'messages' (OpenAI), 'conversations' (ShareGPT) or 'instruction'/'output' (Alpaca)"


def parse(record: Mapping[str, Any], where: str, **options: Any) -> Iterator[dict[str, Any]]:
    """One record in any of the three layouts -> ``{"messages": <the turns as JSON text>}``.

    The turns are kept as JSON text so that the canonical table has one text column, whichever the
    layout: Arrow compares it for duplicates and train/test overlap like any other text.
    """
    if record.get("messages") is not None:
        turns = _turns(record["messages"], where, "messages", "role", "content")
    elif record.get("conversations") is not None:
        turns = _turns(record["conversations"], where, "conversations", "from", "value")
    elif record.get("instruction") is not None or record.get("output") is not None:
        turns = _alpaca(record, where)
    else:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(f"{where}: no conversation; expected {LAYOUTS}, this record has {keys}")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: field 'system' must be a string, got {type(system).__name__}")
    if turns[0]["role"] != "system":
        system = system or options.get("system_prompt")
        if system:
            turns.insert(0, {"role": "system", "content": system})
    _check(turns, where)
    yield {"messages": json.dumps(turns, ensure_ascii=False)}


def _turns(value: Any, where: str, field: str, role_key: str, text_key: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of turns")
    turns = []
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, Mapping):
            raise DataError(f"{where}: {field} turn {number} must be an object, got {type(turn).__name__}")
        # Tolerate the other layout's keys inside a turn (both are common in the wild); a table
        # read by Arrow gives every turn every key seen in the column, missing ones as None.
        role = next((turn[k] for k in (role_key, "role", "from") if turn.get(k) is not None), None)
        text = next((turn[k] for k in (text_key, "content", "value") if turn.get(k) is not None), None)
        if role not in ROLES:
            raise DataError(f"{where}: {field} turn {number} has role {role!r}; expected one of "
                            f"{', '.join(ROLES)}")
        if not isinstance(text, str):
            raise DataError(f"{where}: {field} turn {number} ({role}) must have text in {text_key!r}, "
                            f"got {type(text).__name__}")
        turns.append({"role": ROLES[role], "content": text})
    return turns


def _alpaca(record: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    from ftkit.data import require_str

    instruction = require_str(record, "instruction", where)
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
    turns = []
    for number, pair in enumerate(record.get("history") or [], start=1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise DataError(f"{where}: history entry {number} must be a [user, reply] pair of strings")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = f"{instruction}\n{extra}" if extra else instruction
    return [*turns, {"role": "user", "content": user},
            {"role": "assistant", "content": require_str(record, "output", where)}]


def _check(turns: list[dict[str, str]], where: str) -> None:
    """A conversation the chat templates accept and that has a reply to learn and to evaluate."""
    if any(t["role"] == "system" for t in turns[1:]):
        raise DataError(f"{where}: a system turn may only come first")
    body = turns[1:] if turns[0]["role"] == "system" else turns
    if not body or body[0]["role"] != "user":
        raise DataError(f"{where}: the conversation must start with a user turn (after an optional system turn)")
    if body[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation ends with a {body[-1]['role']} turn; it must end with the "
                        "assistant's reply (the text the model learns)")
    for number, turn in enumerate(turns, start=1):
        if turn["role"] != "system" and not turn["content"].strip():
            raise DataError(f"{where}: turn {number} ({turn['role']}) is empty")


def load(path: str | Path | None = None, **options: Any) -> Iterator[dict[str, Any]]:
    """Canonical rows from any file ftkit reads, records in any of the three layouts."""
    if path is None:
        raise DataError("the sft task has no hub dataset: set `task.train_file` to your data file")
    from ftkit.sources import task_rows

    yield from task_rows(TASK, path, **options)


def format_example(row: Mapping[str, Any]) -> ftkit.Example:
    turns = tuple(json.loads(row["messages"]))
    system = turns[0]["content"] if turns[0]["role"] == "system" else None
    last_user = next(t["content"] for t in reversed(turns) if t["role"] == "user")
    return ftkit.Example(input=last_user, target=turns[-1]["content"], system=system, messages=turns)


def metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    from ftkit.metrics import generation_metrics

    return generation_metrics(predictions, references)


TASK = ftkit.Task(
    name="sft",
    description="Chat SFT on Alpaca, ShareGPT or OpenAI-messages data; loss on every assistant turn only",
    kind="generation",
    load=load,
    parse=parse,
    fields=(
        ftkit.Field("messages", "OpenAI-style turns [{role, content}]", required=False),
        ftkit.Field("conversations", "ShareGPT turns [{from, value}]", required=False, key=False),
        ftkit.Field("instruction", "Alpaca: what the user asks", required=False, key=False),
        ftkit.Field("input", "Alpaca: more user text (may be empty)", required=False, key=False),
        ftkit.Field("output", "Alpaca: the reply", required=False, key=False),
        ftkit.Field("system", "the system prompt (Alpaca, ShareGPT)", required=False, key=False),
    ),
    format=format_example,
    metrics=metrics,
    # ROUGE-L (F1 of the longest common subsequence, per reply, over characters for Chinese) is
    # the headline, as for huanhuan-chat, so chat runs compare on one number; it rewards the
    # reply's content in order without BLEU's collapse to zero on short replies. chrF and BLEU
    # are reported beside it, perplexity on the gold replies too.
    headline_metric="rougeL",
    data_format='JSONL/JSON/Parquet/... records, each in one layout: {"instruction","input","output"} (Alpaca), '
                '{"conversations":[{"from","value"}]} (ShareGPT) or {"messages":[{"role","content"}]} (OpenAI)',
    options={"system_prompt": "system prompt for conversations that have none (default: none)"},
)


@ftkit.hookimpl
def register_tasks(register):  # noqa: ANN001, ANN201 - signature fixed by the hook spec
    register(TASK)
