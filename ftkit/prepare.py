"""From a task's rows to tokenized training features: split, leakage check, prompts, masking."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.errors import DataError
from ftkit.tasks import Example, Task

IGNORE_INDEX = -100  # labels the loss skips: the prompt tokens of causal SFT


@dataclass
class SplitData:
    """Train and test rows as canonical tables (no Python objects per row yet), and what happened."""

    train: Any  # ftkit.sources.TaskData
    test: Any
    labels: list[str] | None
    leaked_removed: int = 0
    notes: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What ``ftkit run --dry-run --json`` reports under ``data``."""
        return {"train_examples": len(self.train), "test_examples": len(self.test), "labels": self.labels,
                "dropped": dict(self.dropped)}


@dataclass
class Splits:
    """Train and test examples, and what happened on the way (for the report and manifest)."""

    train: list[Example]
    test: list[Example]
    labels: list[str] | None
    leaked_removed: int = 0
    notes: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def split_data(task: Task, recipe) -> SplitData:  # noqa: ANN001 - a Recipe
    """Load train (and test) with the recipe's mapping; split off a test set if there is no test file.

    The split is :func:`ftkit.splitting.split_indices`, the same as ``ftkit data split``'s.
    """
    import pyarrow.compute as pc

    from ftkit.sources import DataMapping, load_task_data, unseen_labels
    from ftkit.splitting import sample_indices, split_indices

    section = recipe.task
    mapping = DataMapping.from_section(section)
    classify = task.kind == "classification"
    seed = recipe.train.seed
    train = load_task_data(task, section.train_file or None, mapping)
    dropped = dict(train.dropped)
    if section.max_examples:
        train = train.take(sample_indices(train, section.max_examples, seed, stratify=classify))
    notes: list[str] = []
    if dropped:
        notes.append("dropped from the training data: " + ", ".join(f"{n} ({why})" for why, n in dropped.items()))
    if section.test_file:
        test = load_task_data(task, section.test_file, mapping, role="test")
        for why, n in test.dropped.items():
            dropped[f"test: {why}"] = n
    else:
        train_rows, test_rows = split_indices(train, section.test_size, seed, stratify=classify)
        train, test = train.take(train_rows), train.take(test_rows)
        grouped = " by " + (section.group_by or task.group_by) if (section.group_by or task.group_by) else ""
        notes.append(f"test split: {len(test)} examples ({section.test_size:.0%}, "
                     f"{'stratified, ' if classify else ''}grouped{grouped or ' by source record'}, seed {seed})")
    # Leakage: a test text seen in training inflates the fine-tuned score; drop it from train.
    seen = pc.is_in(train.table.column("_key"), value_set=pc.unique(test.table.column("_key")))
    leaked = int(pc.sum(seen).as_py() or 0)
    if leaked:
        train.table = train.table.filter(pc.invert(seen))
        notes.append(f"removed {leaked} training examples whose text is also in the test split")
        if not len(train):
            raise DataError("every training example also appears in the test split; use different files")
    labels = None
    if classify:
        labels = list(section.labels) or (list(task.labels) if task.labels else train.labels)
        missing = sorted(set(labels) - set(train.labels or ()))
        if missing:
            raise DataError(f"no training examples of label(s) {', '.join(missing)}; add data or set task.labels")
        unseen = unseen_labels(train, test)
        if unseen:
            raise DataError(f"{test.source}: test label(s) {', '.join(map(repr, unseen[:10]))} never occur in the "
                            "training data, so the model cannot learn them; add training rows, map them with "
                            "task.label_map, or skip them with task.drop_labels")
    return SplitData(train=train, test=test, labels=labels, leaked_removed=leaked, notes=notes, dropped=dropped)


def load_splits(task: Task, recipe) -> Splits:  # noqa: ANN001 - a Recipe
    """:func:`split_data`, then the examples the trainer and evaluator need."""
    data = split_data(task, recipe)
    return Splits(train=data.train.examples(task), test=data.test.examples(task), labels=data.labels,
                  leaked_removed=data.leaked_removed, notes=data.notes, dropped=data.dropped)


def prompt_messages(example: Example) -> list[dict[str, str]]:
    user = f"{example.instruction}\n{example.input}" if example.instruction else example.input
    messages = [{"role": "system", "content": example.system}] if example.system else []
    return [*messages, {"role": "user", "content": user}]


def render_prompt(tokenizer, example: Example) -> str:  # noqa: ANN001
    """The text the model sees before its answer: the chat template where there is one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt_messages(example), tokenize=False, add_generation_prompt=True)
    parts = [example.system or "", example.instruction or "", example.input]
    return "\n\n".join(p for p in parts if p) + "\n\nAnswer: "


def render_answer(tokenizer, example: Example, answer: str) -> str:  # noqa: ANN001
    """What follows the prompt when the model gives ``answer``, end-of-turn marker included."""
    if getattr(tokenizer, "chat_template", None):
        messages = [*prompt_messages(example), {"role": "assistant", "content": answer}]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = render_prompt(tokenizer, example)
        if full.startswith(prompt):
            return full[len(prompt):]
    return answer + (tokenizer.eos_token or "")


def encode_causal(tokenizer, example: Example, max_len: int, answer: str | None = None) -> dict[str, list[int]]:  # noqa: ANN001
    """input_ids = prompt + answer; labels mask the prompt with -100 so only the answer is learned.

    Prompt and answer are tokenized apart so the boundary never merges into one token. Too long:
    the prompt loses its first tokens, keeping the text nearest the answer (the input and the
    assistant header); the answer keeps at most half of ``max_len``.
    """
    prompt_ids = tokenizer(render_prompt(tokenizer, example), add_special_tokens=False)["input_ids"]
    answer_text = render_answer(tokenizer, example, example.target if answer is None else answer)
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"][: max_len // 2]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - (max_len - len(answer_ids))):]
    ids = prompt_ids + answer_ids
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def encode_classifier(tokenizer, example: Example, max_len: int, label_ids: dict[str, int]) -> dict:  # noqa: ANN001
    encoded = tokenizer(example.input, truncation=True, max_length=max_len)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
            "labels": label_ids[example.target]}
